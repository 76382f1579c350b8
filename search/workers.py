"""One candidate worker: base, task vectors, one engine and its evaluators, on one device.

The worker does the per-candidate work (merge into the engine, evaluate) and returns a
WorkerResult; a failure inside a candidate comes back as a result with its error, never as an
exception, so a bad candidate fails its trial and the worker goes on. Where the worker runs (a Ray
actor, this process) is the pool's business (search/pool.py); nothing here imports Ray.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from evaluators import EvaluatorSection, Role, build_evaluator
from evaluators.protocol import Evaluator
from merging import recipe_from_dict
from search.config import ModelsSection, SpaceSection
from search.result import RungScores, WorkerResult


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself: frozen config sections, so Ray can ship them.

    Local paths in `models` and `evaluator` are absolute (search.folder.worker_spec makes them so).
    """

    models: ModelsSection
    evaluator: EvaluatorSection
    space: SpaceSection  # its methods and seed decide what each worker precomputes
    threads: int | None = None  # torch threads of a CPU worker
    fidelity_seed: int | None = None  # multi-fidelity: the search items' order (search/fidelity.py)
    # the roles it scores: their evaluators are built at start, so that a task that cannot load
    # fails the worker's start (and the study with it) rather than every candidate; a role not
    # named here is built on first use. Held-out scoring serves ("report",) only.
    roles: tuple[Role, ...] = ("search",)
    # the GPU memory placement auto may plan with: workers.gpu_memory_gib, else the worker's share
    # (workers.gpus_per_worker, at most 1) of its GPU
    gpu_memory_gib: float | None = None
    gpu_share: float = 1.0


class Rooms(NamedTuple):
    """A worker's memory, as validate plans it (search/memory.py)."""

    device: int | None  # bytes placement auto may fill on the device; None: no limit
    host: int | None  # and in host memory
    merge_reserve: int  # device bytes a vLLM engine on a GPU leaves free for the merge


def placement_rooms(spec: WorkerSpec, device: str) -> Rooms:
    """The device and host bytes placement auto may fill, and the device bytes the merger
    allocates only while merging, which a vLLM engine on a GPU must leave free (a CUDA worker's
    capacity is its GPU's memory)."""
    import torch

    kind = torch.device(device).type
    engine_sizes_itself = kind == "cuda" and spec.evaluator.engine == "vllm"
    if spec.models.placement != "auto" and not engine_sizes_itself:
        return Rooms(None, None, 0)
    from search.memory import worker_plan

    capacity = None
    if kind == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        capacity = int(
            spec.gpu_memory_gib * 2**30
            if spec.gpu_memory_gib is not None
            else total * min(1.0, spec.gpu_share)
        )
    plan = worker_plan(spec.models, spec.evaluator, spec.space.methods, kind, capacity)
    reserve = plan.during_merge if engine_sizes_itself else 0
    if spec.models.placement != "auto":
        return Rooms(None, None, reserve)
    return Rooms(plan.tiers.device_room, plan.tiers.host_room, reserve)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class _Held:
    """Multi-fidelity: the candidate a worker holds between rungs, and its per-item scores so
    far."""

    scored: int = 0  # items per task scored
    scores: dict[str, list[float]] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)


class CandidateWorker:
    """Merges recipes into one engine (evaluators/engines.py) and scores them; one per GPU or CPU
    slot."""

    def __init__(self, spec: WorkerSpec, index: int = 0) -> None:
        self.spec, self.index = spec, index
        self.start_error: str | None = None
        self.setup_s = 0.0
        try:
            self._start()
        except Exception as exc:  # kept for info(): the pool stops the study with this reason
            self.start_error = f"{type(exc).__name__}: {exc}"

    def _start(self) -> None:
        import torch

        from evaluators.engines import EngineStart, start_engine
        from merging import ResidentMerger
        from merging.checkpoint import resolve_model_dir

        spec, models = self.spec, self.spec.models
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.device = resolve_device(models.device)
        t0 = time.perf_counter()
        rooms = placement_rooms(spec, self.device)
        self.merger = ResidentMerger(
            models.base,
            list(models.finetunes),
            device=self.device,
            dtype=models.dtype,
            allow_pickle=models.allow_pickle,
            kernels=models.kernels,
            placement=models.placement,
            device_room=rooms.device,
            host_room=rooms.host,
            cache_dir=models.cache_dir,
        )
        self.merger.prepare(tuple(spec.space.methods), spec.space.seed)
        # after the merger: an engine that sizes itself (vLLM) sees what the merger holds
        self.engine = start_engine(
            EngineStart(
                str(resolve_model_dir(models.base)),
                self.device,
                models.dtype,
                trust_remote_code=models.trust_remote_code,
                threads=spec.threads,
                merge_reserve=rooms.merge_reserve,
            ),
            spec.evaluator,
        )
        self.evaluators: dict[str, Evaluator] = {}
        self._held: _Held | None = None
        for role in spec.roles:
            self.evaluator(role)
        self.setup_s = time.perf_counter() - t0

    def evaluator(self, role: Role) -> Evaluator:
        """The evaluator of a role ("search" or "report"), built on first use."""
        if role not in self.evaluators:
            seed = self.spec.fidelity_seed if role == "search" else None
            self.evaluators[role] = build_evaluator(self.spec.evaluator, role, order_seed=seed)
        return self.evaluators[role]

    def info(self) -> dict[str, Any]:
        """Where the worker runs and how; with "error" when it could not start."""
        import torch

        if self.start_error is not None:
            return {"index": self.index, "host": socket.gethostname(), "error": self.start_error}
        return {
            "index": self.index,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": self.device,
            "engine": self.engine.kind,
            "setup_s": round(self.setup_s, 3),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "evaluators": sorted(self.evaluators),  # the roles built so far
        }

    def run(
        self,
        recipe: dict[str, Any],
        role: Role = "search",
        items: int | None = None,
        rung: bool = False,
    ) -> WorkerResult:
        """Merge `recipe` (its YAML form) into the live model and evaluate it for `role`.

        rung: multi-fidelity's first rung: score the first `items` of each task's search items
        (None: all) and hold the candidate, so that `more` scores further items of it.
        """
        if self.start_error is not None:
            return WorkerResult(
                **self._where(), error=f"the worker could not start: {self.start_error}"
            )
        self._held = None
        try:
            t0 = time.perf_counter()
            self.engine.load(self.merger.candidate(recipe_from_dict(recipe)))
            t1 = time.perf_counter()
            if rung:
                self._held = _Held()
                metrics, flags, scores = self._score(items)
            else:
                result = self.evaluator(role).evaluate(self.engine)
                metrics, flags, scores = result.metrics, result.higher_is_better, None
            t2 = time.perf_counter()
        except Exception as exc:  # a failed candidate fails its trial, never the worker
            return self._failed(exc)
        return self._result(metrics, flags, merge_s=t1 - t0, eval_s=t2 - t1, rung=scores)

    def more(self, items: int | None) -> WorkerResult:
        """The held candidate (see `run`) scored up to `items` of each task (None: all), reusing the
        per-item scores it has; no second merge."""
        try:
            if self.start_error is not None or self._held is None:
                raise RuntimeError(
                    "this worker holds no candidate to score further (it was restarted or moved on)"
                )
            t0 = time.perf_counter()
            metrics, flags, scores = self._score(items)
        except Exception as exc:
            return self._failed(exc)
        return self._result(metrics, flags, eval_s=time.perf_counter() - t0, rung=scores)

    def _score(self, items: int | None) -> tuple[dict[str, float], dict[str, bool], RungScores]:
        """Score the held candidate's items from where it stopped up to `items` per task; its
        metrics are the means of every per-item score it has."""
        evaluator, held = self.evaluator("search"), self._held
        counts = evaluator.item_counts
        stop = max(counts.values()) if items is None else min(items, max(counts.values()))
        if stop > held.scored:
            result = evaluator.evaluate(self.engine, items=(held.scored, stop))
            for key, values in (result.per_item or {}).items():
                held.scores.setdefault(key, []).extend(values)
            held.flags.update(result.higher_is_better)
            held.scored = stop
        metrics, parts = evaluator.item_metrics(held.scores)
        flags = {k: held.flags.get(k, evaluator.higher_is_better(k)) for k in metrics}
        scored = {task: min(stop, n) for task, n in counts.items()}
        return metrics, flags, RungScores(stop=stop, items=scored, item_scores=parts)

    def _where(self) -> dict[str, Any]:
        return {"worker": f"{socket.gethostname()}:{os.getpid()}/{self.index}", "node": _ray_node()}

    def _result(
        self,
        metrics: dict[str, float],
        flags: dict[str, bool],
        *,
        merge_s: float = 0.0,
        eval_s: float,
        rung: RungScores | None,
    ) -> WorkerResult:
        return WorkerResult(
            **self._where(),
            metrics=dict(metrics),
            higher_is_better=dict(flags),
            merge_s=merge_s,
            eval_s=eval_s,
            rung=rung,
        )

    def _failed(self, exc: Exception) -> WorkerResult:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        self._held = None
        return WorkerResult(
            **self._where(),
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(limit=8),
        )


def _ray_node() -> str | None:
    """The Ray node this process runs on (its id), or None outside Ray."""
    ray = sys.modules.get("ray")  # a worker in a Ray actor has it loaded; elsewhere it is not ours
    try:
        return ray.get_runtime_context().get_node_id() if ray and ray.is_initialized() else None
    except Exception:  # no runtime context: placement is not known
        return None
