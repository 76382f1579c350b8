"""Several runners, one study, through a real PostgreSQL server started by the test
(tests/support/postgres.py).

Each `basin run` has its own study folder and its own local Ray, as runners on different machines
would; only the database is shared.
"""

from __future__ import annotations

import optuna
import pytest

from search import records
from tests.support.fault_zoo import study_config, write_config
from tests.support.many_machines import shared_study, silent_runner
from tests.support.postgres import postgres_server
from tests.support.runs import start_basin, tail, wait_runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with postgres_server() as s:
        yield s


def test_three_runners_on_their_own_folders_share_one_postgres_study_exactly(
    fault_zoo, server, tmp_path
):
    """Together they finish exactly n_trials COMPLETE trials, no number twice, no params proposed
    twice (two runners opening the study at the same trial count once drew the same params),
    baselines queued once, and every trial's record is in the folder of the runner that ran it."""
    r = shared_study(fault_zoo, tmp_path, server.url(), hosts=3, n_trials=14)
    assert r.rcs == (0, 0, 0) and r.leaked == [], r.integrity
    assert r.numbers_ok and r.complete == r.budget and r.overshoot == 0
    assert len(r.by_runner) == 3, f"every runner takes part: {r.by_runner}"
    assert r.duplicates == [] and r.records_elsewhere == [] and r.integrity == []
    for log in tmp_path.glob("host*.log"):
        assert server.password not in log.read_text()


def test_runners_with_proposal_processes_share_one_postgres_study_exactly(
    fault_zoo, server, tmp_path
):
    """Two runners of two workers, each proposing from two processes of its own: every proposal
    is claimed for the runner whose workers run it, and the study is as exact as without them."""
    r = shared_study(
        fault_zoo,
        tmp_path,
        server.url(),
        hosts=2,
        n_trials=14,
        name="shared-proposers",
        sections={"workers": {"count": 2}, "sampler": {"proposers": 2}},
    )
    assert r.rcs == (0, 0) and r.leaked == [], r.integrity
    assert r.numbers_ok and r.complete == r.budget and r.overshoot == 0
    assert len(r.by_runner) == 2, f"every runner takes part: {r.by_runner}"
    assert r.duplicates == [] and r.records_elsewhere == [] and r.integrity == []


def test_a_wrong_password_is_refused_without_printing_it(fault_zoo, server, tmp_path, capsys):
    from search.cli import main

    wrong = server.url().replace(server.password, "not-the-pw-123")
    config = write_config(
        tmp_path / "bad.yaml",
        study_config(
            fault_zoo,
            tmp_path / "bad",
            study={"name": "bad", "output_dir": str(tmp_path / "bad"), "storage": wrong},
        ),
    )
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be opened" in err and "password authentication failed" in err
    assert "not-the-pw-123" not in err and "***" in err
    assert not (tmp_path / "bad").exists()


def test_a_password_from_the_environment_stays_out_of_the_study_folder(
    fault_zoo, server, tmp_path, monkeypatch
):
    from search.config import config_from_dict
    from search.folder import load_study_folder
    from search.setup import setup_study

    monkeypatch.setenv("BASIN_TEST_PG_PASSWORD", server.password)
    url = server.url().replace(server.password, "${BASIN_TEST_PG_PASSWORD}")
    folder = tmp_path / "env"
    setup = setup_study(
        config_from_dict(
            study_config(
                fault_zoo, folder, study={"name": "env", "output_dir": str(folder), "storage": url}
            )
        ),
        resume=False,
    )
    assert setup.study.get_trials(deepcopy=False)  # the baselines, queued in the database
    snapshot = (folder / records.CONFIG_FILE).read_text()
    assert "${BASIN_TEST_PG_PASSWORD}" in snapshot and server.password not in snapshot
    _, again = load_study_folder(folder)  # status, report and export reopen it the same way
    assert len(again.get_trials(deepcopy=False)) == len(setup.study.get_trials(deepcopy=False))


def test_a_runner_that_dies_is_found_silent_and_its_trial_requeued_by_the_other(
    fault_zoo, server, tmp_path
):
    """Runner A is SIGKILLed (with its Ray) while it holds a trial; runner B, on its own folder,
    finds the trial's heartbeat silent past the grace period (2 x heartbeat_s), fails it and queues
    its params again once, and finishes the budget. Nothing here depends on A's host or pid."""
    r = silent_runner(fault_zoo, tmp_path, server.url(), heartbeat_s=2, n_trials=12)
    assert r.rc == 0 and r.held and r.not_silent == []
    assert r.numbers_ok and r.complete == r.budget and r.running_left == 0
    assert set(r.retries.values()) == {1}
    # never within the grace period
    assert len(r.requeue_s) == len(r.held) and all(s >= r.grace_s for s in r.requeue_s)


def test_status_of_a_postgres_study_shows_its_url_without_the_password(
    fault_zoo, server, tmp_path, capsys
):
    from search.cli import main
    from search.config import config_from_dict
    from search.setup import setup_study

    folder = tmp_path / "status"
    setup_study(
        config_from_dict(
            study_config(
                fault_zoo,
                folder,
                study={"name": "status", "output_dir": str(folder), "storage": server.url()},
            )
        ),
        resume=False,
    )
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert (
        server.url(with_password=False).replace("basin@", "basin:***@") in out
        and server.password not in out
    )


def _run_one(zoo, tmp_path, server, name: str, n_trials: int, **sections):
    folder = tmp_path / "runner"
    config = write_config(
        tmp_path / "runner.yaml",
        study_config(
            zoo,
            folder,
            name=name,
            budget={"n_trials": n_trials},
            study={"name": name, "output_dir": str(folder), "storage": server.url()},
            **sections,
        ),
    )
    log = tmp_path / "runner.log"
    rcs, leaked = wait_runs([start_basin(["run", str(config)], log)], folder)
    assert rcs == (0,) and leaked == [], tail(log)
    return folder, config


def test_a_study_attached_on_another_machine_shows_status_pareto_report_and_exports_the_same_model(
    fault_zoo, server, tmp_path, monkeypatch, capsys
):
    """A folder rebuilt from the database alone (`basin attach`) gives the runner's records, its
    front and a bit-identical export, and its config keeps the password out."""
    from safetensors.torch import load_file

    from search.cli import main

    runner, _ = _run_one(fault_zoo, tmp_path, server, "attached", 6)
    monkeypatch.setenv("BASIN_TEST_PG_PASSWORD", server.password)
    url = server.url().replace(server.password, "${BASIN_TEST_PG_PASSWORD}")
    here = tmp_path / "laptop"
    assert main(["attach", url, "--study", "attached", "--out", str(here)]) == 0
    assert "6 trial records written" in capsys.readouterr().out
    snapshot = (here / records.CONFIG_FILE).read_text()
    assert "${BASIN_TEST_PG_PASSWORD}" in snapshot and server.password not in snapshot
    theirs, ours = records.read_trial_records(runner), records.read_trial_records(here)
    assert set(ours) == set(theirs)
    for n, rec in theirs.items():
        for key in ("state", "params", "recipe", "metrics", "values", "worker", "baseline"):
            assert ours[n][key] == rec[key], (n, key)
    assert main(["status", str(here)]) == 0 and main(["pareto", str(runner)]) == 0
    status_and_front_there = capsys.readouterr().out
    assert main(["pareto", str(here)]) == 0
    # the same front, whichever folder shows it
    assert capsys.readouterr().out in status_and_front_there
    assert (
        main(["report", str(here), "--no-heldout", "--quiet"]) == 0
        and (here / "report.html").is_file()
    )
    best = max(theirs.values(), key=lambda r: sum(r["values"]))["number"]
    for folder in (runner, here):
        assert (
            main(
                [
                    "export",
                    str(folder),
                    "--trial",
                    str(best),
                    "--out",
                    str(folder / "model"),
                    "--quiet",
                ]
            )
            == 0
        )
    a, b = (
        load_file(runner / "model" / "model.safetensors"),
        load_file(here / "model" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # again: nothing new to write
    assert main(["attach", url, "--study", "attached", "--out", str(here)]) == 0
    assert "0 trial records written" in capsys.readouterr().out
    # a machine without the models (paths that exist only on the runners) attaches and reads the
    # study too
    study = optuna.load_study(study_name="attached", storage=server.url())
    stored = study.user_attrs["config"]
    study.set_user_attr(
        "config",
        {
            **stored,
            "models": {
                **stored["models"],
                "base": "/runners/only/base",
                "finetunes": [f"/runners/only/ft{i}" for i in range(3)],
            },
        },
    )
    laptop = tmp_path / "no-models"
    assert main(["attach", url, "--study", "attached", "--out", str(laptop)]) == 0
    assert main(["status", str(laptop)]) == 0 and main(["pareto", str(laptop)]) == 0
    out = capsys.readouterr().out
    assert "6 trial records written" in out and "done 6 of 6" in out
    assert records.read_trial_records(laptop)[best]["values"] == theirs[best]["values"]


def test_attach_refuses_a_literal_password_and_an_unknown_study_and_writes_nothing(
    fault_zoo, server, tmp_path, capsys, monkeypatch
):
    from search.cli import main

    out = tmp_path / "nothing"
    assert main(["attach", server.url(), "--study", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        "holds a password" in err and "${BASIN_DB_PASSWORD}" in err and server.password not in err
    )
    monkeypatch.setenv("PW", server.password)
    assert (
        main(
            [
                "attach",
                server.url().replace(server.password, "${PW}"),
                "--study",
                "no-such",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "no study named 'no-such'" in capsys.readouterr().err
    assert not out.exists()


def test_a_runner_with_another_config_cannot_join_the_study(fault_zoo, server, tmp_path, capsys):
    """Each runner has its own folder, so only the database can tell that a second runner's config
    would search another space under the same study name."""
    from search.cli import main

    _run_one(fault_zoo, tmp_path, server, "one-space", 2, baselines=False)
    other = tmp_path / "other"
    config = write_config(
        tmp_path / "other.yaml",
        study_config(
            fault_zoo,
            other,
            name="one-space",
            budget={"n_trials": 4},
            baselines=False,
            space={"methods": ["ties"], "lambda": [0.5, 1.5]},
            study={"name": "one-space", "output_dir": str(other), "storage": server.url()},
        ),
    )
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (
        "created with a different config (it differs in: space)" in err
        and server.password not in err
    )
    assert not other.exists()


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from search.setup import reach_storage
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported: ready at the start line
while not go.exists():
    time.sleep(0.001)
reach_storage(sys.argv[1])
"""


def test_runners_starting_together_on_a_fresh_database_create_its_tables_once(server, tmp_path):
    """Six runners open a fresh database at the same instant, as `basin run` does before its
    study lock: each creates Optuna's tables if missing, which raced (CREATE TYPE ... already
    exists) until the tables are made under the database's advisory lock."""
    import subprocess
    import sys
    import time

    url = server.create_database("fresh_at_once")
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, url, str(go), str(tmp_path / f"ready{i}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(6)
    ]
    while len(list(tmp_path.glob("ready*"))) < 6:
        assert all(p.poll() is None for p in procs), "a runner ended before the start"
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, "\n".join(outs)
    assert optuna.get_all_study_summaries(url) == []  # the schema is there and usable
