"""Overnight reliability: what goes wrong at night must never lose finished work.

The slow tests drive the real `basin` command in subprocesses (each starts its own local Ray) on
tiny models, through the scenarios of tests/support/scenarios.py (tests/benchmarks/reliability.py
prints their figures). The fast ones check the pieces in-process: the journal, stale trials,
baselines, interrupts, security.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search import records
from search.budget import Budget, claim
from search.config import config_from_dict, config_to_dict
from search.folder import study_space, worker_spec
from search.loop import Flight, finish, judge, run_study
from search.recovery import requeue_stale
from search.result import WorkerResult
from search.setup import setup_study
from search.space import baseline_params, suggest
from tests.support.fault_zoo import build_big_zoo, study_config
from tests.support.runs import LOOPBACK, REPO
from tests.support.scenarios import FAULT_KINDS, export_killed, kill_and_resume, worker_faults


def setup(zoo, folder: Path, **sections):
    return setup_study(config_from_dict(study_config(zoo, folder, **sections)), resume=False)


# --- the real command line under fire -------------------------------------------------------------


@pytest.mark.slow
def test_ten_sigkills_then_two_runners_lose_nothing(fault_zoo, tmp_path):
    """SIGKILL `basin run`/`resume` and its whole Ray 10 times at random moments (most during
    start-up, every fifth while trials complete), resuming each time; then two `basin run` of the
    same config finish the study together. Nothing finished is lost or duplicated, no trial number
    is used twice, running trials are failed and queued again, no process leaks, and the budget is
    reached. (One scenario for both, to keep start-ups, about 15-30 s each here, few.)"""
    r = kill_and_resume(
        fault_zoo,
        tmp_path,
        kills=10,
        n_trials=40,
        moments=("early",) * 4 + ("completing",),
        early_s=(0.5, 6.0),
        final_runners=2,
    )
    assert r.kills == 10
    assert r.leaked == [], "processes outlived the kill"
    assert r.lost == [], "COMPLETE trials changed or disappeared"
    assert r.integrity == [], (
        "duplicates, numbers used twice, retries missing or records out of step"
    )
    assert r.final_rc == 0
    assert all(n > 0 for n in r.final_by_runner.values()), (
        f"a runner added nothing: {r.final_by_runner}"
    )
    # n_trials counts COMPLETE trials; runners check it and ask under one lock, so neither
    # overshoots
    assert r.complete == r.budget


@pytest.mark.slow
def test_worker_death_evaluation_error_timeout_and_nan_fail_only_their_trial(fault_zoo, tmp_path):
    """One study, phase by phase: an evaluation raises; the worker is SIGKILLed mid-candidate (its
    pid from a trial record); a candidate hangs past workers.candidate_timeout; task-arithmetic
    merges overflow to inf. Each fails its own trial with the reason, a fresh worker takes over each
    time, and the study finishes its budget."""
    r = worker_faults(fault_zoo, tmp_path)
    assert r.rc == 0 and r.complete == r.budget
    assert set(r.errors) == set(FAULT_KINDS.values()), r.errors
    assert (
        len(r.errors["worker_died"]) == 1
        and len(r.errors["timeout"]) == 1
        and len(r.errors["raised"]) == 1
    )
    assert r.unexpected == [] and r.integrity == []
    pids = [w.split(":")[1].split("/")[0] for w in r.workers]
    assert str(r.killed_pid) == pids[0]  # the worker of the first COMPLETE trial was the one killed
    # then one restarted after the kill, one after the timeout
    assert len(dict.fromkeys(pids)) == 3, r.workers
    assert str(r.timed_out_pid) == list(dict.fromkeys(pids))[1]
    # the run's local Ray serves on loopback only (node address 127.0.0.1, every listening socket)
    assert r.node_ips == {"127.0.0.1"}, r.node_ips
    assert r.listening and all(ip in LOOPBACK for _, ip in r.listening), r.listening
    # the terminal shows one line of basin's for the dead worker, naming its trial; Ray's own
    # messages about it (raylet lines, restarts) are kept in the study folder's ray.log
    (trial,) = r.errors["worker_died"]
    assert r.output.count("basin: worker 0 died during trial") == 1, r.output
    assert f"died during trial {trial} " in r.output and "ray.log" in r.output
    assert "(raylet)" not in r.output and "(raylet)" in r.ray_log, r.output


@pytest.mark.slow
def test_sigkilled_export_leaves_nothing_at_the_target_and_the_next_export_sweeps_its_debris(
    tmp_path,
):
    r = export_killed(build_big_zoo(tmp_path / "big"), tmp_path / "export")
    assert not r.target_exists
    assert len(r.partial_left) == 1  # SIGKILL leaves the unfinished folder beside the target ...
    assert r.clean_export_ok
    assert r.partial_after_clean == []  # ... and the next export of that target removes it


# --- the journal ----------------------------------------------------------------------------------


def test_a_torn_journal_tail_is_cut_and_the_study_goes_on(fault_zoo, tmp_path, capsys):
    """A run that dies in the middle of a journal write leaves half a line; Optuna would append the
    next operation to it and the study would become unreadable."""
    folder = tmp_path / "torn"
    s = setup(fault_zoo, folder)
    numbers = []
    for _ in range(3):
        t = s.study.ask()
        suggest(t, s.space)
        s.study.tell(t, [0.1, 0.2])
        numbers.append(t.number)
    journal = folder / records.JOURNAL_FILE
    intact = journal.read_bytes()
    with open(journal, "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"dead","trial_id":')
    study = optuna.load_study(study_name="night", storage=records.open_storage(folder, None))
    assert "half-written" in capsys.readouterr().err
    assert journal.read_bytes() == intact
    t = study.ask()
    suggest(t, s.space)
    study.tell(t, [0.3, 0.4])
    again = optuna.load_study(study_name="night", storage=records.open_storage(folder, None))
    done = [x.number for x in again.get_trials(states=(TrialState.COMPLETE,))]
    assert done == [*numbers, t.number]


def test_a_run_killed_holding_the_journal_lock_blocks_nobody(tmp_path):
    """Optuna's default lock (a symlink) outlives a SIGKILLed writer and makes the next run wait
    30 s; the flock the journal uses now is released by the kernel the moment its holder dies."""
    from filelock import Timeout

    folder = tmp_path / "lock"
    records.open_storage(folder, None)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path\n"
                "from search.records import file_lock, JOURNAL_LOCK\n"
                f"lock = file_lock(Path({str(folder)!r}) / JOURNAL_LOCK); lock.acquire()\n"
                "print('held', flush=True); time.sleep(600)"
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    lock = records.file_lock(folder / records.JOURNAL_LOCK)
    with pytest.raises(Timeout):  # held while its holder lives ...
        lock.acquire(blocking=False)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock.acquire(blocking=False)  # ... and free once it is dead: no wait, no stale lock to break
    lock.release()
    optuna.create_study(study_name="after", storage=records.open_storage(folder, None))


def test_the_config_snapshot_is_written_atomically(tmp_path, monkeypatch):
    folder = tmp_path / "snap"
    records.write_config_snapshot(folder, {"a": 1})

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # a kill while writing: the old snapshot must stay whole

    monkeypatch.setattr(yaml, "safe_dump", die)
    with pytest.raises(KeyboardInterrupt):
        records.write_config_snapshot(folder, {"a": 2})
    assert records.read_config_snapshot(folder) == {"a": 1}


# --- stale trials, baselines, interrupts ----------------------------------------------------------


def _live_other_process():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_a_trial_asked_a_moment_ago_by_a_live_runner_is_not_taken(fault_zoo, tmp_path, monkeypatch):
    """Between ask and recording its runner, a live run's trial has no owner; a runner starting just
    then waits for the owner to appear instead of failing the trial."""
    s = setup(fault_zoo, tmp_path / "young", baselines=False)
    other = _live_other_process()
    trial = s.study.ask()
    real_sleep, waits = time.sleep, []

    def owner_appears(seconds: float) -> None:
        # the live runner records itself while the other waits
        waits.append(seconds)
        if len(waits) == 1:
            trial.set_user_attr("runner", {"host": socket.gethostname(), "pid": other.pid})
        real_sleep(0)

    try:
        monkeypatch.setattr(time, "sleep", owner_appears)
        # a grace far longer than the test: the wait ends because the owner appeared, not by time
        assert requeue_stale(s.study, grace_s=600) == []
        monkeypatch.undo()
        assert waits, "requeue_stale did not wait for the ownerless trial"
        assert s.study.trials[trial.number].state == TrialState.RUNNING
    finally:
        other.kill()
        other.wait()


def test_stale_trials_are_failed_and_their_params_queued_again(fault_zoo, tmp_path):
    s = setup(fault_zoo, tmp_path / "stale")
    host = socket.gethostname()
    # a baseline, killed between ask and recording its runner: params not suggested yet
    ownerless = s.study.ask()
    assert not ownerless.params
    own_pid = s.study.ask()  # a former run of a restarted container, which had this pid
    own_pid.set_user_attr("runner", {"host": host, "pid": os.getpid()})
    suggest(own_pid, s.space)
    other = _live_other_process()
    try:
        alive = s.study.ask()
        alive.set_user_attr("runner", {"host": host, "pid": other.pid})
        elsewhere = s.study.ask()
        elsewhere.set_user_attr("runner", {"host": "another-host", "pid": 1})
        # grace 0: the ownerless trial counts as abandoned at once (its wait has its own test above)
        assert sorted(requeue_stale(s.study, grace_s=0.0)) == [ownerless.number, own_pid.number]
    finally:
        other.kill()
        other.wait()
    trials = s.study.get_trials()
    for t in (ownerless, own_pid):
        assert (
            trials[t.number].state == TrialState.FAIL
            and "queued again" in trials[t.number].user_attrs["error"]
        )
        retry = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.WAITING
        assert retry[0].user_attrs.get("baseline") == trials[t.number].user_attrs.get("baseline")
    # the baseline's params survive
    expected = trials[ownerless.number].system_attrs["fixed_params"]
    assert (
        next(r for r in trials if r.user_attrs.get("retry_of") == ownerless.number).system_attrs[
            "fixed_params"
        ]
        == expected
    )
    assert (
        trials[alive.number].state == TrialState.RUNNING
        and trials[elsewhere.number].state == TrialState.RUNNING
    )


def test_the_budget_counts_the_running_trials_of_live_runners_only(fault_zoo, tmp_path):
    """A second runner does not ask for the last trial while a live runner has it in flight; a dead
    runner's trial (queued again on the next start) does not hold the budget."""
    s = setup(fault_zoo, tmp_path / "budget", baselines=False, budget={"n_trials": 2})
    host, runner = socket.gethostname(), {"host": socket.gethostname(), "pid": os.getpid()}
    left = Budget(s.study, s.config.budget).left
    done = claim(s.study, s.folder, runner, left)
    suggest(done, s.space)
    s.study.tell(done, [0.5, 0.5])
    other = _live_other_process()
    try:
        running = s.study.ask()
        running.set_user_attr("runner", {"host": host, "pid": other.pid})
        # 1 COMPLETE + 1 running live = the budget
        assert claim(s.study, s.folder, runner, left) is None
    finally:
        other.kill()
        other.wait()
    # its runner is gone: the budget has room again
    claimed = claim(s.study, s.folder, runner, left)
    assert claimed is not None and claimed.user_attrs["runner"] == runner


def test_a_run_killed_while_queuing_baselines_queues_the_rest_on_resume(fault_zoo, tmp_path):
    folder = tmp_path / "baselines"
    config = config_from_dict(study_config(fault_zoo, folder))
    baselines = baseline_params(study_space(config))
    # what a run killed after queuing two baselines leaves: the study, its first attrs, two
    # baselines
    study = optuna.create_study(
        study_name="night",
        storage=records.open_storage(folder, None),
        directions=["maximize", "maximize"],
    )
    study.set_user_attr("directions", ["maximize", "maximize"])
    for name, params in baselines[:2]:
        study.enqueue_trial(params, user_attrs={"baseline": name})
    records.write_config_snapshot(folder, config_to_dict(config))
    resumed = setup_study(config, resume=True)
    queued = [t.user_attrs["baseline"] for t in resumed.study.get_trials()]
    assert len(baselines) >= 5 and sorted(queued) == sorted(name for name, _ in baselines)
    assert resumed.study.user_attrs["baselines_enqueued"] is True


def test_an_interrupted_run_queues_its_running_candidates_again(fault_zoo, tmp_path):
    class InterruptedPool:
        def __init__(self, spec, workers, worker_cls):
            self.refs = 0

        def available(self, worker):
            return True

        def submit(self, worker, recipe, role="search", **rung):
            self.refs += 1
            return self.refs

        def wait(self, refs, timeout):
            raise KeyboardInterrupt  # Ctrl-C while two candidates run

        def shutdown(self):
            pass

    config = config_from_dict(
        study_config(fault_zoo, tmp_path / "interrupted", workers={"count": 2})
    )
    with pytest.raises(KeyboardInterrupt):
        run_study(config, progress=False, pool=InterruptedPool)
    trials = optuna.load_study(
        study_name="night", storage=records.open_storage(tmp_path / "interrupted", None)
    ).trials
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    # the two running, and those proposed ahead for the workers (up to one each)
    running = [t for t in stopped if "before the candidate finished" in t.user_attrs["error"]]
    ahead = [t for t in stopped if "before a worker took the candidate" in t.user_attrs["error"]]
    assert len(running) == 2 and len(ahead) <= 2 and len(stopped) == len(running) + len(ahead)
    for t in stopped:
        retry = [r for r in trials if r.user_attrs.get("retry_of") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.WAITING
        assert (
            retry[0].system_attrs["fixed_params"] == t.params
            and retry[0].user_attrs["baseline"] == t.user_attrs["baseline"]
        )


def test_non_finite_objective_values_fail_the_trial_with_the_reason(fault_zoo, tmp_path):
    s = setup(fault_zoo, tmp_path / "nan", baselines=False)
    trial = s.study.ask()
    params = suggest(trial, s.space)
    result = WorkerResult(worker="w", metrics={"toy_pair/acc": float("nan"), "toy_next/acc": 0.5})
    flight = Flight(trial, 0, params, {})
    assert finish(s, flight, result, *judge(s, flight, result)) is False
    assert s.study.trials[trial.number].state == TrialState.FAIL
    record = json.loads((tmp_path / "nan" / "trials" / f"{trial.number}.json").read_text())
    assert record["state"] == "FAIL" and "not finite" in record["error"]


# --- security defaults ----------------------------------------------------------------------------


CUSTOM_CODE = """from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("ran")


class CustomConfig(LlamaConfig):
    pass


class CustomLlama(LlamaForCausalLM):
    config_class = CustomConfig
"""


def test_a_config_without_trust_remote_code_never_runs_a_model_folder_s_own_code(
    fault_zoo, tmp_path, monkeypatch
):
    """A base whose config.json maps the auto classes to a modeling file of its own: the worker of a
    config that does not mention trust_remote_code loads the stock Llama class and the file never
    runs; with trust_remote_code: true it runs (so the folder really carries code that would run).
    (A pickle-only model under a config without allow_pickle: tests/test_bad_input.py, exit 2.)"""
    import transformers.dynamic_module_utils as dynamic

    from merging import load_live_model
    from search.workers import CandidateWorker

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    base, marker = tmp_path / "custom", tmp_path / "custom-code-ran"
    shutil.copytree(fault_zoo.base, base)
    (base / "custom_llama.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    hf_config = json.loads((base / "config.json").read_text())
    hf_config["auto_map"] = {
        "AutoConfig": "custom_llama.CustomConfig",
        "AutoModelForCausalLM": "custom_llama.CustomLlama",
    }
    (base / "config.json").write_text(json.dumps(hf_config))

    data = study_config(fault_zoo, tmp_path / "study", models={"base": str(base)})
    assert "trust_remote_code" not in data["models"]
    worker = CandidateWorker(worker_spec(config_from_dict(data)))
    assert type(worker.engine.model).__name__ == "LlamaForCausalLM"
    assert not marker.exists()

    trusted = config_from_dict(
        study_config(
            fault_zoo, tmp_path / "study", models={"base": str(base), "trust_remote_code": True}
        )
    )
    spec = worker_spec(trusted)
    assert (
        type(
            load_live_model(spec.models.base, trust_remote_code=spec.models.trust_remote_code)
        ).__name__
        == "CustomLlama"
    )
    assert marker.exists()


def test_start_ray_keeps_a_local_ray_on_localhost_only(monkeypatch):
    """The node address start_ray gives Ray stays 127.0.0.1 (Ray would turn it into this machine's
    network address and listen everywhere); checked for real on a running study in
    test_worker_death_evaluation_error_timeout_and_nan_fail_only_their_trial."""
    import ray
    from ray._private import ray_constants, services

    from search.pool import start_ray

    seen = {}

    def fake_init(**kwargs):  # what Ray does with the address first, without starting it
        seen["ip"] = services.resolve_ip_for_localhost(kwargs["_node_ip_address"])
        seen["switch"] = ray_constants.ENABLE_RAY_CLUSTER

    monkeypatch.setattr(ray, "init", fake_init)
    switch = ray_constants.ENABLE_RAY_CLUSTER
    start_ray(None, 1, 0)
    assert seen["ip"] == "127.0.0.1"
    assert switch == ray_constants.ENABLE_RAY_CLUSTER  # restored afterwards


@pytest.mark.parametrize(
    "url, shown",
    [
        (
            "postgresql://basin:s3cret@db.example:5432/studies",
            "postgresql://basin:***@db.example:5432/studies",
        ),
        (
            "postgresql+psycopg2://basin:p@ss:w/rd@db/studies",
            "postgresql+psycopg2://basin:***@db/studies",
        ),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("mysql://u:s3cret@h/db?password=s3cret&x=1", "mysql://u:***@h/db?password=***&x=1"),
        ("sqlite:////tmp/s3cret/study.db", "sqlite:////tmp/s3cret/study.db"),
        (
            "error from postgresql://basin:s3cret@h/db: refused",
            "error from postgresql://basin:***@h/db: refused",
        ),
    ],
)
def test_storage_urls_are_printed_without_passwords(url, shown):
    assert records.redact(url) == shown


@pytest.mark.slow
def test_sigkills_of_a_multi_fidelity_study_between_rungs_lose_nothing(fault_zoo, tmp_path):
    """SIGKILL a multi-fidelity `basin run`/`resume` just after a candidate is promoted (held
    between rungs), and during start-up; each resume fails and requeues the trials it held, and the
    study finishes its budget of COMPLETE plus PRUNED trials with nothing lost or counted twice."""
    from tests.support.scenarios import MF_RUNGS

    r = kill_and_resume(
        fault_zoo,
        tmp_path,
        kills=3,
        n_trials=14,
        moments=("rung", "early", "rung"),
        early_s=(0.5, 6.0),
        fidelity=MF_RUNGS,
    )
    assert r.kills == 3 and sum(m.startswith("rung") for m in r.moments) == 2
    assert r.leaked == [] and r.lost == [] and r.integrity == []
    assert r.final_rc == 0 and r.complete == r.budget
    assert r.held_between_rungs >= 1 and r.not_requeued == [] and r.requeued >= len(set(r.held))
