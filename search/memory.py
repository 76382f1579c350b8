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

A plan whose fixed part exceeds the GPU cannot run at any batch size and is refused; one whose
estimate exceeds it gets a warning (lower evaluator.batch_size, or use `auto`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from evaluators.config import EVAL_TOKENS, sequence_bytes
from evaluators.vllm_engine import HEADROOM_BYTES
from merging.catalog import method_spec
from merging.methods import TABLE_POINT_BYTES, TABLE_POINTS
from search.config import ConfigError, StudyConfig

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GiB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    fixed: list[tuple[str, int]]  # (what, bytes) held for the whole study
    evaluation: tuple[str, int]  # the estimate on top, while a candidate is scored
    capacity: int | None = None  # bytes of the GPU it must fit, when known
    capacity_from: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        return sum(b for _, b in self.fixed)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.evaluation[1]

    def lines(self) -> list[str]:
        rows = [*self.fixed, self.evaluation]
        width = max(len(what) for what, _ in rows)
        out = [f"  {what:<{width}}  {b / GiB:8.2f} GiB" for what, b in rows]
        out.append(
            f"  {'total':<{width}}  {self.total_bytes / GiB:8.2f} GiB"
            + (f" of {self.capacity / GiB:.1f} GiB ({self.capacity_from})" if self.capacity else "")
        )
        return out + [f"  {note}" for note in self.notes]


def memory_plan(
    config: StudyConfig, capacity: int | None = None, capacity_from: str = ""
) -> MemoryPlan:
    """The plan of one worker of this study (local model folders or cached hub models)."""
    from merging import Checkpoint
    from merging.checkpoint import resolve_model_dir

    models = config.models
    base = Checkpoint(models.base, allow_pickle=models.allow_pickle)
    floats = [n for n in base.names if base.dtype(n).is_floating_point]
    sizes = [_numel(base.shape(n)) for n in floats]
    params, n_ft, width = sum(sizes), len(models.finetunes), BYTES[models.dtype]
    model_bytes = params * width
    # a LoRA adapter's task vectors are held factored: r x (d_in + d_out) per tensor it changes
    adapters = [
        ck.adapter
        for ck in (Checkpoint(p, allow_pickle=models.allow_pickle) for p in models.finetunes)
        if ck.adapter is not None
    ]
    n_full = n_ft - len(adapters)
    fixed = [("base", model_bytes)]
    if n_full or not adapters:
        fixed.append((f"task vectors ({n_full} fine-tunes)", n_full * model_bytes))
    if adapters:
        factored = sum(a.held_numel() for a in adapters) * width
        fixed.append((f"LoRA task vectors, factored ({len(adapters)} adapters)", factored))
    vllm = config.evaluator.engine == "vllm"
    if vllm:
        fixed += [
            ("vLLM engine: its copy of the weights", model_bytes),
            ("headroom beside vLLM (CUDA context, allocator)", HEADROOM_BYTES),
        ]
    else:
        fixed.append(("live model", model_bytes))
    notes = []
    if any(method_spec(m).magnitude_ranked for m in config.space.methods):
        tables = n_ft * len(floats) * (TABLE_POINTS + 1) * TABLE_POINT_BYTES
        notes.append(
            f"magnitude tables (TIES, breadcrumbs): {tables / 2**20:.1f} MiB of host memory, "
            "not on the GPU"
        )
    fixed.append(("merge scratch (largest tensor, float32, x4)", 4 * 4 * max(sizes)))
    if adapters:  # each adapter's task vector at the tensor being merged, expanded
        largest = max(_numel(base.shape(n)) for a in adapters for n in a.targets)
        fixed.append(
            (
                f"LoRA expansion (largest adapted tensor, x{len(adapters)})",
                len(adapters) * largest * width,
            )
        )
    shape = json.loads((resolve_model_dir(models.base) / "config.json").read_text())
    if vllm:
        evaluation, note = _vllm_cache(config, shape, width, model_bytes, capacity)
        notes.append(note)
    else:
        estimate = config.evaluator.memory_estimate(shape, width)
        evaluation = (estimate.what, estimate.bytes)
        notes += estimate.notes
    return MemoryPlan(fixed, evaluation, capacity, capacity_from, notes)


def _vllm_cache(
    config: StudyConfig, shape: dict, width: int, model_bytes: int, capacity: int | None
) -> tuple[tuple[str, int], str]:
    """The vllm engine's KV cache row: its share of the GPU less its weights, or (share unset)
    at least one sequence, the engine taking what the GPU has left."""
    share = config.evaluator.vllm_options.gpu_memory_utilization
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
    """Refuse a plan whose fixed part cannot fit its GPU.

    Returns a warning when only the estimate does not fit, else None.
    """
    if plan.capacity is None:
        return None
    if plan.fixed_bytes > plan.capacity:
        biggest = max(plan.fixed, key=lambda row: row[1])
        raise ConfigError(
            f"one worker needs {plan.fixed_bytes / GiB:.1f} GiB before it scores anything, more "
            f"than the {plan.capacity / GiB:.1f} GiB of its GPU ({plan.capacity_from}); the "
            f"largest part is {biggest[0]} ({biggest[1] / GiB:.1f} GiB). Use fewer fine-tunes, "
            "a 16-bit models.dtype, or a GPU with more memory"
        )
    if plan.total_bytes > plan.capacity:
        return (
            f"with evaluation the plan is {plan.total_bytes / GiB:.1f} GiB, more than the "
            f"{plan.capacity / GiB:.1f} GiB of the GPU: lower evaluator.batch_size "
            "(or set it to auto)"
        )
    return None


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
