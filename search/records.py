"""The study folder: config snapshot, storage, one JSON record per finished trial.

results/<study>/
  config.yaml        the validated config the study was created with
  journal.log        Optuna's journal storage (unless a storage URL is configured)
  .journal.lock      file lock held by the journal's writers
  .setup.lock        file lock held while a run sets up or claims a trial
  trials/<n>.json    params, recipe, metrics, objective values, timings, worker, error
  carve.json         with evaluator.holdout: each task's search and held-out item indices
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from filelock import FileLock

from search import attrs, compat

if TYPE_CHECKING:
    from evaluators.config import EvaluatorSection

CONFIG_FILE = "config.yaml"
CARVE_FILE = "carve.json"
JOURNAL_FILE = "journal.log"
JOURNAL_LOCK = ".journal.lock"  # lock file of the journal's writers
# a file apart from the journal's: two locks on one file block each other
SETUP_LOCK = ".setup.lock"  # lock file of study setup and trial claims


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def trial_record(
    t: Any,
    recipe: dict | None,
    wall: float | None,
    error: str | None,
    traceback: str | None = None,
    state: str | None = None,
) -> dict[str, Any]:
    """The JSON record of a finished trial (a Trial or FrozenTrial, with its user attrs set).

    state: COMPLETE or FAIL (by `error`) unless given (PRUNED). With multi-fidelity, `rung` is the
    last rung the trial was scored on and `items` the items it scored per task.
    """
    stored = t.user_attrs
    return {
        "number": t.number,
        "state": state or ("COMPLETE" if error is None else "FAIL"),
        "baseline": stored.get(attrs.BASELINE),
        "retry_of": stored.get(attrs.RETRY_OF),
        "params": t.params,
        "recipe": recipe,
        "metrics": stored.get(attrs.METRICS),
        "values": getattr(t, "values", None),
        "merge_s": stored.get(attrs.MERGE_S),
        "eval_s": stored.get(attrs.EVAL_S),
        "wall_s": wall,
        "worker": stored.get(attrs.WORKER),
        "node": stored.get(attrs.NODE),
        "error": error,
        "traceback": traceback,
        "rung": stored.get(attrs.RUNG),
        "items": stored.get(attrs.ITEMS_PER_TASK),
    }


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


def literal_password(url: str) -> bool:
    """Whether a storage URL spells out a password.

    A password taken from an environment variable (${VAR}) does not count.
    """
    found = re.findall(r"://[^:/@\s]*:(\S*)@", url) + re.findall(r"(?i)password=([^&\s]*)", url)
    return any(p and not re.fullmatch(r"\$\{\w+\}|\$\w+", p) for p in found)


def file_lock(path: Path) -> FileLock:
    """An exclusive lock on a lock file, usable as Optuna's journal lock.

    Optuna's default journal lock is a symlink that a SIGKILLed writer leaves behind, and the next
    run then waits 30 s before breaking it. This one is a kernel flock (through filelock), which the
    kernel drops when its holder dies, so a run killed in the middle of a write blocks nobody.
    """
    return FileLock(path)


@contextlib.contextmanager
def study_lock(folder: Path, storage: str | None = None, name: str = "") -> Iterator[None]:
    """Hold the lock runners of a study share: they set it up (and claim trials) one at a time.

    Runners on one machine share the study folder's lock. With a PostgreSQL storage the lock is
    also a transaction-scoped advisory lock in the database, keyed by the study name, so runners
    on different machines (each with its own folder) take turns too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / SETUP_LOCK), database_lock(storage, name):
        yield


@contextlib.contextmanager
def database_lock(storage: str | None, name: str) -> Iterator[None]:
    """With a PostgreSQL storage: a transaction-scoped advisory lock keyed by `name`."""
    if not storage or _scheme(storage) not in ("postgresql", "postgres"):
        yield
        return
    engine = _lock_engine(storage)
    import hashlib

    from sqlalchemy import text

    key = int.from_bytes(hashlib.sha256(f"basin:{name}".encode()).digest()[:8], "big", signed=True)
    # released when the transaction ends, or the connection drops
    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


@functools.cache
def _lock_engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(storage_url(url), poolclass=sqlalchemy.pool.NullPool)


def storage_url(configured: str) -> str:
    """The storage URL with environment variables expanded.

    `postgresql+psycopg://basin:${BASIN_DB_PASSWORD}@db/basin` keeps the password out of the
    config and of the study folder's snapshot of it.
    """
    return os.path.expandvars(configured)


RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")


def _scheme(url: str) -> str:
    """The database of a storage URL without its driver ('' if none).

    postgresql+psycopg://... -> postgresql
    """
    return url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""


def open_storage(folder: Path, configured: str | None, heartbeat_s: int | None = None):
    """Optuna storage: the configured URL, or a journal file in the study folder (no server).

    A database URL opens with Optuna's heartbeat every `heartbeat_s` seconds (grace: twice that).
    """
    import optuna

    if configured:
        url = storage_url(configured)
        if "://" not in url:
            return configured
        if heartbeat_s and _scheme(url) in RDB_SCHEMES:
            # heartbeats are "experimental" in Optuna; basin tests the version it pins
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s
                )
        return optuna.storages.get_storage(url)
    folder.mkdir(parents=True, exist_ok=True)
    journal, lock = folder / JOURNAL_FILE, file_lock(folder / JOURNAL_LOCK)
    if journal.exists() and (dropped := compat.repair_torn_tail(journal, lock)):
        print(
            f"basin: {journal} ended in a half-written operation (a run died while writing); "
            f"dropped its {dropped} bytes",
            file=sys.stderr,
        )
    if journal.exists():
        # Optuna fails on a bad line with a bare JSON error, and on a bad last line only once a
        # run has appended after it, in the middle of that run: find them all now, and say so
        from search import journal as health

        if bad := health.bad_lines(journal):
            from search.config import ConfigError

            raise ConfigError(health.describe(journal, bad, folder))
    return compat.journal_storage(journal, lock)


def write_config_snapshot(folder: Path, config_dict: dict) -> None:
    """Atomic, like the records: a run killed here must not leave a half-written config.yaml."""
    write_atomic(folder / CONFIG_FILE, yaml.safe_dump(config_dict, sort_keys=False))


def read_config_snapshot(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a study folder (no {CONFIG_FILE}); give the folder `basin run` "
            "created"
        )
    return yaml.safe_load(path.read_text())


def write_carve(folder: Path, evaluator: EvaluatorSection, split_sizes: dict[str, int]) -> None:
    """Record the carve of a study with evaluator.holdout, or check it against the recorded one.

    The cut is a pure function of the seed, the task and its item count; a task whose item count
    changed since the study began (another dataset revision) would cut differently, and the
    held-out scores would no longer be held out: that refuses to run.
    """
    from evaluators.carve import carve_ids

    cut = evaluator.carve("search")
    if cut is None:
        return
    carve = {
        "split": cut.split,
        "holdout": cut.fraction,
        "holdout_seed": cut.seed,
        "tasks": {
            task: carve_ids(n, task, cut.fraction, cut.seed)
            for task, n in sorted(split_sizes.items())
        },
    }
    path = folder / CARVE_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != carve:
            changed = sorted(
                t
                for t in {*recorded.get("tasks", {}), *carve["tasks"]}
                if recorded.get("tasks", {}).get(t) != carve["tasks"].get(t)
            )
            from search.config import ConfigError

            which = ", ".join(changed) or "the split"
            raise ConfigError(
                f"{path}: the carve of {which} differs from the one this study began with (the "
                "task's data changed?); its held-out items would no longer be held out. Restore "
                "the data the study began with, or start a new study"
            )
        return
    write_json_atomic(path, carve)
