"""What an output may replace: a previous output, never a study or a model the merge reads.

`--force` lets `basin merge` and `basin export` replace an existing output. Pointed at the wrong
folder it would delete a night's study or one of the very models being merged, so before anything
is written the output is checked against what the user owns: a study folder, an input of the
merge, or a folder holding either is refused by name, with or without --force.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from search.config import ConfigError
from search.records import CONFIG_FILE, JOURNAL_FILE

STUDY_MARKS = (JOURNAL_FILE, "trials")  # beside config.yaml, what makes a folder a study folder


def is_study_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / m).exists() for m in STUDY_MARKS)


def _studies_under(root: Path, limit: int = 10_000) -> Iterable[Path]:
    """Study folders at or below `root` (a bounded walk: an output is rarely a deep tree)."""
    for seen, (here, dirs, _) in enumerate(os.walk(root)):
        if seen >= limit:
            return
        if is_study_folder(Path(here)):
            yield Path(here)
            dirs.clear()


def check_writable_under(path: Path, what: str) -> None:
    """Raise ConfigError when the nearest existing folder above `path` is in fact a file."""
    for parent in Path(path).expanduser().resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{what} {path}: {parent} is a file, not a folder, so nothing can be written "
                    f"under it; choose another {what}"
                )
            return


def check_output(out: str | Path, inputs: Iterable[str | Path], *, what: str = "--out") -> None:
    """Raise ConfigError when writing `out` would replace a study folder, one of `inputs` (local
    paths the merge reads; hub ids are ignored), or a folder that holds either."""
    out = Path(out).expanduser().resolve()
    check_writable_under(out, what)
    if not out.exists():
        return
    if out.is_dir():
        for study in _studies_under(out):
            where = "is" if study == out else f"holds the study folder {study}; it"
            raise ConfigError(
                f"{what} {out} {where} a study (config.yaml, its storage and trial records); "
                "--force replaces only a previous output, never a study. Choose another "
                f"{what}, e.g. {out / 'merged'}"
            )
    for given in inputs:
        path = Path(given).expanduser()
        if not path.exists():
            continue  # a hub id: nothing local to protect
        path = path.resolve()
        if path == out or out in path.parents:
            where = "is" if path == out else f"holds {path}, which is"
            raise ConfigError(
                f"{what} {out} {where} an input of this merge; --force replaces only a previous "
                f"output, never a model the merge reads. Choose another {what}"
            )
