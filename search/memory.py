"""Each worker's memory plan, from the models' headers: what `basin validate` prints and checks.

A worker holds, on its device and in the study's dtype: the base, one task vector per fine-tune (a
LoRA adapter's factored: r x (d_in + d_out) per tensor it changes, expanded one tensor at a time),
the engine candidates are written into (the hf engine's live model; vLLM's copy of the weights,
its headroom and its KV cache) (the magnitude tables of TIES and breadcrumbs are on the
host, and stated in a note; DARE's and DELLA's draws are computed in place), the scratch of one
tensor's merge, and what evaluation needs on top (logits and their log-softmax for a batch, the KV
cache). The first four are fixed by the model set; the last grows with the batch and the sequence
length, so it is an estimate, which the evaluator section gives (evaluators/config.py:
memory_estimate).

The base and the full task vectors are placed in tiers (merging/placement.py, models.placement):
`auto` fills the device with what fits beside the rest and the estimate, then host memory up to
models.host_memory_gib, then disk; on a CPU device host memory is the device's own. The worker
calls the same `assign_tiers` with the rooms computed here, so it places each tensor as planned.
The plan prints per tier the bytes held and moved per candidate, and the least merge time from
bandwidths measured once per process.

A plan that fits nowhere (its device part beyond the GPU whatever the placement, an explicit host
placement beyond the host budget, a disk tier beyond the cache folder's free space) is refused;
one whose estimate exceeds the GPU gets a warning (lower evaluator.batch_size, or use `auto`).
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from evaluators.config import EVAL_TOKENS, EvaluatorSection, sequence_bytes
from evaluators.vllm_engine import HEADROOM_BYTES
from merging.catalog import method_spec
from merging.methods import TABLE_POINT_BYTES, TABLE_POINTS
from search.config import ConfigError, ModelsSection, StudyConfig

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GiB = 1024**3


@dataclass(frozen=True)
class TierPlan:
    """Where a worker holds the base and the full task vectors (merging/placement.py), and what
    that costs each candidate."""

    placement: str  # models.placement
    device: str  # "cuda" or "cpu"
    held: dict[str, int]  # bytes per tier
    base_on_device: int
    model_bytes: int  # one model in the merge dtype: what each candidate writes
    device_room: int | None  # what auto could put on the device (None: no limit known)
    host_room: int | None
    host_budget: int
    host_budget_from: str
    # device bytes for tensors on their way from host memory or disk (CUDA): two names' inputs
    # of the largest tensor held off the device; and that with every tensor off it
    staging: int
    staging_if_moved: int
    cache_dir: Path

    @property
    def all_on_device(self) -> bool:
        return self.held["host"] + self.held["disk"] == 0

    def seconds(self, bandwidth: dict[str, float]) -> dict[str, float]:
        """Per tier, the least time a candidate spends moving its bytes: every held tensor read
        once (copied to the device from host memory, read from disk), the live model written."""
        device_bytes = self.held["device"] + self.model_bytes
        if self.device == "cuda":  # what comes from host memory or disk is read on the device too
            device_bytes += self.held["host"] + self.held["disk"]
        out = {"device": device_bytes / bandwidth["device"]}
        for tier in ("host", "disk"):
            if self.held[tier]:
                out[tier] = self.held[tier] / bandwidth[tier]
        return out

    def lines(self, bandwidth: dict[str, float] | None) -> list[str]:
        cpu = self.device == "cpu"
        head = f"placement (models.placement: {self.placement}"
        if cpu:
            head += "; a CPU device: host memory is the device's own, so no host tier"
        out = [head + "):"]
        seconds = self.seconds(bandwidth) if bandwidth else {}
        what = {
            "device": "device copy",
            "host": "host to device" if not cpu else "same memory",
            "disk": "disk read (cold)",
        }
        for tier in ("device", "host", "disk"):
            moved = self.held[tier] + (self.model_bytes if tier == "device" else 0)
            row = (
                f"    {tier:<7} holds {_size(self.held[tier])}, moves {_size(moved)} per candidate"
            )
            if tier in seconds:
                row += f" at {bandwidth[tier] / 1e9:6.1f} GB/s ({what[tier]}): {_ms(seconds[tier])}"
            out.append(row)
        if self.held["disk"]:
            out.append(f"    disk tier folder: {self.cache_dir}")
        if bandwidth is None:
            out.append("    expected merge time: not measured (no such device on this machine)")
        if seconds:
            total = sum(seconds.values())
            overlap = " (CUDA overlaps host and disk copies with the merge)" if not cpu else ""
            out.append(
                f"    expected merge time per candidate: at least {_ms(total).strip()}, from "
                f"the bandwidths measured here{overlap}"
            )
        budget = f"host memory budget {self.host_budget / GiB:.1f} GiB ({self.host_budget_from})"
        return out + [f"    {budget}"]


@dataclass(frozen=True)
class MemoryPlan:
    fixed: list[tuple[str, int]]  # (what, bytes) held on the device for the whole study
    evaluation: tuple[str, int]  # the estimate on top, while a candidate is scored
    capacity: int | None = None  # bytes of the GPU it must fit, when known
    capacity_from: str = ""
    notes: list[str] = field(default_factory=list)
    tiers: TierPlan | None = None
    # the fixed rows with the base and every task vector on the device (for messages)
    all_on_device: list[tuple[str, int]] = field(default_factory=list)
    # of the fixed bytes, those the merger allocates only while a candidate merges (its scratch,
    # LoRA expansions, the placement's staging): free when an engine sizes itself at the start
    during_merge: int = 0

    @property
    def fixed_bytes(self) -> int:
        return sum(b for _, b in self.fixed)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.evaluation[1]

    def lines(self, measure: bool = True) -> list[str]:
        """The plan as `basin validate` prints it; measure: time the bandwidths the expected merge
        time needs (a 64 MiB copy, and a 64 MiB file read when something is on disk)."""
        rows = [*self.fixed, self.evaluation]
        width = max(len(what) for what, _ in rows)
        out = [f"  {what:<{width}}  {b / GiB:8.2f} GiB" for what, b in rows]
        out.append(
            f"  {'total':<{width}}  {self.total_bytes / GiB:8.2f} GiB"
            + (f" of {self.capacity / GiB:.1f} GiB ({self.capacity_from})" if self.capacity else "")
        )
        if self.tiers is not None:
            t = self.tiers
            bandwidth = (
                bandwidths(t.device, t.cache_dir if t.held["disk"] else None) if measure else {}
            )
            out += [f"  {line}" for line in t.lines(bandwidth)]
        return out + [f"  {note}" for note in self.notes]


def host_budget(models: ModelsSection) -> tuple[int, str]:
    """Host memory one worker may hold tensors in: models.host_memory_gib, else half of this
    machine's memory."""
    if models.host_memory_gib is not None:
        return int(
            models.host_memory_gib * GiB
        ), f"models.host_memory_gib: {models.host_memory_gib:g}"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 2, f"half of this machine's {total / GiB:.0f} GiB"


_MEASURE_BYTES = 64 * 2**20


@functools.cache
def bandwidths(device: str, disk_folder: Path | None = None) -> dict[str, float] | None:
    """Bytes per second measured once per process: "device" a copy on the device (bytes written;
    it reads as many), "host" host to device (pinned; on a CPU device the same memory, so the
    device copy), "disk" a cold read of a 64 MiB file in `disk_folder` (when given). None for a
    CUDA plan on a machine without CUDA."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return None
    dev = torch.device("cuda" if device == "cuda" else "cpu")

    def timed(fn) -> float:
        fn()  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    src = torch.empty(_MEASURE_BYTES, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    out = {"device": _MEASURE_BYTES / timed(lambda: dst.copy_(src))}
    if dev.type == "cuda":
        host = torch.empty(_MEASURE_BYTES, dtype=torch.uint8, pin_memory=True).fill_(1)
        out["host"] = _MEASURE_BYTES / timed(lambda: dst.copy_(host, non_blocking=True))
    else:
        out["host"] = out["device"]
    if disk_folder is not None:
        out["disk"] = _cold_read(disk_folder)
    return out


def _cold_read(folder: Path) -> float:
    """Bytes per second of reading a file just written and dropped from the page cache."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".bandwidth-{os.getpid()}"
    try:
        with open(path, "wb") as f:
            f.write(os.urandom(2**20) * (_MEASURE_BYTES // 2**20))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buffer = bytearray(8 * 2**20)
            t0 = time.perf_counter()
            while os.readv(fd, [buffer]):
                pass
            return _MEASURE_BYTES / (time.perf_counter() - t0)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)


def memory_plan(
    config: StudyConfig, capacity: int | None = None, capacity_from: str = ""
) -> MemoryPlan:
    """The plan of one worker of this study (local model folders or cached hub models)."""
    return worker_plan(
        config.models,
        config.evaluator,
        config.space.methods,
        plan_device(config),
        capacity,
        capacity_from,
    )


def plan_device(config: StudyConfig) -> str:
    """The kind of device a worker of this study merges on: "cuda" or "cpu"."""
    device = config.models.device
    gpu = device.startswith("cuda") or (device == "auto" and config.workers.gpus_per_worker > 0)
    return "cuda" if gpu else "cpu"


def worker_plan(
    models: ModelsSection,
    evaluator: EvaluatorSection,
    methods: Sequence[str],
    device: str,
    capacity: int | None = None,
    capacity_from: str = "",
) -> MemoryPlan:
    """The plan of one worker that merges `models` on a `device` ("cuda" or "cpu") of `capacity`
    bytes and scores them with `evaluator`; the same plan the worker places its tensors by."""
    from merging import Checkpoint
    from merging.checkpoint import resolve_model_dir

    base = Checkpoint(models.base, allow_pickle=models.allow_pickle)
    floats = [n for n in base.names if base.dtype(n).is_floating_point]
    numel = {n: _numel(base.shape(n)) for n in floats}
    # a LoRA adapter's task vectors are held factored: r x (d_in + d_out) per tensor it changes
    ckpts = [Checkpoint(p, allow_pickle=models.allow_pickle) for p in models.finetunes]
    adapters = [ck.adapter for ck in ckpts if ck.adapter is not None]
    full = [k for k, ck in enumerate(ckpts) if ck.adapter is None]
    shape = json.loads((resolve_model_dir(models.base) / "config.json").read_text())
    return plan_from_sizes(
        models,
        evaluator,
        methods,
        device,
        numel,
        full,
        adapters,
        shape,
        capacity,
        capacity_from,
    )


def plan_from_sizes(
    models: ModelsSection,
    evaluator: EvaluatorSection,
    methods: Sequence[str],
    device: str,
    numel: dict[str, int],
    full: list[int],
    adapters: list,
    shape: dict,
    capacity: int | None = None,
    capacity_from: str = "",
) -> MemoryPlan:
    """The plan from the tensors' sizes (`numel` per floating tensor of the base), the full
    fine-tunes' indices, the LoRA adapters and the model's config.json (`shape`)."""
    n_ft, width = len(models.finetunes), BYTES[models.dtype]
    params = sum(numel.values())
    model_bytes = params * width
    n_full = len(full)
    unmovable: list[tuple[str, int]] = []
    if adapters:
        factored = sum(a.held_numel() for a in adapters) * width
        unmovable.append((f"LoRA task vectors, factored ({len(adapters)} adapters)", factored))
    vllm = evaluator.engine == "vllm"
    if vllm:
        unmovable += [
            ("vLLM engine: its copy of the weights", model_bytes),
            ("headroom beside vLLM (CUDA context, allocator)", HEADROOM_BYTES),
        ]
    else:
        unmovable.append(("live model", model_bytes))
    notes = []
    if any(method_spec(m).magnitude_ranked for m in methods):
        tables = n_ft * len(numel) * (TABLE_POINTS + 1) * TABLE_POINT_BYTES
        notes.append(
            f"magnitude tables (TIES, breadcrumbs): {tables / 2**20:.1f} MiB of host memory, "
            "not on the GPU"
        )
    largest = max(numel.values())
    # what the merger allocates only while a candidate merges
    transient = [("merge scratch (largest tensor, float32, x4)", 4 * 4 * largest)]
    if adapters:  # each adapter's task vector at the tensor being merged, expanded
        adapted = max(numel[n] for a in adapters for n in a.targets)
        transient.append(
            (
                f"LoRA expansion (largest adapted tensor, x{len(adapters)})",
                len(adapters) * adapted * width,
            )
        )
    unmovable += transient
    if vllm:
        evaluation, note = _vllm_cache(evaluator, shape, width, model_bytes, capacity)
        notes.append(note)
    else:
        estimate = evaluator.memory_estimate(shape, width)
        evaluation = (estimate.what, estimate.bytes)
        notes += estimate.notes
    tiers = _tiers(models, device, numel, full, unmovable, evaluation[1], capacity)
    fixed = [("base" + _part(tiers.base_on_device, model_bytes), tiers.base_on_device)]
    if n_full or not adapters:
        vectors = tiers.held["device"] - tiers.base_on_device
        label = f"task vectors ({n_full} fine-tunes)" + _part(vectors, n_full * model_bytes)
        fixed.append((label, vectors))
    if tiers.staging:
        staging = ("placement staging (two tensors' inputs on their way)", tiers.staging)
        unmovable.append(staging)
        transient.append(staging)
    fixed += unmovable
    everything = [
        ("base", model_bytes),
        (f"task vectors ({n_full} fine-tunes)", n_full * model_bytes),
    ]
    return MemoryPlan(
        fixed,
        evaluation,
        capacity,
        capacity_from,
        notes,
        tiers=tiers,
        all_on_device=everything + [r for r in unmovable if not r[0].startswith("placement")],
        during_merge=sum(b for _, b in transient),
    )


def _tiers(
    models: ModelsSection,
    device: str,
    numel: dict[str, int],
    full: list[int],
    unmovable: list[tuple[str, int]],
    evaluation: int,
    capacity: int | None,
) -> TierPlan:
    """Which tier each held tensor lands in (merging.placement.assign_tiers, as the worker calls
    it), and what that holds and moves per tier."""
    from merging.placement import (
        BASE,
        assign_tiers,
        auto_device_room,
        default_cache_dir,
        held_items,
    )

    width = BYTES[models.dtype]
    items = held_items(list(numel), numel, full, width)
    budget, budget_from = host_budget(models)
    beside = sum(b for _, b in unmovable) + evaluation
    per_byte = 2 * (1 + len(full))  # CUDA staging: two names' inputs on their way
    staging = 0
    if device == "cpu":  # the device's memory is host memory: one budget, no host tier
        device_room, host_room = budget - beside, 0
    else:
        host_room = budget
        device_room = None
        if capacity is not None and models.placement == "auto":
            device_room, staging = auto_device_room(items, capacity - beside, per_byte, host_room)
    tiers = assign_tiers(items, models.placement, device_room, host_room)
    held = dict.fromkeys(("device", "host", "disk"), 0)
    base_on_device = 0
    for key, nbytes in items:
        held[tiers[key]] += nbytes
        if key[0] == BASE and tiers[key] == "device":
            base_on_device += nbytes
    if device == "cuda" and models.placement != "auto" and models.placement != "device":
        staging = per_byte * max(numel.values()) * width
    return TierPlan(
        placement=models.placement,
        device=device,
        held=held,
        base_on_device=base_on_device,
        model_bytes=sum(numel.values()) * width,
        device_room=device_room,
        host_room=host_room,
        host_budget=budget,
        host_budget_from=budget_from,
        staging=staging,
        staging_if_moved=per_byte * max(numel.values()) * width,
        cache_dir=Path(models.cache_dir) if models.cache_dir else default_cache_dir(),
    )


def _size(nbytes: int) -> str:
    """GiB, or MiB below one GiB (tiny test models)."""
    if nbytes >= GiB or nbytes == 0:
        return f"{nbytes / GiB:8.2f} GiB"
    return f"{nbytes / 2**20:8.2f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:8.3f} ms"


def _part(on_device: int, whole: int) -> str:
    return "" if on_device == whole else f" (on the device: {on_device / whole:.0%} of it)"


def _vllm_cache(
    evaluator: EvaluatorSection, shape: dict, width: int, model_bytes: int, capacity: int | None
) -> tuple[tuple[str, int], str]:
    """The vllm engine's KV cache row: its share of the GPU less its weights, or (share unset)
    at least one sequence, the engine taking what the GPU has left."""
    share = evaluator.vllm_options.gpu_memory_utilization
    one = sequence_bytes(shape, 1, EVAL_TOKENS, width)
    if share is not None and capacity is not None:
        cache = max(0, int(share * capacity) - model_bytes)
        what = f"vLLM KV cache (gpu_memory_utilization {share:g} of the GPU, less its weights)"
        return (what, cache), (
            f"vLLM takes {share:g} of the GPU ({share * capacity / GiB:.1f} GiB) when it starts"
        )
    what = f"vLLM KV cache (at least one sequence of {EVAL_TOKENS} tokens)"
    return (what, one), (
        "vLLM's share of the GPU: what is free once the merger holds its tensors, less "
        f"{HEADROOM_BYTES / GiB:.0f} GiB (set evaluator.vllm.gpu_memory_utilization to fix it)"
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_fits(plan: MemoryPlan) -> str | None:
    """Refuse a plan that fits nowhere: its device part beyond the GPU, its host tier beyond the
    host memory budget, its disk tier beyond the cache folder's free space.

    Returns a warning when only the estimate does not fit, else None.
    """
    t = plan.tiers
    if plan.capacity is not None and plan.fixed_bytes > plan.capacity:
        rows = plan.all_on_device or plan.fixed
        biggest = max(rows, key=lambda row: row[1])
        message = (
            f"one worker needs {sum(b for _, b in rows) / GiB:.1f} GiB before it scores anything, "
            f"more than the {plan.capacity / GiB:.1f} GiB of its GPU ({plan.capacity_from}); the "
            f"largest part is {biggest[0]} ({biggest[1] / GiB:.1f} GiB). "
        )
        if t is not None and t.device == "cuda":
            stays = plan.fixed_bytes - t.held["device"] - t.staging
            if t.placement != "auto" and stays + t.staging_if_moved <= plan.capacity:
                message += (
                    f"Set models.placement: auto (it is {t.placement}) to hold the base and task "
                    f"vectors in host memory or on disk; {stays / GiB:.1f} GiB stay on the GPU"
                )
            else:
                message += (
                    f"Even with the base and every task vector off the GPU, {stays / GiB:.1f} GiB "
                    "stay on it (the engine, the merge scratch): use a 16-bit models.dtype or a "
                    "GPU with more memory"
                )
        else:
            message += "Use fewer fine-tunes, a 16-bit models.dtype, or a GPU with more memory"
        raise ConfigError(message)
    warnings = []
    if t is not None:
        if t.device == "cuda" and t.held["host"] > t.host_budget:
            raise ConfigError(
                f"models.placement: {t.placement} holds {t.held['host'] / GiB:.1f} GiB in host "
                f"memory, more than the worker's {t.host_budget / GiB:.1f} GiB "
                f"({t.host_budget_from}); set models.placement: auto (or disk), or raise "
                "models.host_memory_gib"
            )
        if t.held["disk"] and t.held["disk"] > (free := _free_for_cache(t.cache_dir)):
            raise ConfigError(
                f"the disk tier holds {t.held['disk'] / GiB:.1f} GiB of task vectors, more than "
                f"the {free / GiB:.1f} GiB free in {t.cache_dir}; set models.cache_dir to a "
                "larger disk, or raise models.host_memory_gib"
            )
        if t.device == "cpu":
            used = plan.fixed_bytes + t.held["host"] + plan.evaluation[1]
            if used > t.host_budget:
                warnings.append(
                    f"a CPU worker holds {used / GiB:.1f} GiB, more than its host memory budget "
                    f"of {t.host_budget / GiB:.1f} GiB ({t.host_budget_from})"
                    + (
                        "; models.placement: auto (or disk) maps task vectors from disk instead"
                        if t.placement != "auto"
                        else ""
                    )
                )
    if plan.capacity is not None and plan.total_bytes > plan.capacity:
        warnings.append(
            f"with evaluation the plan is {plan.total_bytes / GiB:.1f} GiB, more than the "
            f"{plan.capacity / GiB:.1f} GiB of the GPU: lower evaluator.batch_size "
            "(or set it to auto)"
        )
    return "; ".join(warnings) or None


def _free_for_cache(folder: Path) -> int:
    """Free bytes for the disk tier: the disk's free space, plus what cache files hold already."""
    import shutil

    existing = folder
    while not existing.exists():
        existing = existing.parent
    cached = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0
    return shutil.disk_usage(existing).free + cached


def gpu_capacity(config: StudyConfig) -> tuple[int | None, str]:
    """The memory each worker's GPU has: workers.gpu_memory_gib, else this machine's first GPU when
    the workers use GPUs, else unknown."""
    if config.workers.gpu_memory_gib is not None:
        gib = config.workers.gpu_memory_gib
        return int(gib * GiB), f"workers.gpu_memory_gib: {gib:g}"
    if config.workers.gpus_per_worker > 0:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            share = props.total_memory * min(1.0, config.workers.gpus_per_worker)
            return int(share), f"{props.name} here" + (
                f", {config.workers.gpus_per_worker:g} of it" if share < props.total_memory else ""
            )
    return None, ""
