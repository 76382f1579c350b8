"""Pools of candidate workers: what the study loop talks to, and where the workers run.

`Pool` is the interface: submit a candidate to a worker, wait for any to finish, read its result.
`RayPool` runs one Ray actor per worker (every GPU of a machine or a cluster); `InProcessPool` runs
its workers in this process, one candidate at a time (tests, held-out scoring, a machine without
Ray). Another distribution backend is another class with these methods.

CPU workers share the machine with whatever else runs on it (a browser, a second study, the
report), so they split its cores but one between them instead of each taking all of them, and
their OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE) instead of spinning. Spinning is
what made them collapse: Ray sets OMP_NUM_THREADS for an actor, OpenMP's default policy then spins
at every barrier, and when another process holds one of the cores each of a forward pass's many
small parallel regions waits for a thread the scheduler has put behind it. On a 2-core machine
beside one busy process, a two-thread worker took 10.8 s per candidate where the evaluator takes
0.24 s in-process on a quiet machine; now 0.29 s (tests/benchmarks/bench_worker.py).

A worker in this process (InProcessPool) gets its torch threads from `spec.threads` and the
variables of `env` that are read at run time (RUNTIME_ENV); OpenMP read OMP_WAIT_POLICY when torch
was imported, so such a worker waits as this process does. With one thread that does not matter
(there is no other thread to wait for); search/heldout.py chooses this process or Ray on that.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Hashable
from dataclasses import replace
from typing import Any, Protocol

from evaluators import Role
from search import compat
from search.config import ConfigError, WorkersSection
from search.result import WorkerResult
from search.workers import CandidateWorker, WorkerSpec

Ref = Hashable  # a submitted candidate, as its pool names it


class WorkerStartError(ConfigError):
    """A worker cannot start (a damaged model, a device it cannot use): the study cannot run."""


def _check_started(worker: int, info: dict[str, Any]) -> None:
    if info.get("error"):
        raise WorkerStartError(f"worker {worker} cannot start: {info['error']}")


class Pool(Protocol):
    """Workers the study loop hands candidates to; every method but `wait` returns at once."""

    def available(self, worker: int) -> bool:
        """Whether the worker is up and can take a candidate (raises if it can never start)."""
        ...

    def submit(
        self,
        worker: int,
        recipe: dict[str, Any],
        role: Role = "search",
        *,
        items: int | None = None,
        rung: bool = False,
    ) -> Ref:
        """Send a candidate to a worker (CandidateWorker.run); returns its ref."""
        ...

    def more(self, worker: int, items: int | None) -> Ref:
        """Score the worker's held candidate on more items (CandidateWorker.more)."""
        ...

    def wait(self, refs: list[Ref], timeout: float | None) -> list[Ref]:
        """The refs that finished (at least one, unless `timeout` passed first)."""
        ...

    def result(self, ref: Ref) -> WorkerResult:
        """A finished candidate's result; a worker that died gives an error result."""
        ...

    def restart(self, worker: int) -> None:
        """Stop a worker (one past its time limit); a fresh one takes its place."""
        ...

    def shutdown(self) -> None: ...


# builds a study's pool from its worker spec, its workers section and the worker class (None: the
# default CandidateWorker)
PoolFactory = Callable[[WorkerSpec, WorkersSection, "type | None"], Pool]


def cpu_slots() -> int:
    """Cores this process may run on: its affinity mask (as taskset or a container sets it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_threads(count: int, cores: int | None = None) -> int:
    """Torch threads for each of `count` CPU workers: the cores (default: this process's) but one,
    split between them, at least one each.

    The core left over keeps the driver, Ray's own processes and the rest of the machine from
    sharing a core with a worker's threads.
    """
    return max(1, ((cores or cpu_slots()) - 1) // count)


def cpu_worker(spec: WorkerSpec, count: int) -> WorkerSpec:
    """`spec` as one of `count` CPU workers runs it: `spec.threads` torch threads, by default its
    share of the cores (cpu_threads)."""
    return spec if spec.threads is not None else replace(spec, threads=cpu_threads(count))


# what worker_env sets that a process already running reads when it is used (the rest is read
# once, when torch loads OpenMP and MKL; torch.set_num_threads sets their thread counts instead)
RUNTIME_ENV = ("TOKENIZERS_PARALLELISM",)


def worker_env(threads: int | None) -> dict[str, str]:
    """The environment a worker process starts with (it must be set before torch loads OpenMP).

    Idle OpenMP threads sleep rather than spin, thread pools match the worker's share of the
    cores, and the tokenizer does not start threads of its own. A variable the user set wins.
    """
    env = {
        name: os.environ.get(name, default)
        for name, default in (("OMP_WAIT_POLICY", "PASSIVE"), ("TOKENIZERS_PARALLELISM", "false"))
    }
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


class _Submits:
    """`submit` and `more` of every pool: a call of the worker's method, however it is made."""

    def _call(self, worker: int, method: str, *args: Any) -> Ref:
        raise NotImplementedError

    def submit(
        self,
        worker: int,
        recipe: dict[str, Any],
        role: Role = "search",
        *,
        items: int | None = None,
        rung: bool = False,
    ) -> Ref:
        return self._call(worker, "run", recipe, role, items, rung)

    def more(self, worker: int, items: int | None) -> Ref:
        return self._call(worker, "more", items)


class RayPool(_Submits):
    """`count` Ray actors; submit a recipe to a free one, wait for any to finish.

    `worker_cls` (default CandidateWorker) is the actor class: same constructor, `info` and `run`.
    A CPU worker gets `spec.threads` torch threads (default: its share of the cores) and as many
    Ray CPUs; `env` replaces `worker_env(threads)` as the variables its process starts with.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        count: int,
        *,
        gpus_per_worker: float = 0,
        address: str | None = None,
        worker_cls: type | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        import ray

        self._ray = ray
        self._own_ray = not ray.is_initialized()  # started here: shut down with the pool
        if gpus_per_worker == 0:
            spec = cpu_worker(spec, count)
        self.spec = spec
        cpus = spec.threads if gpus_per_worker == 0 else 1
        if not ray.is_initialized():
            start_ray(address, count, gpus_per_worker, cpus=count * cpus)
        # On a cluster, workers go to as many nodes as have room (a node lost takes fewer with it);
        # a worker restarted after its node died waits until some node has room for it.
        self._actor_cls = ray.remote(
            num_cpus=cpus,
            num_gpus=gpus_per_worker,
            max_restarts=-1,
            max_task_retries=0,
            runtime_env={"env_vars": worker_env(spec.threads) if env is None else env},
            scheduling_strategy="SPREAD" if address else "DEFAULT",
        )(worker_cls or CandidateWorker)
        self.actors = [self._actor_cls.remote(spec, i) for i in range(count)]
        # Ray refuses calls to a worker it is restarting (ActorUnavailableError, at once), so a
        # candidate sent to a worker that just died would fail too, and the next, and the next. A
        # worker gets candidates only once its probe (retried by Ray across restarts) has answered.
        self._probes = [self._probe(i) for i in range(count)]
        self._owner: dict[Any, int] = {}  # candidate ref -> worker index

    def _probe(self, worker: int):
        return self.actors[worker].info.options(max_task_retries=-1).remote()

    def ready(self) -> list[dict[str, Any]]:
        """Block until every worker has loaded its models; returns their info."""
        return self._ray.get([a.info.remote() for a in self.actors])

    def available(self, worker: int) -> bool:
        done, _ = self._ray.wait([self._probes[worker]], num_returns=1, timeout=0)
        if not done:
            return False
        try:
            _check_started(worker, self._ray.get(self._probes[worker]))
        except self._ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:  # it will never come up: stop rather than wait forever
                raise WorkerStartError(
                    f"worker {worker} cannot start: {_first_line(exc)}"
                ) from None
            self._probes[worker] = self._probe(worker)
            return False
        return True

    def _call(self, worker: int, method: str, *args: Any) -> Ref:
        ref = getattr(self.actors[worker], method).remote(*args)
        self._owner[ref] = worker
        return ref

    def wait(self, refs: list[Ref], timeout: float | None) -> list[Ref]:
        if not refs:  # every worker restarting: nothing to wait for but time
            time.sleep(timeout or 0)
            return []
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        return done

    def result(self, ref: Ref) -> WorkerResult:
        worker = self._owner.pop(ref, None)
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            if worker is not None:  # Ray restarts it; no candidate for it until it is back
                self._probes[worker] = self._probe(worker)
            return WorkerResult(
                error=f"worker died during the candidate ({type(exc).__name__}: "
                f"{_first_line(exc)}); Ray restarts it",
                worker_lost=True,
            )

    def restart(self, worker: int) -> None:
        self._ray.kill(self.actors[worker], no_restart=False)
        self._probes[worker] = self._probe(worker)

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)
        if self._own_ray:  # its processes go now, and its last messages with the run's output
            self._ray.shutdown()


class InProcessPool(_Submits):
    """`count` workers in this process, built on first use; a candidate runs when it is waited for.

    Candidates run one after the other, so there is no parallelism: this is the pool for tests,
    for scoring a few candidates (held-out scores) and for a machine without Ray.

    `env` (say worker_env(threads)): the variables of it that a running process reads (RUNTIME_ENV)
    are set while the pool's workers live. At shutdown those and torch's thread count (which a
    worker with `spec.threads` sets for the whole process) are as they were before.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        count: int = 1,
        worker_cls: type | None = None,
        *,
        env: dict[str, str] | None = None,
    ) -> None:
        self.spec, self.count = spec, count
        self._cls = worker_cls or CandidateWorker
        self._env = {k: v for k, v in (env or {}).items() if k in RUNTIME_ENV}
        self._saved: tuple[int, dict[str, str | None]] | None = None  # torch threads, variables
        self._workers: dict[int, Any] = {}
        self._pending: dict[int, tuple[int, Callable[[Any], WorkerResult]]] = {}
        self._done: dict[int, WorkerResult] = {}
        self._refs = itertools.count()

    def worker(self, index: int) -> Any:
        """The worker of that index, built now if it is not yet."""
        if index not in self._workers:
            if self._saved is None:
                import torch

                self._saved = (torch.get_num_threads(), {k: os.environ.get(k) for k in self._env})
                os.environ.update(self._env)
            self._workers[index] = self._cls(self.spec, index)
        return self._workers[index]

    def available(self, worker: int) -> bool:
        _check_started(worker, self.worker(worker).info())
        return not any(w == worker for w, _ in self._pending.values())

    def _call(self, worker: int, method: str, *args: Any) -> Ref:
        ref = next(self._refs)
        self._pending[ref] = (worker, lambda w: getattr(w, method)(*args))
        return ref

    def wait(self, refs: list[Ref], timeout: float | None) -> list[Ref]:
        finished = [r for r in refs if r in self._done]
        if finished or not refs:
            return finished[:1]
        ref = next(r for r in refs if r in self._pending)
        worker, call = self._pending.pop(ref)
        self._done[ref] = call(self.worker(worker))
        return [ref]

    def result(self, ref: Ref) -> WorkerResult:
        return self._done.pop(ref)

    def restart(self, worker: int) -> None:
        self._workers.pop(worker, None)
        for ref in [r for r, (w, _) in self._pending.items() if w == worker]:
            del self._pending[ref]
            self._done[ref] = WorkerResult(error="the worker was stopped during the candidate")

    def shutdown(self) -> None:
        self._workers.clear()
        self._pending.clear()
        if self._saved is not None:
            import torch

            threads, env = self._saved
            self._saved = None
            torch.set_num_threads(threads)
            for name, value in env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def ray_pool(spec: WorkerSpec, workers: WorkersSection, worker_cls: type | None = None) -> Pool:
    """The study's default pool: Ray actors, on this machine or on a cluster."""
    return RayPool(
        spec,
        workers.count,
        gpus_per_worker=workers.gpus_per_worker,
        address=workers.address,
        worker_cls=worker_cls,
    )


def in_process_pool(
    spec: WorkerSpec, workers: WorkersSection, worker_cls: type | None = None
) -> Pool:
    """The study's workers in this process, one candidate at a time (no Ray)."""
    return InProcessPool(spec, workers.count, worker_cls)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or ["no detail"])[0][:200]


def start_ray(address: str | None, count: int, gpus_per_worker: float, cpus: int = 1) -> None:
    """Join a cluster at `address`, or start a private local one that listens on localhost only.

    The local one advertises the machine's cores, or `cpus` (what the workers ask for) if more.
    """
    import ray

    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    resources: dict[str, Any] = {}
    if gpus_per_worker > 0:
        import torch

        if not torch.cuda.is_available():
            # no GPU here: advertise logical GPUs, so the schedule still runs on a CPU machine
            resources["num_gpus"] = int(count * gpus_per_worker + 0.999)
    compat.init_loopback_ray(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        num_cpus=max(cpu_slots(), count, cpus),
        **resources,
    )
