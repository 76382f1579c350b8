"""End to end: real studies on the toy zoo with real lm-eval and real Ray (2 CPU workers).

One Ray instance serves the whole test session (RayPool starts Ray only when it is not running).
The zoo (the `zoo` fixture of conftest.py) is built once into the test cache and reused by later
runs.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import records
from search.cli import main
from search.config import ConfigError, config_from_dict, load_config
from search.folder import load_study_folder
from search.loop import StudyStopped, run_study
from search.setup import setup_study
from search.space import suggest

N_WORKERS = 2
LIMIT = 40  # items per task and candidate: keeps each evaluation well under a second
RECORD_KEYS = {
    "number",
    "state",
    "baseline",
    "params",
    "recipe",
    "metrics",
    "values",
    "merge_s",
    "eval_s",
    "wall_s",
    "worker",
    "error",
    "traceback",
}
# DARE-TIES (not normalized) with weights of 100 and more and a lambda near float32's largest value:
# lambda * the mixed task vector overflows, so every dare_ties candidate raises NonFiniteMergeError
# in the worker, while linear candidates (normalized by their weights) stay valid.
OVERFLOW = {"weight": [100.0, 1000.0], "lambda": [1.0e38, 3.0e38]}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every study of the session."""
    import ray

    from search.pool import start_ray

    started = not ray.is_initialized()
    if started:
        start_ray(None, N_WORKERS, 0)
    yield ray
    if started:
        ray.shutdown()


def study_dict(zoo, folder: Path, *, name: str = "e2e", **sections: Any) -> dict[str, Any]:
    """A study config over the zoo; `sections` replace whole sections."""
    tasks = list(zoo.tasks)
    data: dict[str, Any] = {
        "study": {"name": name, "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes.values()]},
        "space": {"methods": ["linear", "task_arithmetic", "ties"], "lambda": [0.5, 1.5]},
        "evaluator": {
            "tasks": tasks,
            "include_path": str(zoo.tasks_dir),
            "limit": LIMIT,
            "builtin_tasks": False,
            "batch_size": 64,
        },
        "objectives": {"items": [{"task": t, "weight": 1.0 / len(tasks)} for t in tasks]},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 4},
        "budget": {"n_trials": 10},
        "workers": {"count": N_WORKERS},
    }
    data.update(sections)
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def trials_of(folder: Path) -> list[optuna.trial.FrozenTrial]:
    return load_study_folder(folder)[1].get_trials(deepcopy=False)


def complete(trials) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials if t.state == TrialState.COMPLETE]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def resumed(zoo, ray_session, tmp_path_factory):
    """A single-objective study: `basin run` with n_trials=6, a run killed with one trial in flight
    (simulated: a RUNNING trial owned by a dead process), then
    `basin resume --set budget.n_trials=10`."""
    root = tmp_path_factory.mktemp("resume")
    folder = root / "study"
    config_path = write_config(root / "study.yaml", study_dict(zoo, folder))
    assert main(["run", str(config_path), "--set", "budget.n_trials=6", "--quiet"]) == 0
    first_trials = trials_of(folder)
    first_records = records.read_trial_records(folder)

    # a run that died mid-trial leaves that trial RUNNING in the storage
    setup = setup_study(load_study_folder(folder)[0], resume=True)
    stale = setup.study.ask()
    stale.set_user_attr("runner", {"host": socket.gethostname(), "pid": dead_pid()})
    stale_params = suggest(stale, setup.space)

    assert main(["resume", str(folder), "--set", "budget.n_trials=10", "--quiet"]) == 0
    return {
        "folder": folder,
        "config_path": config_path,
        "first_trials": first_trials,
        "first_records": first_records,
        "stale": stale.number,
        "stale_params": stale_params,
    }


# --- single objective, records, status, resume ----------------------------------------------------


def test_first_run_finishes_its_budget_with_baselines_first(resumed):
    first = sorted(resumed["first_trials"], key=lambda t: t.number)
    assert [t.state for t in first] == [TrialState.COMPLETE] * 6 + [TrialState.WAITING]
    # baselines were enqueued first: each fine-tune alone, uniform, task arithmetic, TIES (7: one
    # waits)
    finetunes = yaml.safe_load(resumed["config_path"].read_text())["models"]["finetunes"]
    assert [t.user_attrs.get("baseline") for t in first] == (
        [f"alone:{Path(p).name}" for p in finetunes] + ["uniform", "task_arithmetic", "ties"]
    )


def test_resume_continues_without_losing_or_duplicating_trials(resumed):
    folder = resumed["folder"]
    trials = trials_of(folder)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    assert len(complete(trials)) == 10
    # every trial of the first run is still there, unchanged
    by_number = {t.number: t for t in trials}
    for before in complete(resumed["first_trials"]):
        after = by_number[before.number]
        assert (
            after.state == before.state
            and after.values == before.values
            and after.params == before.params
        )
    now = records.read_trial_records(folder)
    for number, record in resumed["first_records"].items():
        assert now[number] == record, f"record of trial {number} changed on resume"
    # the remaining baseline ran after the resume, once
    baselines = [t.user_attrs["baseline"] for t in complete(trials) if t.user_attrs.get("baseline")]
    assert len(baselines) == len(set(baselines)) == 7


def test_resume_requeues_the_trial_of_a_dead_run(resumed):
    trials = {t.number: t for t in trials_of(resumed["folder"])}
    stale = trials[resumed["stale"]]
    assert stale.state == TrialState.FAIL
    assert "stopped while this trial ran" in stale.user_attrs["error"]
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == resumed["stale"]]
    assert len(retries) == 1
    assert retries[0].state == TrialState.COMPLETE
    assert retries[0].params == stale.params == resumed["stale_params"]
    assert retries[0].user_attrs.get("baseline") == stale.user_attrs.get("baseline")


def test_every_finished_trial_has_a_complete_record(resumed):
    folder = resumed["folder"]
    config = load_config(resumed["config_path"])
    keys = [o.key for o in config.objectives.items]
    recs = records.read_trial_records(folder)
    trials = trials_of(folder)
    # the stale trial's record was written on resume
    assert sorted(recs) == sorted(t.number for t in trials)
    stale = recs[resumed["stale"]]
    assert stale["state"] == "FAIL" and "stopped while this trial ran" in stale["error"]
    workers = set()
    for t in complete(trials):
        rec = recs[t.number]
        assert set(rec) >= RECORD_KEYS, RECORD_KEYS - set(rec)
        assert rec["state"] == "COMPLETE" and rec["error"] is None
        assert rec["params"] == t.params
        assert rec["recipe"]["method"] in ("linear", "task_arithmetic", "ties")
        assert len(rec["recipe"]["models"]) == 4
        assert set(keys) <= set(rec["metrics"])
        assert rec["values"] == t.values
        assert rec["values"][0] == pytest.approx(
            sum(o.weight * rec["metrics"][o.key] for o in config.objectives.items)
        )
        assert 0 <= rec["values"][0] <= 1
        assert (
            rec["merge_s"] > 0
            and rec["eval_s"] > 0
            and rec["wall_s"] >= rec["eval_s"] + rec["merge_s"]
        )
        assert rec["baseline"] == t.user_attrs.get("baseline")
        workers.add(rec["worker"])
    # "host:pid/index"; usually both workers take candidates, but one that starts much later may not
    assert workers and {w.rsplit("/", 1)[1] for w in workers} <= {"0", "1"}


def test_status_names_the_best_trial_of_the_records_on_disk(resumed, capsys):
    """`basin status` reports as best the COMPLETE trial whose record on disk scores highest."""
    recs = [
        r
        for r in records.read_trial_records(resumed["folder"]).values()
        if r["state"] == "COMPLETE"
    ]
    top = max(r["values"][0] for r in recs)
    assert main(["status", str(resumed["folder"])]) == 0
    best = re.search(
        r"^  best trial (\d+) \((.+)\): score ([0-9.]+)$", capsys.readouterr().out, re.MULTILINE
    )
    assert best, "no best line"
    number, name, value = int(best[1]), best[2], float(best[3])
    record = next(r for r in recs if r["number"] == number)
    assert record["values"][0] == top and value == pytest.approx(top, abs=5e-5)
    assert name == (record["baseline"] or record["params"]["method"])


def test_basin_status_prints_done_counts(resumed, capsys):
    assert main(["status", str(resumed["folder"])]) == 0
    out = capsys.readouterr().out
    assert "study 'e2e' (single" in out
    assert "done 10 of 10, failed 1, running 0" in out
    assert "best trial" in out
    assert "failed trial" in out and "stopped while this trial ran" in out


def test_an_existing_study_with_a_different_config_is_refused(resumed, tmp_path, capsys):
    folder = resumed["folder"]
    data = yaml.safe_load(resumed["config_path"].read_text())
    data["space"]["methods"] = ["ties"]
    other = config_from_dict(data)
    snapshot = (folder / records.CONFIG_FILE).read_text()
    journal = (folder / records.JOURNAL_FILE).read_bytes()
    with pytest.raises(ConfigError, match="holds a study with a different config"):
        run_study(other, progress=False)
    assert main(["run", str(write_config(tmp_path / "other.yaml", data)), "--quiet"]) == 2
    assert "basin: error:" in capsys.readouterr().err
    # nothing was written
    assert (folder / records.CONFIG_FILE).read_text() == snapshot
    assert (folder / records.JOURNAL_FILE).read_bytes() == journal

    # on a copy: the same search (budget and workers may differ) runs on, as a run or a resume
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    same = yaml.safe_load(resumed["config_path"].read_text())
    same["study"]["output_dir"] = str(copy)
    same["budget"] = {"n_trials": 12}
    same["workers"] = {"count": 1}
    assert setup_study(config_from_dict(same), resume=False).study.study_name == "e2e"
    assert setup_study(config_from_dict(same), resume=True).study.study_name == "e2e"
    data["study"]["output_dir"] = str(copy)
    with pytest.raises(ConfigError, match="holds a study with a different config"):
        setup_study(config_from_dict(data), resume=True)
    # resuming a folder without a study is refused and creates nothing
    none = tmp_path / "none"
    with pytest.raises(ConfigError, match="holds no study to resume"):
        setup_study(
            config_from_dict({**data, "study": {"name": "e2e", "output_dir": str(none)}}),
            resume=True,
        )
    assert not none.exists()


# --- Pareto ---------------------------------------------------------------------------------------


def test_pareto_study_has_a_front(zoo, ray_session, tmp_path, capsys):
    tasks = list(zoo.tasks)[:2]
    data = study_dict(
        zoo,
        tmp_path / "pareto",
        name="pareto",
        space={"methods": ["linear", "ties"]},
        evaluator={
            "tasks": tasks,
            "include_path": str(zoo.tasks_dir),
            "limit": LIMIT,
            "builtin_tasks": False,
            "batch_size": 64,
        },
        objectives={"mode": "pareto", "items": [{"task": t} for t in tasks]},
        sampler={"name": "nsga2", "seed": 0},
        budget={"n_trials": 8},
    )
    study = run_study(config_from_dict(data), progress=False)
    assert len(study.directions) == 2
    assert all(d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions)
    assert len(complete(study.get_trials(deepcopy=False))) == 8
    front = study.best_trials
    assert front
    for t in front:
        assert len(t.values) == 2
        assert t.values == [t.user_attrs["metrics"][f"{task}/acc"] for task in tasks]
    assert main(["status", str(tmp_path / "pareto")]) == 0
    out = capsys.readouterr().out
    assert "(pareto" in out and "done 8 of 8" in out and f"Pareto front: {len(front)} trials" in out


# --- failures -------------------------------------------------------------------------------------


def test_a_failing_candidate_fails_its_trial_and_the_study_goes_on(zoo, ray_session, tmp_path):
    folder = tmp_path / "failing"
    data = study_dict(
        zoo,
        folder,
        name="failing",
        space={"methods": ["linear", "dare_ties"], **OVERFLOW},
        sampler={"name": "random", "seed": 1},
        budget={"n_trials": 3},
        baselines=False,
    )
    study = run_study(config_from_dict(data), progress=False)
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete(trials)) == 3
    assert failed, "the seed should draw at least one dare_ties candidate"
    recs = records.read_trial_records(folder)
    for t in failed:
        assert t.params["method"] == "dare_ties"
        assert t.user_attrs["error"].startswith("NonFiniteMergeError: ")
        assert "NaN or inf" in t.user_attrs["error"]
        rec = recs[t.number]
        assert rec["state"] == "FAIL" and rec["error"] == t.user_attrs["error"]
        assert rec["values"] is None and rec["metrics"] is None
        assert "NonFiniteMergeError" in rec["traceback"]
    assert all(t.params["method"] == "linear" for t in complete(trials))


def test_a_study_where_every_candidate_fails_stops_with_a_clear_error(zoo, ray_session, tmp_path):
    folder = tmp_path / "hopeless"
    data = study_dict(
        zoo,
        folder,
        name="hopeless",
        space={"methods": ["dare_ties"], **OVERFLOW},
        sampler={"name": "random", "seed": 0},
        budget={"n_trials": 5},
        baselines=False,
    )
    with pytest.raises(StudyStopped, match=r"stopped: the last 10 candidates all failed") as info:
        run_study(config_from_dict(data), progress=False)
    # the reasons grouped with their counts, where the tracebacks are, and the way on
    assert "\n  10 x NonFiniteMergeError: " in str(info.value)
    assert f"{folder / 'trials'}" in str(info.value) and f"basin resume {folder}" in str(info.value)
    trials = trials_of(folder)
    assert not complete(trials)
    # stopped at the guard, not looping on: 10, and those in flight or proposed ahead
    assert 10 <= len(trials) <= 10 + 2 * N_WORKERS
    assert all(t.state == TrialState.FAIL for t in trials)  # nothing left RUNNING
    errors = {
        json.loads(p.read_text())["error"].split(":")[0] for p in (folder / "trials").glob("*.json")
    }
    assert errors == {"NonFiniteMergeError"}


def test_cpu_worker_processes_run_their_share_of_threads_and_wait_passively(
    zoo, ray_session, tmp_path, monkeypatch
):
    """What a worker's own process reports: torch threads from its share of the cores (or
    workers.threads) and OpenMP's passive wait policy, or the one the user set."""
    from search.folder import worker_spec
    from search.pool import RayPool, cpu_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = config_from_dict(study_dict(zoo, tmp_path / "threads"))
    pool = RayPool(worker_spec(config), N_WORKERS)
    try:
        infos = pool.ready()
    finally:
        pool.shutdown()
    assert [(i["threads"], i["omp_wait_policy"]) for i in infos] == [
        (cpu_threads(N_WORKERS), "PASSIVE")
    ] * N_WORKERS

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    config = config_from_dict(
        study_dict(zoo, tmp_path / "threads", workers={"count": 1, "threads": 2})
    )
    pool = RayPool(worker_spec(config), 1)
    try:
        (info,) = pool.ready()
    finally:
        pool.shutdown()
    assert (info["threads"], info["omp_wait_policy"]) == (2, "ACTIVE")
