"""Driving the real `basin` command in subprocesses: start, wait on events, kill a run and its Ray.

Waits end on an event (a journal line, a file, a process exit). Their time limits only catch real
hangs: on a loaded 2-core machine a `basin run` can take minutes to start its Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
BASIN = Path(sys.executable).with_name("basin")
ENV = {
    **os.environ,
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "TQDM_DISABLE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}
COMPLETE_OP = '"state":1,'  # a journal line that sets a trial COMPLETE (TrialState.COMPLETE == 1)
PROMOTED_OP = '{"promoted_to":'  # a journal line that marks a candidate promoted to its next rung
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
HANG_S = 900.0  # no single step of a scenario takes this long unless something hangs
POLL_S = 0.05


def start_basin(args: list[str], log: Path) -> subprocess.Popen:
    """`basin ARGS` in a session of its own, so it and all it starts (Ray) can be killed
    together."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(BASIN), *args, "--quiet"],
            cwd=REPO,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Ctrl-C as a user sends it, however the suite was started: a shell's background job
            # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
            preexec_fn=_interruptible,
        )


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_tree(proc: subprocess.Popen, grace_s: float = 60.0) -> list[str]:
    """SIGKILL a process started by start_basin and everything it started (Ray's gcs_server, raylet,
    agents, workers); returns the names of processes that still live afterwards (leaks).

    `grace_s` is how long the killed processes may take to go: at once, unless the machine is so
    busy that a process in the middle of a disk write is slow to leave the kernel."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session's group: basin and Ray's children
    proc.wait()
    for p in psutil.process_iter():  # whatever joined the session after the snapshot
        with contextlib.suppress(psutil.Error, OSError):
            if p not in family and os.getsid(p.pid) == proc.pid:
                family.append(p)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, survivors = psutil.wait_procs(family, timeout=grace_s)
    names = []
    for p in survivors:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{p.name()}:{p.pid}")
    return names


def wait_runs(
    procs: list[subprocess.Popen], folder: Path, *, stall_s: float = HANG_S
) -> tuple[tuple[int, ...], list[str]]:
    """Wait for `basin` runs on the study in `folder` to end, however long they take while its
    journal grows; raise when it has not grown for `stall_s` (a hang). Then kill any run still
    going. Returns (exit codes, processes that outlived their run)."""
    leaked: list[str] = []
    try:
        size, since = -1, time.monotonic()
        while any(p.poll() is None for p in procs):
            now = journal_size(folder)
            if now != size:
                size, since = now, time.monotonic()
            elif time.monotonic() - since > stall_s:
                raise TimeoutError(f"the study in {folder} made no progress for {stall_s:.0f} s")
            time.sleep(0.5)
        return tuple(p.returncode for p in procs), leaked
    finally:
        for p in procs:
            leaked += kill_tree(p) if p.poll() is None else []


def wait_for(
    predicate: Callable[[], bool],
    proc: subprocess.Popen | None,
    what: str,
    log: Path | None = None,
    *,
    timeout: float = HANG_S,
    poll_s: float = POLL_S,
) -> bool:
    """Poll until predicate(); False when proc exited first; raise after `timeout` (a hang)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{tail(log) if log else ''}")


def ray_exposure(pid: int) -> tuple[list[tuple[str, str]], set[str]]:
    """The listening sockets of a process tree (a `basin run` and its local Ray), and the node IP
    its Ray processes were started with."""
    listening, ips = [], set()
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            listening += [
                (p.name(), c.laddr.ip)
                for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
            for arg in p.cmdline():
                for flag in ("--node_ip_address=", "--node-ip-address="):
                    if arg.startswith(flag):
                        ips.add(arg[len(flag) :])
    return listening, ips


def process_alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def worker_pid(worker: str | None) -> int | None:
    """The pid in a record's worker field "host:pid/index"."""
    return int(worker.split(":")[1].split("/")[0]) if worker else None


def runner_mark(pid: int) -> str:
    """What the journal holds once the run with this pid has asked for a trial (its runner attr)."""
    return f'"pid":{pid}}}'


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def journal_text(folder: Path) -> str:
    path = folder / "journal.log"
    return path.read_text(errors="replace") if path.exists() else ""


def journal_size(folder: Path) -> int:
    path = folder / "journal.log"
    return path.stat().st_size if path.exists() else 0
