"""Nothing the user owns is destroyed: a study, a model the merge reads, the records of a study.

Each refusal is checked as the user meets it (the command line in-process): exit 2, one
`basin: error:` line naming the problem and the way out, and every byte of what was there before
still there after.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import warnings
from pathlib import Path

import pytest
import yaml

from search.cli import main
from search.config import config_from_dict
from search.loop import run_study
from search.pool import in_process_pool
from tests.support.fault_zoo import study_config


def fingerprint(root: Path) -> dict[str, str]:
    """Every file under `root` and a hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")  # lock files come and go
    }


def basin(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([*argv, "--quiet"] if argv[0] in ("export", "merge", "resume") else list(argv))
    return rc, err.getvalue()


def refused(rc: int, err: str, *words: str) -> None:
    assert rc == 2, err
    assert err.count("basin: error:") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{word!r} not in: {err}"


@pytest.fixture(scope="module")
def study(fault_zoo, tmp_path_factory) -> Path:
    """A finished study of 3 trials, run in this process: config, journal and trial records."""
    folder = tmp_path_factory.mktemp("owned") / "night"
    config = study_config(fault_zoo, folder, baselines=False, budget={"n_trials": 3})
    run_study(config_from_dict(config), progress=False, pool=in_process_pool)
    assert len(list((folder / "trials").glob("*.json"))) == 3
    return folder


@pytest.mark.slow
def test_export_with_force_never_replaces_a_study_or_a_folder_holding_one(study, tmp_path):
    before = fingerprint(study)
    rc, err = basin("export", str(study), "--trial", "0", "--out", str(study), "--force")
    refused(rc, err, f"--out {study} is a study", "never a study", "Choose another --out")
    rc, err = basin("export", str(study), "--trial", "0", "--out", str(study.parent), "--force")
    refused(rc, err, f"holds the study folder {study}", "never a study")
    rc, err = basin(
        "export", str(study), "--trial", "0", "--out", str(study), "--format", "mergekit"
    )
    refused(rc, err, "never a study")
    assert fingerprint(study) == before

    # a previous output is what --force is for
    out = tmp_path / "merged"
    assert basin("export", str(study), "--trial", "0", "--out", str(out))[0] == 0
    first = fingerprint(out)
    assert basin("export", str(study), "--trial", "0", "--out", str(out), "--force")[0] == 0
    assert fingerprint(out) == first and "model.safetensors" in first


@pytest.mark.slow
def test_merge_with_force_never_replaces_one_of_its_own_inputs(fault_zoo, tmp_path):
    inputs = tmp_path / "models"
    base, ft = inputs / "base", inputs / "ft"
    shutil.copytree(fault_zoo.base, base)
    shutil.copytree(fault_zoo.finetunes[0], ft)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base": str(base),
                "models": [{"path": str(ft), "weight": 1.0}],
            }
        )
    )
    before = fingerprint(inputs)
    refused(*basin("merge", str(recipe), "--out", str(ft), "--force"), "is an input of this merge")
    refused(*basin("merge", str(recipe), "--out", str(inputs), "--force"), f"holds {base}")
    assert fingerprint(inputs) == before


def test_an_output_under_a_regular_file_is_refused_by_name(fault_zoo, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "linear",
                "models": [{"path": str(p), "weight": 1.0} for p in fault_zoo.finetunes[:2]],
            }
        )
    )
    refused(
        *basin("merge", str(recipe), "--out", str(blocker / "merged")),
        f"{blocker} is a file, not a folder",
    )
    config = tmp_path / "study.yaml"
    data = study_config(fault_zoo, blocker / "night")
    config.write_text(yaml.safe_dump(data))
    refused(*basin("run", str(config)), "study.output_dir", f"{blocker} is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.slow
def test_resume_without_the_journal_keeps_the_records_and_says_so(study, tmp_path):
    copy = tmp_path / "night"
    shutil.copytree(study, copy)
    (copy / "journal.log").unlink()
    before = fingerprint(copy)
    rc, err = basin("resume", str(copy))
    refused(rc, err, "holds 3 trial records", "overwrite those records", "Restore the storage")
    assert fingerprint(copy) == before and not (copy / "journal.log").exists()


@pytest.mark.slow
def test_a_resume_that_runs_nothing_leaves_the_stored_config_as_it_was(study, capsys):
    snapshot = (study / "config.yaml").read_text()
    rc, err = basin("resume", str(study), "--set", "budget.n_trials=1")
    assert rc == 0, err
    assert "the budget is spent (3 finished trials)" in err and "left as it was" in err
    assert (study / "config.yaml").read_text() == snapshot
    assert main(["status", str(study)]) == 0
    assert "3 of 3" in capsys.readouterr().out


@pytest.mark.slow
def test_an_exported_folder_is_as_open_as_the_users_umask_makes_new_folders(study, tmp_path):
    """Not the private 0700 of the temporary folder it is written in."""
    old = os.umask(0o027)
    try:
        assert basin("export", str(study), "--trial", "0", "--out", str(tmp_path / "m"))[0] == 0
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "m").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750


def test_a_recipe_states_only_what_its_method_reads_or_what_was_set():
    from merging import dump_recipe, recipe_from_dict

    base = {"method": "task_arithmetic", "base": "B", "models": [{"path": "a", "weight": 0.5}]}
    text = dump_recipe(recipe_from_dict(base))
    assert "density" not in text and "gamma" not in text and "weight: 0.5" in text
    ties = dump_recipe(recipe_from_dict({**base, "method": "ties"}))
    assert "density: 1.0" in ties  # ties reads it: its default is stated
    set_anyway = {**base, "models": [{"path": "a", "weight": 0.5, "density": 0.4}]}
    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe_from_dict(set_anyway)))) == (
        recipe_from_dict(set_anyway)
    )


@pytest.mark.slow
def test_optuna_s_own_tools_read_the_study_s_metric_names(study):
    """optuna-dashboard and optuna.visualization label the axes with these, not "Objective 0"."""
    import optuna

    from search.folder import load_study_folder

    _, loaded = load_study_folder(study)
    assert loaded.metric_names == ["toy_pair/acc", "toy_next/acc"]
    import matplotlib

    matplotlib.use("Agg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_pareto_front(loaded)
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("toy_pair/acc", "toy_next/acc")
