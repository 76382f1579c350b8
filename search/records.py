"""The study folder: config snapshot, storage, one JSON record per finished trial.

results/<study>/
  config.yaml        the validated config the study was created with
  journal.log        Optuna's journal storage (unless a storage URL is configured)
  .journal.lock      flock held by the journal's writers; .setup.lock: flock held while a run sets up
  trials/<n>.json    params, recipe, metrics, objective values, timings, worker, error
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
JOURNAL_FILE = "journal.log"
JOURNAL_LOCK = ".journal.lock"  # flock target of the journal's writers
SETUP_LOCK = ".setup.lock"  # flock target of study setup (a second lock: flocks of one process on one file block each other)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def write_trial_record(folder: Path, record: dict[str, Any]) -> Path:
    path = folder / "trials" / f"{record['number']}.json"
    write_json_atomic(path, record)
    return path


def read_trial_records(folder: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in sorted((folder / "trials").glob("*.json")):
        out[int(path.stem)] = json.loads(path.read_text())
    return out


def redact(url: str) -> str:
    """A storage URL (or a message holding one) safe to print: passwords replaced by ***.

    The password runs to the last '@' of its word (passwords often hold a raw '@'), the user may
    be empty (redis://:pw@host), and a `password=` query parameter is hidden too.
    """
    url = re.sub(r"(://[^:/@\s]*:)\S*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", url)


class FlockLock:
    """An exclusive flock on a lock file, usable as Optuna's journal lock.

    Optuna's default journal lock is a symlink that a SIGKILLed writer leaves behind, and the next
    run then waits 30 s before breaking it. The kernel drops a flock when its holder dies, so a run
    killed in the middle of a write never blocks the next one.
    """

    def __init__(self, path: Path) -> None:
        self.path, self._fd = Path(path), None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold the study folder's lock: concurrent runners set the study up one at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FlockLock(folder / SETUP_LOCK)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def repair_torn_tail(path: Path, lock: FlockLock) -> int:
    """Cut a journal's last line when a crash left it half-written; returns the bytes dropped.

    Optuna skips a torn last line when reading, but appends the next operation right after it, which
    makes that line invalid JSON and the study unreadable from then on. Writers hold `lock` while
    appending, so a torn tail seen under the lock is a dead writer's and safe to cut.
    """
    lock.acquire()
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return 0
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return 0
            keep, pos = 0, size  # find the last newline, reading backwards in blocks
            while pos > 0:
                start = max(0, pos - 65536)
                f.seek(start)
                block = f.read(pos - start)
                if (i := block.rfind(b"\n")) >= 0:
                    keep = start + i + 1
                    break
                pos = start
            f.truncate(keep)
            os.fsync(f.fileno())
            return size - keep
    finally:
        lock.release()


def open_storage(folder: Path, configured: str | None):
    """Optuna storage: the configured URL, or a journal file in the study folder (no server)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if configured:
        return optuna.storages.get_storage(configured) if "://" in configured else configured
    folder.mkdir(parents=True, exist_ok=True)
    journal, lock = folder / JOURNAL_FILE, FlockLock(folder / JOURNAL_LOCK)
    if journal.exists() and (dropped := repair_torn_tail(journal, lock)):
        print(f"basin: {journal} ended in a half-written operation (a run died while writing); "
              f"dropped its {dropped} bytes", file=sys.stderr)
    return JournalStorage(JournalFileBackend(str(journal), lock_obj=lock))  # type: ignore[arg-type]


def write_config_snapshot(folder: Path, config_dict: dict) -> None:
    """Atomic, like the records: a run killed here must not leave a half-written config.yaml."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE}.", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(config_dict, sort_keys=False))
    os.replace(tmp, folder / CONFIG_FILE)


def read_config_snapshot(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a study folder (no {CONFIG_FILE}); give the folder `basin run` created")
    return yaml.safe_load(path.read_text())
