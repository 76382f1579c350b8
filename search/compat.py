"""Every place basin reaches into Optuna's or Ray's internals, each checked against the version it
was written for.

basin is tested with Optuna `TESTED["optuna"]` and Ray `TESTED["ray"]` (pyproject.toml pins both).
Each function here says which internal it uses and why no public API does the job; each checks
that the internal is there and fails with a message naming the version to install when it is not.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
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
    """Optuna's JournalStorage over a file, with `lock` (acquire/release) held by its writers."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))


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
