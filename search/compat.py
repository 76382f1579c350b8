"""Every place basin reaches into Optuna's or Ray's internals, each checked against the version it
was written for.

basin is tested with Optuna `TESTED["optuna"]` and Ray `TESTED["ray"]` (pyproject.toml pins both).
Each function here says which internal it uses and why no public API does the job; each checks
that the internal is there and fails with a message naming the version to install when it is not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

TESTED = {"optuna": "5.0.0", "ray": "2.60.0"}


class CompatError(RuntimeError):
    """An internal that basin relies on is not in the installed version of a library."""


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "missing"


def _missing(package: str, what: str) -> CompatError:
    return CompatError(
        f"{package} {installed(package)} has no {what}, which basin relies on; "
        f"basin is tested with {package}=={TESTED[package]}: install that version"
    )


# --- Optuna -------------------------------------------------------------------------------------


def set_user_attr_of(study: Any, trial: Any, key: str, value: Any) -> None:
    """Set a user attr on a running trial of the study, also one that another (dead) runner asked
    for.

    Optuna's public `Trial.set_user_attr` needs the Trial object of the runner that asked; a
    runner recovering a dead runner's trial only has its FrozenTrial, so this writes through the
    study's storage (the private `Study._storage` and `FrozenTrial._trial_id`).
    """
    storage, trial_id = getattr(study, "_storage", None), getattr(trial, "_trial_id", None)
    if storage is None or trial_id is None or not hasattr(storage, "set_trial_user_attr"):
        raise _missing("optuna", "Study._storage.set_trial_user_attr / FrozenTrial._trial_id")
    storage.set_trial_user_attr(trial_id, key, value)


def record_heartbeat(study: Any, trial: Any) -> None:
    """Record a running trial's heartbeat in a storage that keeps them (Optuna's RDBStorage).

    Optuna records heartbeats itself only inside `study.optimize`; an ask-and-tell loop must do it
    through the study's storage (the private `Study._storage` and `Trial._trial_id`).
    """
    storage = getattr(study, "_storage", None)
    if storage is None or not _heartbeat_on(storage):
        return
    trial_id = getattr(trial, "_trial_id", None)
    if trial_id is None or not hasattr(storage, "record_heartbeat"):
        raise _missing("optuna", "Study._storage.record_heartbeat / Trial._trial_id")
    storage.record_heartbeat(trial_id)


def stale_trials(study: Any) -> list[int]:
    """Numbers of the running trials whose heartbeat is older than the storage's grace period."""
    storage = getattr(study, "_storage", None)
    if storage is None or not _heartbeat_on(storage):
        return []
    if not hasattr(storage, "_get_stale_trial_ids"):
        raise _missing("optuna", "Study._storage._get_stale_trial_ids")
    ids = set(storage._get_stale_trial_ids(study._study_id))
    return [t.number for t in study.get_trials(deepcopy=False) if t._trial_id in ids]


def _heartbeat_on(storage: Any) -> bool:
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def enqueued_params(trial: Any) -> dict[str, Any]:
    """The params an enqueued trial was queued with (Optuna keeps them in system attrs).

    A trial killed between ask and suggest has no `params` yet; only these say what it was to run.
    """
    return dict(trial.system_attrs.get("fixed_params", {}))


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    """Silence Optuna's per-trial logs and the warnings a study run triggers by design, for a block.

    ExperimentalWarning: the samplers' multivariate/group options and the visualisations are marked
    experimental. "Fixed parameter ... out of range": a baseline enqueued at a fixed value outside
    its range is intended.
    """
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
            yield
    finally:
        optuna.logging.set_verbosity(level)


# --- Optuna's journal file ------------------------------------------------------------------------
# The journal file holds one JSON operation per line. Optuna skips a torn last line when reading,
# but appends the next operation right after it, which makes that line invalid JSON and the study
# unreadable from then on. That byte format is Optuna's, not a documented contract.


def journal_storage(path: Path, lock: Any) -> Any:
    """Optuna's JournalStorage over a file, with `lock` (acquire/release) held by its writers;
    its writes can be gathered into one append (`batched_writes`)."""
    from optuna.storages import JournalStorage

    return JournalStorage(_batching_backend()(str(path), lock_obj=lock))


@functools.cache
def _batching_backend() -> type:
    from optuna.storages.journal import JournalFileBackend

    class BatchingBackend(JournalFileBackend):
        """Optuna's journal file, whose appends a thread can gather and write at once.

        Optuna writes each operation as its own append, under the file lock and with an fsync:
        a candidate's 58 params cost 58 of them (measured: 46 ms per trial against 20 without the
        fsyncs, on a 2-core machine's disk). While a thread gathers (`batched_writes`), its
        appends wait and are written as one, in their order. Until then the journal (and so every
        reader, this process's other threads included) does not show them; the Trial that made
        them holds them in its own cache. A run killed before the append leaves the trial without
        those writes, as a kill between two of Optuna's own appends would.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._gathering = threading.local()

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            gathered = getattr(self._gathering, "logs", None)
            if gathered is None:
                super().append_logs(logs)
            else:
                gathered.extend(logs)

        def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
            # gathering, this thread reads the journal as it was when it began: each of Optuna's
            # writes reads the file back, and what it would find is not needed for the proposal
            # being made (the journal is read in full again when the block ends)
            if self.gathering():
                return iter(())
            return super().read_logs(log_number_from)

        def gathering(self) -> bool:
            return getattr(self._gathering, "logs", None) is not None

        def gather(self) -> None:
            self._gathering.logs = []

        def release(self) -> list[dict[str, Any]]:
            logs, self._gathering.logs = self._gathering.logs, None
            return logs

    return BatchingBackend


@contextlib.contextmanager
def batched_writes(study: Any) -> Iterator[None]:
    """The study's writes made by this thread inside the block reach its journal in one append
    when the block ends (also when it ends in an error); with any other storage, as they are made.
    Only writes whose results are not read back inside the block belong here (params suggested to
    a trial, its user attrs): a read inside sees the journal as it was when the block began.

    The append and the journal's replay of it happen together under the storage's own lock, as
    Optuna does for each write, so what the replay refuses (a write to a trial another runner has
    finished: UpdateFinishedTrialError) is raised here, in this thread. (The private
    `Study._storage` and JournalStorage's `_backend`, `_thread_lock` and `_sync_with_backend`.)
    """
    storage = getattr(study, "_storage", None)
    backend = getattr(storage, "_backend", None)
    if not isinstance(backend, _batching_backend()) or backend.gathering():
        yield  # another storage, or inside a block already: the outer block writes
        return
    backend.gather()
    try:
        yield
    finally:
        logs = backend.release()
        if logs:
            with storage._thread_lock:
                backend.append_logs(logs)
                storage._sync_with_backend()


def repair_torn_tail(path: Path, lock: Any) -> int:
    """Cut a journal's last line when a crash left it half-written; returns the bytes dropped.

    Writers hold `lock` while appending, so a torn tail seen under the lock is a dead writer's.
    """
    with lock, open(path, "rb+") as f:
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


# --- Ray -----------------------------------------------------------------------------------------


def init_loopback_ray(**kwargs: Any) -> None:
    """Start a private local Ray whose servers listen on 127.0.0.1 only.

    Ray turns _node_ip_address="127.0.0.1" into this machine's network address (it expects a
    cluster), and its servers (gcs, raylet, workers) then listen on every interface. With its
    cluster switch `ray._private.ray_constants.ENABLE_RAY_CLUSTER` off while it starts (read at
    call time by `ray._private.services.get_node_ip_address`), the node address stays 127.0.0.1.
    No public option does this.
    """
    import ray

    try:
        from ray._private import ray_constants
    except ImportError:
        raise _missing("ray", "ray._private.ray_constants") from None
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise _missing("ray", "ray_constants.ENABLE_RAY_CLUSTER")
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", _node_ip_address="127.0.0.1", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch


def check_versions() -> None:
    """Warn once per process when Optuna or Ray is not the version basin is tested with."""
    for package, tested in TESTED.items():
        found = installed(package)
        if found != tested and package not in _warned:
            _warned.add(package)
            warnings.warn(
                f"basin: {package} {found} is installed; basin is tested with {package}=={tested} "
                f"(pyproject.toml pins it)",
                RuntimeWarning,
                stacklevel=2,
            )


_warned: set[str] = set()
