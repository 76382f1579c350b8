"""Every failure speaks basin's language: one `basin: error:` line that names the cause and the way
out, a non-zero exit, no Python traceback, and nothing half-made left behind."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState
from safetensors.torch import load_file, save_file

from search.folder import load_study_folder
from tests.support.fault_zoo import study_config, write_config
from tests.support.runs import BASIN, ENV, HANG_S, REPO, kill_tree, start_basin, tail, wait_for


def basin(*argv: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """The console script itself, as a user runs it."""
    return subprocess.run(
        [str(BASIN), *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def speaks(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("basin: error:") == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    for word in words:
        assert word in proc.stderr, f"{word!r} not in: {proc.stderr}"


@pytest.fixture(scope="module")
def damaged(fault_zoo, tmp_path_factory) -> Path:
    """A copy of a fine-tune with one NaN in one tensor."""
    folder = tmp_path_factory.mktemp("damaged") / "ft-nan"
    shutil.copytree(fault_zoo.finetunes[0], folder)
    weights = load_file(folder / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and "mlp" in n)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.slow
def test_a_fine_tune_with_nan_is_refused_by_validate_and_by_run_before_any_trial(
    fault_zoo, damaged, tmp_path
):
    folder = tmp_path / "night"
    data = study_config(fault_zoo, folder)
    data["models"]["finetunes"] = [str(damaged), *map(str, fault_zoo.finetunes[1:])]
    config = write_config(tmp_path / "nan.yaml", data)

    speaks(basin("validate", str(config), "--quiet"), 2, "contains NaN or inf", str(damaged))
    assert basin("validate", str(config), "--headers-only").returncode == 0  # headers are fine

    run = basin("run", str(config), "--quiet", timeout=HANG_S)
    speaks(run, 2, "worker 0 cannot start", "contains NaN or inf", "nothing was kept")
    assert not folder.exists()
    assert "actor died" not in run.stderr


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_and_resume_finishes_the_budget(fault_zoo, tmp_path):
    """What a scheduler's SIGTERM does: the candidate in flight is queued again, finished trials
    stay, exit 143 with the folder's own path, no stack dump; `basin resume` then finishes exactly
    the budget."""
    folder, log = tmp_path / "night", tmp_path / "run.log"
    config = write_config(
        tmp_path / "night.yaml",
        study_config(fault_zoo, folder, hooked=True, baselines=False, budget={"n_trials": 3}),
    )
    fault_zoo.busy.unlink(missing_ok=True)
    fault_zoo.set_mode("hold")  # evaluations wait: a candidate is surely in flight
    try:
        proc = start_basin(["run", str(config)], log)
        assert wait_for(fault_zoo.busy.exists, proc, "a candidate in flight", log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HANG_S) == 143, tail(log)
    finally:
        fault_zoo.set_mode("ok")
        kill_tree(proc)
    out = log.read_text()
    assert "terminated (SIGTERM)" in out and f"basin resume {folder}" in out, out
    assert "Traceback" not in out and "DIR" not in out
    _, study = load_study_folder(folder)
    (stopped,) = study.get_trials(states=(TrialState.FAIL,))
    assert "interrupted" in stopped.user_attrs["error"]
    assert [
        t.user_attrs.get("retry_of") for t in study.get_trials(states=(TrialState.WAITING,))
    ] == [stopped.number]

    resumed = basin("resume", str(folder), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    _, study = load_study_folder(folder)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3


@contextlib.contextmanager
def small_disk(root: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at root: a disk that really fills (the tests run as root, as CI does)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk; returns the file holding them."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.slow
def test_a_full_disk_during_an_export_names_the_path_and_leaves_nothing(fault_zoo, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base": str(fault_zoo.base),
                "models": [{"path": str(p), "weight": 0.5} for p in fault_zoo.finetunes],
            }
        )
    )
    size = (fault_zoo.base / "model.safetensors").stat().st_size
    with small_disk(tmp_path / "disk", f"{max(16, size // 2048)}k") as disk:
        merged = basin("merge", str(recipe), "--out", str(disk / "merged"), "--quiet")
        speaks(merged, 1, "no space left on the device", "free some space")
        assert list(disk.iterdir()) == []  # no half-written output, no temporary folder


@pytest.mark.slow
def test_a_full_disk_during_a_study_keeps_the_finished_trials_and_resume_goes_on(
    fault_zoo, tmp_path
):
    """The disk fills while a candidate is in flight: the run ends with the folder and the way on,
    and once space is freed `basin resume` finishes exactly the budget."""
    with small_disk(tmp_path / "disk", "4m") as disk:
        folder, log = disk / "night", tmp_path / "run.log"
        config = write_config(
            tmp_path / "night.yaml",
            study_config(fault_zoo, folder, hooked=True, baselines=False, budget={"n_trials": 4}),
        )
        fault_zoo.busy.unlink(missing_ok=True)
        fault_zoo.set_mode("hold")
        try:
            proc = start_basin(["run", str(config)], log)
            assert wait_for(fault_zoo.busy.exists, proc, "a candidate in flight", log)
            filler = fill(disk)
            fault_zoo.set_mode("ok")
            assert proc.wait(timeout=HANG_S) == 1, tail(log)
        finally:
            fault_zoo.set_mode("ok")
            kill_tree(proc)
        out = log.read_text()
        assert out.count("basin: error:") == 1 and "Traceback" not in out, out
        assert "no space left on the device" in out and f"basin resume {folder}" in out, out
        filler.unlink()
        resumed = basin("resume", str(folder), "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        _, study = load_study_folder(folder)
        assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
        assert len(list((folder / "trials").glob("*.json"))) == len(study.trials)
