"""The health of a study's journal file: which lines are not operations, and a rewrite without them.

Optuna's journal holds one JSON object per line; one line that is not (a disk fault, a bad copy,
an edit by hand) makes Optuna refuse the whole study. A torn last line, with no newline, is a
writer that died mid-append: compat.repair_torn_tail cuts it when the study opens, so the scan
here does not count it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from search import records

PREVIEW_CHARS = 40
_decode = json.JSONDecoder().decode  # a third faster than json.loads on bytes


@dataclass(frozen=True)
class BadLine:
    number: int  # 1-based
    preview: str  # its first characters, without the newline


@dataclass(frozen=True)
class Repaired:
    dropped: int  # lines left out, a torn last line included
    kept: int  # operations written back
    backup: Path  # the journal as it was


def _is_operation(line: bytes) -> bool:
    # garbage rarely starts with '{': most bad lines are settled without parsing
    if line.lstrip()[:1] != b"{":
        return False
    try:
        # utf-8-sig: Optuna's json.loads on bytes accepts a leading BOM too
        return isinstance(_decode(line.decode("utf-8-sig")), dict)
    except (ValueError, RecursionError):  # ValueError covers bytes that are not UTF-8
        return False


def _preview(line: bytes) -> str:
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."


def _lines(f) -> Iterator[tuple[int, bytes, bool]]:
    """(number, line, complete) for each line; only the last can be incomplete (no newline)."""
    for number, line in enumerate(f, start=1):
        yield number, line, line.endswith(b"\n")


def bad_lines(path: Path) -> list[BadLine]:
    """The complete lines of a journal file that are not a JSON object, in file order."""
    bad = []
    with open(path, "rb") as f:
        for number, line, complete in _lines(f):
            if complete and not _is_operation(line):
                bad.append(BadLine(number, _preview(line)))
    return bad


def describe(path: Path, bad: list[BadLine], folder: Path) -> str:
    """What is wrong with the journal and the two ways out, as one message."""
    first = bad[0]
    if len(bad) == 1:
        which, those = "", "that line"
    else:
        numbers = ", ".join(str(b.number) for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        which, those = f", one of {len(bad)} such lines ({numbers}{more})", "those lines"
    return (
        f"{path}: line {first.number} is not a journal operation ({first.preview!r}){which}, so "
        f"the study cannot be read; `basin repair {folder}` rewrites the journal with every valid "
        f"operation (keeping the original as {records.JOURNAL_FILE}.bak-<timestamp>), or delete "
        f"{those} by hand"
    )


def repair(folder: Path) -> Repaired | None:
    """Rewrite a study folder's journal without its bad lines (and a torn last line); None when
    it is healthy (nothing is touched then).

    The writers' lock is held throughout, so no runner appends between the read and the swap; the
    original stays as journal.log.bak-<UTC time>, and the new file replaces it in one step.
    """
    path = folder / records.JOURNAL_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    with records.file_lock(folder / records.JOURNAL_LOCK):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        try:
            dropped = kept = 0
            with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                for _, line, complete in _lines(src):
                    if complete and _is_operation(line):
                        out.write(line)
                        kept += 1
                    else:
                        dropped += 1
                out.flush()
                os.fsync(out.fileno())
            if not dropped:
                Path(tmp).unlink()
                return None
            shutil.copymode(path, tmp)
            backup = _keep_original(path)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)
    return Repaired(dropped, kept, backup)


def _keep_original(path: Path) -> Path:
    """The journal under a backup name, byte for byte, before it is replaced."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1000):
        backup = path.with_name(f"{path.name}.bak-{stamp}" + (f"-{n}" if n else ""))
        try:
            # a hard link keeps the original file itself: nothing to copy, nothing to get wrong
            os.link(path, backup)
            return backup
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links
            if backup.exists():
                continue
            shutil.copyfile(path, backup)
            with open(backup, "rb") as f:
                os.fsync(f.fileno())
            return backup
    raise FileExistsError(f"{path.name}.bak-{stamp}: too many backups of this second")


def _fsync_dir(folder: Path) -> None:
    """Make the swap itself durable, not only the new file's bytes."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
