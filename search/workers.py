"""Workers: a Ray actor per GPU (or CPU slot) holding base, task vectors, one live model and an evaluator.

The actor does the per-candidate work (merge in place, evaluate) and returns plain dicts; a failure
inside a candidate comes back as {"error": ...}. A worker process that dies is restarted by Ray and
its candidate reported failed by the pool.

CPU workers share the machine with whatever else runs on it (a browser, a second study, the
report), so they split its cores but one between them instead of each taking all of them, and
their OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE) instead of spinning. Spinning is
what made them collapse: Ray sets OMP_NUM_THREADS for an actor, OpenMP's default policy then spins
at every barrier, and when another process holds one of the cores each of a forward pass's many
small parallel regions waits for a thread the scheduler has put behind it. On a 2-core machine
beside one busy process, a two-thread worker took 10.8 s per candidate where the evaluator takes
0.24 s in-process on a quiet machine; now 0.29 s (tests/benchmarks/bench_worker.py).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any

from evaluators import EvaluatorSection, Role, build_evaluator
from merging import recipe_from_dict
from search import compat
from search.config import ModelsSection, SpaceSection


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself: frozen config sections, so Ray can ship them.

    Local paths in `models` and `evaluator` are absolute (search.setup.worker_spec makes them so).
    """

    models: ModelsSection
    evaluator: EvaluatorSection
    space: SpaceSection  # its methods and seed decide what each worker precomputes
    threads: int | None = None  # torch threads of a CPU worker
    fidelity_seed: int | None = None  # multi-fidelity: the search items' order (search/fidelity.py)


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


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class CandidateWorker:
    """Merges recipes into one live model and scores them; one per GPU or CPU slot."""

    def __init__(self, spec: WorkerSpec, index: int = 0) -> None:
        import torch
        from transformers import AutoTokenizer

        from merging import ResidentMerger, load_live_model
        from merging.checkpoint import resolve_model_dir

        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.spec, self.index = spec, index
        models = spec.models
        self.device = resolve_device(models.device)
        t0 = time.perf_counter()
        self.merger = ResidentMerger(
            models.base,
            list(models.finetunes),
            device=self.device,
            dtype=models.dtype,
            allow_pickle=models.allow_pickle,
            kernels=models.kernels,
        )
        self.merger.prepare(tuple(spec.space.methods), spec.space.seed)
        self.model = load_live_model(
            models.base,
            device=self.device,
            dtype=models.dtype,
            trust_remote_code=models.trust_remote_code,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(resolve_model_dir(models.base)), trust_remote_code=models.trust_remote_code
        )
        self.evaluators: dict[str, Any] = {}
        self._held: dict[str, Any] | None = (
            None  # multi-fidelity: the candidate's per-item scores so far
        )
        self.evaluator("search")
        self.setup_s = time.perf_counter() - t0

    def evaluator(self, role: Role):
        """The evaluator of a role ("search" or "report"), built on first use."""
        if role not in self.evaluators:
            seed = self.spec.fidelity_seed if role == "search" else None
            self.evaluators[role] = build_evaluator(self.spec.evaluator, role, order_seed=seed)
        return self.evaluators[role]

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "index": self.index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "setup_s": round(self.setup_s, 3),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        }

    def run(
        self,
        recipe: dict[str, Any],
        role: Role = "search",
        items: int | None = None,
        rung: bool = False,
    ) -> dict[str, Any]:
        """Merge `recipe` (its YAML form) into the live model and evaluate it for `role`.

        rung: multi-fidelity's first rung: score the first `items` of each task's search items
        (None: all) and hold the candidate, so that `more` scores further items of it.
        """
        out = self._out()
        self._held = None
        try:
            t0 = time.perf_counter()
            self.merger.apply(recipe_from_dict(recipe), self.model)
            self._sync()
            t1 = time.perf_counter()
            if rung:
                self._held = {"scored": 0, "scores": {}, "flags": {}}
                out.update(self._score(items))
            else:
                result = self.evaluator(role).evaluate(self.model, self.tokenizer)
                out.update(metrics=result.metrics, higher_is_better=result.higher_is_better)
            t2 = time.perf_counter()
        except Exception as exc:  # a failed candidate fails its trial, never the worker
            return self._failed(out, exc)
        out.update(merge_s=t1 - t0, eval_s=t2 - t1)
        return out

    def more(self, items: int | None) -> dict[str, Any]:
        """The held candidate (see `run`) scored up to `items` of each task (None: all), reusing the
        per-item scores it has; no second merge."""
        out = self._out()
        try:
            if self._held is None:
                raise RuntimeError(
                    "this worker holds no candidate to score further (it was restarted or moved on)"
                )
            t0 = time.perf_counter()
            out.update(self._score(items))
            out.update(merge_s=0.0, eval_s=time.perf_counter() - t0)
        except Exception as exc:
            return self._failed(out, exc)
        return out

    def _score(self, items: int | None) -> dict[str, Any]:
        """Score the held candidate's items from where it stopped up to `items` per task; its metrics
        are the means of every per-item score it has."""
        evaluator, held = self.evaluator("search"), self._held
        counts = evaluator.item_counts
        stop = max(counts.values()) if items is None else min(items, max(counts.values()))
        if stop > held["scored"]:
            result = evaluator.evaluate(self.model, self.tokenizer, items=(held["scored"], stop))
            for key, values in (result.per_item or {}).items():
                held["scores"].setdefault(key, []).extend(values)
            held["flags"].update(result.higher_is_better)
            held["scored"] = stop
        metrics, parts = evaluator.item_metrics(held["scores"])
        flags = {
            k: held["flags"][k] if k in held["flags"] else evaluator.higher_is_better(k)
            for k in metrics
        }
        return {
            "metrics": metrics,
            "higher_is_better": flags,
            "item_scores": parts,
            "items": {task: min(stop, n) for task, n in counts.items()},
            "stop": stop,
        }

    def _out(self) -> dict[str, Any]:
        return {"worker": f"{socket.gethostname()}:{os.getpid()}/{self.index}", "node": _ray_node()}

    def _sync(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _failed(self, out: dict[str, Any], exc: Exception) -> dict[str, Any]:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        self._held = None
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=8)
        return out


class WorkerPool:
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
        if gpus_per_worker == 0 and spec.threads is None:
            spec = replace(spec, threads=cpu_threads(count))
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
        """Whether the worker is up and can take a candidate; never blocks."""
        done, _ = self._ray.wait([self._probes[worker]], num_returns=1, timeout=0)
        if not done:
            return False
        try:
            self._ray.get(self._probes[worker])
        except self._ray.exceptions.RayActorError as exc:
            if exc.actor_init_failed:  # it will never come up: stop rather than wait forever
                raise RuntimeError(f"worker {worker} cannot start: {_first_line(exc)}") from None
            self._probes[worker] = self._probe(worker)
            return False
        return True

    def submit(
        self,
        worker: int,
        recipe: dict[str, Any],
        role: Role = "search",
        *,
        items: int | None = None,
        rung: bool = False,
    ):
        """Send a candidate to a worker (see CandidateWorker.run); returns its ref."""
        ref = self.actors[worker].run.remote(recipe, role, items, rung)
        self._owner[ref] = worker
        return ref

    def more(self, worker: int, items: int | None):
        """Score the worker's held candidate on more items (CandidateWorker.more); returns its ref."""
        ref = self.actors[worker].more.remote(items)
        self._owner[ref] = worker
        return ref

    def wait(self, refs: list, timeout: float | None) -> list:
        if not refs:  # every worker restarting: nothing to wait for but time
            time.sleep(timeout or 0)
            return []
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        return done

    def result(self, ref) -> dict[str, Any]:
        """The candidate's result dict; a dead worker becomes an error result."""
        worker = self._owner.pop(ref, None)
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayError as exc:
            if worker is not None:  # Ray restarts it; no candidate for it until it is back
                self._probes[worker] = self._probe(worker)
            return {
                "error": f"worker died during the candidate ({type(exc).__name__}: {_first_line(exc)}); Ray restarts it",
                "worker_lost": True,
            }

    def restart(self, worker: int) -> None:
        """Kill a worker (e.g. one past its time limit); Ray starts a fresh one in its place."""
        self._ray.kill(self.actors[worker], no_restart=False)
        self._probes[worker] = self._probe(worker)

    def shutdown(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor, no_restart=True)


def _ray_node() -> str | None:
    """The Ray node this process runs on (its id), or None outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # no Ray here, or no runtime context: placement is not known
        return None


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
            # no GPU here: advertise logical GPUs so the schedule can still be exercised on a CPU machine
            resources["num_gpus"] = int(count * gpus_per_worker + 0.999)
    compat.init_loopback_ray(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        num_cpus=max(cpu_slots(), count, cpus),
        **resources,
    )
