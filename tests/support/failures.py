"""Failures that must speak basin's language, on the real command line: SIGTERM to `basin run`, a
disk that fills during a merge and during a study, a fine-tune holding NaN.

Each scenario drives the `basin` console script in subprocesses on a FaultZoo and returns a report
of what it saw; tests/test_failures_speak.py asserts on the reports and
tests/benchmarks/reliability.py prints them. The full disks are real: a small tmpfs mounted for
the scenario, which needs root. Every step waits for an event (a file, a process exit), never for
a fixed time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from optuna.trial import TrialState

from search.folder import load_study_folder
from tests.support.fault_zoo import FaultZoo, study_config, write_config
from tests.support.runs import BASIN, ENV, HANG_S, REPO, kill_tree, start_basin, wait_for


def basin(*argv: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    """The console script itself, as a user runs it."""
    return subprocess.run(
        [str(BASIN), *argv], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Said:
    """How a command ended and what it said: `text` is its stderr, or the whole log of a run."""

    rc: int | None
    text: str
    out: str = ""  # its stdout, when kept apart from text
    words: tuple[str, ...] = ()  # the message must name these
    absent: tuple[str, ...] = ()  # ... and must not show these

    @classmethod
    def of(
        cls, proc: subprocess.CompletedProcess, *words: str, absent: tuple[str, ...] = ()
    ) -> Said:
        return cls(proc.returncode, proc.stderr, proc.stdout, words, absent)

    @property
    def error_lines(self) -> int:
        return self.text.count("basin: error:")

    @property
    def traceback(self) -> bool:
        return "Traceback" in self.text + self.out

    @property
    def missing(self) -> list[str]:
        return [w for w in self.words if w not in self.text]

    @property
    def shown(self) -> list[str]:
        return [w for w in self.absent if w in self.text]

    def problems(self, *, error_line: bool = True) -> list[str]:
        """What keeps the message from being basin's: one `basin: error:` line (unless the ending
        is no error) naming every word, nothing absent shown, no traceback."""
        out = [f"{self.error_lines} error lines"] if error_line and self.error_lines != 1 else []
        out += ["a traceback"] if self.traceback else []
        out += [f"lacks {w!r}" for w in self.missing]
        out += [f"shows {w!r}" for w in self.shown]
        return out


def complete_trials(folder: Path) -> tuple[int, int]:
    """(COMPLETE trials, all trials) in the study of `folder`."""
    _, study = load_study_folder(folder)
    return len(study.get_trials(states=(TrialState.COMPLETE,))), len(study.trials)


# --- SIGTERM to `basin run` -----------------------------------------------------------------------


@dataclass
class SigtermReport:
    budget: int
    in_flight: bool = False  # a candidate was being evaluated when the signal came
    run: Said | None = None  # the run's exit and log
    stopped: dict[int, str] = field(default_factory=dict)  # FAIL trials: number -> error
    requeued: list[int | None] = field(default_factory=list)  # retry_of of the WAITING trials
    resumed: Said | None = None
    complete: int = 0  # after the resume
    seconds: float = 0.0

    @property
    def requeued_in_flight(self) -> int:
        """Trials stopped by the signal and queued again."""
        return sum(
            n in self.requeued for n, error in self.stopped.items() if "interrupted" in error
        )


def sigterm_run(zoo: FaultZoo, root: Path, *, n_trials: int = 3) -> SigtermReport:
    """What a scheduler's SIGTERM does to `basin run` while a candidate is in flight, then
    `basin resume` of the folder it names."""
    started = time.monotonic()
    folder, log = root / "night", root / "run.log"
    config = write_config(
        root / "night.yaml",
        study_config(zoo, folder, hooked=True, baselines=False, budget={"n_trials": n_trials}),
    )
    report = SigtermReport(budget=n_trials)
    zoo.busy.unlink(missing_ok=True)
    zoo.set_mode("hold")  # evaluations wait: a candidate is surely in flight
    proc = None
    try:
        proc = start_basin(["run", str(config)], log)
        report.in_flight = wait_for(zoo.busy.exists, proc, "a candidate in flight", log)
        if report.in_flight:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=HANG_S)
    finally:
        zoo.set_mode("ok")
        if proc is not None:
            kill_tree(proc)
    # "DIR": a placeholder where the folder's own path belongs
    report.run = Said(
        rc,
        log.read_text(),
        words=("terminated (SIGTERM)", f"basin resume {folder}"),
        absent=("DIR",),
    )
    if not report.in_flight:
        report.seconds = time.monotonic() - started
        return report
    _, study = load_study_folder(folder)
    report.stopped = {
        t.number: t.user_attrs.get("error", "") for t in study.get_trials(states=(TrialState.FAIL,))
    }
    report.requeued = [
        t.user_attrs.get("retry_of") for t in study.get_trials(states=(TrialState.WAITING,))
    ]
    report.resumed = Said.of(basin("resume", str(folder), "--quiet"))
    report.complete, _ = complete_trials(folder)
    report.seconds = time.monotonic() - started
    return report


# --- a disk that fills ----------------------------------------------------------------------------


def can_mount() -> bool:
    """Whether small_disk can mount its tmpfs (it needs root, as CI runs)."""
    return os.geteuid() == 0


@contextlib.contextmanager
def small_disk(root: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` at root: a disk that really fills."""
    if not can_mount():
        raise PermissionError("mounting a small tmpfs needs root")
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
            if exc.errno != errno.ENOSPC:
                raise
    return filler


@dataclass
class FullMergeReport:
    merge: Said
    left: list[str]  # what the disk holds afterwards: no output, no temporary folder
    seconds: float


def full_disk_merge(zoo: FaultZoo, root: Path) -> FullMergeReport:
    """`basin merge` onto a disk with room for half the model."""
    recipe = root / "recipe.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text(
        yaml.safe_dump(
            {
                "method": "task_arithmetic",
                "base": str(zoo.base),
                "models": [{"path": str(p), "weight": 0.5} for p in zoo.finetunes],
            }
        )
    )
    size = (zoo.base / "model.safetensors").stat().st_size
    with small_disk(root / "disk", f"{max(16, size // 2048)}k") as disk:
        started = time.monotonic()
        merged = basin("merge", str(recipe), "--out", str(disk / "merged"), "--quiet")
        seconds = time.monotonic() - started
        left = sorted(p.name for p in disk.iterdir())
    return FullMergeReport(
        Said.of(merged, "no space left on the device", "free some space"), left, seconds
    )


@dataclass
class FullStudyReport:
    budget: int
    in_flight: bool = False  # a candidate was being evaluated when the disk filled
    run: Said | None = None  # the run's exit and log
    resumed: Said | None = None  # once space is freed
    complete: int = 0  # after the resume
    trials: int = 0
    records: int = 0  # trial records in the folder
    seconds: float = 0.0


def full_disk_study(zoo: FaultZoo, root: Path, *, n_trials: int = 4) -> FullStudyReport:
    """The disk under the study folder fills while a candidate is in flight; then space is freed
    and `basin resume` goes on."""
    started = time.monotonic()
    report = FullStudyReport(budget=n_trials)
    with small_disk(root / "disk", "4m") as disk:
        folder, log = disk / "night", root / "run.log"
        config = write_config(
            root / "night.yaml",
            study_config(zoo, folder, hooked=True, baselines=False, budget={"n_trials": n_trials}),
        )
        zoo.busy.unlink(missing_ok=True)
        zoo.set_mode("hold")
        filler = None
        proc = None
        try:
            proc = start_basin(["run", str(config)], log)
            report.in_flight = wait_for(zoo.busy.exists, proc, "a candidate in flight", log)
            if report.in_flight:
                filler = fill(disk)
            zoo.set_mode("ok")
            rc = proc.wait(timeout=HANG_S)
        finally:
            zoo.set_mode("ok")
            if proc is not None:
                kill_tree(proc)
        report.run = Said(
            rc, log.read_text(), words=("no space left on the device", f"basin resume {folder}")
        )
        if filler is None:
            report.seconds = time.monotonic() - started
            return report
        filler.unlink()
        report.resumed = Said.of(basin("resume", str(folder), "--quiet"))
        report.complete, report.trials = complete_trials(folder)
        report.records = len(list((folder / "trials").glob("*.json")))
    report.seconds = time.monotonic() - started
    return report


# --- a fine-tune holding NaN ----------------------------------------------------------------------


def damage(model: Path, out: Path) -> Path:
    """A copy of `model` with one NaN in one tensor."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = load_file(out / "model.safetensors")
    name = next(n for n, t in weights.items() if t.is_floating_point() and "mlp" in n)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[3] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@dataclass
class DamagedReport:
    damaged: Path  # the fine-tune holding NaN
    validate: Said
    headers_only: Said  # `validate --headers-only`, which does not read the tensors
    run: Said
    folder_left: bool  # the study folder exists after the refused run
    seconds: float


def damaged_finetune(zoo: FaultZoo, root: Path) -> DamagedReport:
    """A study whose fine-tunes include one holding NaN: `basin validate`, then `basin run`, which
    must stop before any trial."""
    started = time.monotonic()
    damaged = damage(zoo.finetunes[0], root / "ft-nan")
    folder = root / "night"
    data = study_config(zoo, folder)
    data["models"]["finetunes"] = [str(damaged), *map(str, zoo.finetunes[1:])]
    config = write_config(root / "nan.yaml", data)
    validate = Said.of(
        basin("validate", str(config), "--quiet"), "contains NaN or inf", str(damaged)
    )
    headers_only = Said.of(basin("validate", str(config), "--headers-only"))
    run = Said.of(
        basin("run", str(config), "--quiet"),
        "worker 0 cannot start",
        "contains NaN or inf",
        "nothing was kept",
        absent=("actor died",),
    )
    return DamagedReport(
        damaged, validate, headers_only, run, folder.exists(), time.monotonic() - started
    )
