"""The command line's own words: version, help, quiet runs, budgets and summaries as the user reads
them, and the report's refusals and interrupts."""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser, main
from search.config import config_from_dict
from search.loop import run_study
from search.pool import in_process_pool
from tests.support.fault_zoo import study_config, write_config
from tests.support.runs import HANG_S, kill_tree, start_basin, tail, wait_for


def test_basin_version_names_the_installed_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"basin {version('basin-merge')}"


def test_every_option_of_every_command_says_what_it_does():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    silent = [
        f"{name} {action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help and action.dest != "help"
    ]
    assert silent == []


@pytest.fixture(scope="module")
def finished(fault_zoo, tmp_path_factory) -> Path:
    """A finished study of one method (task arithmetic), its tasks with the fault hook."""
    folder = tmp_path_factory.mktemp("cli") / "night"
    data = study_config(
        fault_zoo,
        folder,
        hooked=True,
        baselines=False,
        space={"methods": ["task_arithmetic"], "lambda": [0.5, 1.5]},
        budget={"n_trials": 2},
    )
    run_study(config_from_dict(data), progress=False, pool=in_process_pool)
    return folder


def test_the_summary_names_the_method_of_a_one_method_study_and_its_columns(finished, capsys):
    from search.folder import load_study_folder
    from search.summary import print_summary

    _, study = load_study_folder(finished)
    print_summary(finished, study)
    out = capsys.readouterr().out
    assert "(task_arithmetic): toy_pair/acc " in out and ", toy_next/acc " in out
    assert "(-)" not in out


def test_a_budget_of_items_alone_has_no_trial_cap_and_status_counts_items(finished, capsys):
    data = yaml.safe_load((finished / "config.yaml").read_text())
    data["budget"] = {"items": 100000}
    assert config_from_dict(data).budget.n_trials is None
    assert main(["status", str(finished)]) == 0  # its stored budget: 2 trials
    assert "done 2 of 2" in capsys.readouterr().out
    assert main(["resume", str(finished), "--set", "budget.items=100000", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", str(finished)]) == 0
    assert "done 2 of 2" in capsys.readouterr().out  # nothing ran: the stored config stays


def test_validate_states_the_budget_as_the_run_applies_it(fault_zoo, tmp_path, capsys):
    data = study_config(fault_zoo, tmp_path / "v")
    data["budget"] = {"items": 5000, "timeout": 60}  # no n_trials: not capped at 50 trials
    config = write_config(tmp_path / "v.yaml", data)
    assert main(["validate", str(config), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "budget: 5000 scored items or 60 s of search, whichever comes first" in out


def test_tqdm_disable_quiets_the_bars_as_quiet_does(fault_zoo, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "q.yaml", study_config(fault_zoo, tmp_path / "q"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["validate", str(config)]) == 0
    assert "checking values" not in capsys.readouterr().err
    monkeypatch.delenv("TQDM_DISABLE")
    assert main(["validate", str(config)]) == 0
    assert "checking values" in capsys.readouterr().err  # the bar that TQDM_DISABLE hid


def test_a_report_of_a_study_without_a_finished_trial_is_refused_by_name(fault_zoo, tmp_path):
    from search.setup import setup_study

    folder = tmp_path / "empty"
    setup_study(config_from_dict(study_config(fault_zoo, folder)), resume=False)
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        assert main(["report", str(folder), "--quiet"]) == 2
    text = buffer.getvalue()
    assert text.count("basin: error:") == 1 and "no complete trial yet" in text
    assert f"basin status {folder}" in text and "Traceback" not in text
    assert not (folder / "report.html").exists()


@pytest.mark.slow
def test_ctrl_c_during_a_report_says_the_held_out_scores_are_kept(fault_zoo, finished, tmp_path):
    """The held-out scoring is stopped in the middle (its evaluation held by the fault hook)."""
    log = tmp_path / "report.log"
    fault_zoo.busy.unlink(missing_ok=True)
    fault_zoo.set_mode("hold")
    try:
        proc = start_basin(["report", str(finished)], log)
        assert wait_for(fault_zoo.busy.exists, proc, "held-out scoring under way", log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_S) == 130, tail(log)
    finally:
        fault_zoo.set_mode("ok")
        kill_tree(proc)
    out = log.read_text()
    assert "held-out scores finished so far are kept" in out, out
    assert f"basin report {finished}` continues" in out and "basin resume" not in out, out
    assert "Traceback" not in out


def test_pareto_where_keeps_the_trials_that_meet_every_condition_with_export_commands(
    finished, capsys
):
    from search.folder import load_study_folder

    _, study = load_study_folder(finished)
    pair = sorted(t.user_attrs["metrics"]["toy_pair/acc"] for t in study.trials)
    cut = pair[-1]  # only the best on toy_pair meet it
    where = f"toy_pair/acc>={cut}"  # the full name: 'pair' alone also names toy_pair/acc_norm
    assert main(["pareto", str(finished), "--where", where, "--sort", "next"]) == 0
    out = capsys.readouterr().out
    meeting = [t for t in study.trials if t.user_attrs["metrics"]["toy_pair/acc"] >= cut]
    assert f"{len(meeting)} of 2 complete trials meet toy_pair/acc>={cut:g}" in out
    for t in meeting:
        assert f"basin export {finished} --trial {t.number} --out merged-{t.number}" in out
    assert main(["pareto", str(finished), "--where", "next>=2"]) == 0
    assert "0 of 2 complete trials meet" in capsys.readouterr().out
    assert main(["pareto", str(finished), "--where", "acc>=0.5"]) == 2  # names two metrics
    err = capsys.readouterr().err
    assert "'acc' names several metrics" in err and "Known: toy_next/acc, toy_pair/acc," in err
    assert main(["pareto", str(finished), "--where", "toy_pair/acc=>0.5"]) == 2
    assert "expected METRIC OP VALUE" in capsys.readouterr().err
