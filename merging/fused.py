"""Compiled merge kernels: the task-vector family (merging/catalog.py) in one fused pass.

In eager torch every op is one pass over memory, and a TIES merge of three models takes about 30 of
them (masks, sign election, agreement, disjoint mean, the finite check). torch.compile (inductor:
C++ with OpenMP on a CPU, Triton on a GPU) turns the same arithmetic into one kernel that reads each
input once and writes the output once. It compiles `methods.task_vector_chunk` itself, the function
the eager path runs, on the same `methods.TaskVectorChunk`; a compiler may still contract a
multiply and an add into one rounding, so the two agree to float32 rounding, not always to the bit.
The resident path and the export use the same kernels for the same setting and device, so they
stay bit-identical to each other.

Kernels setting: "eager" (plain torch ops), "compiled", or "auto": compiled on CUDA, and on a CPU
for model sets of CPU_COMPILE_PARAMS parameters or more (there a TIES candidate merges about 25x
faster compiled, so the compile of some seconds pays back within a few candidates); eager on a CPU
for smaller models, where the compile would dominate short runs and the test suite. The first call
of each variant (number of models, keep rule, sign election, normalize, rescale) compiles;
inductor caches the result on disk, so later processes start faster. Where compiling fails (no C++
compiler, say), a warning is printed once and eager ops are used from then on.
"""

from __future__ import annotations

import warnings

import torch

from merging import methods
from merging.errors import unknown

KERNELS = ("auto", "eager", "compiled")


CPU_COMPILE_PARAMS = 20_000_000  # "auto" compiles on a CPU from this many parameters per model


def resolve_kernels(kernels: str, device: str | torch.device, params: int) -> str:
    """'eager' or 'compiled' for a kernels setting on a device, for models of `params` parameters
    (floating-point entries of the base)."""
    if kernels not in KERNELS:
        raise unknown("kernels setting", kernels, KERNELS)
    if kernels == "auto":
        big = params >= CPU_COMPILE_PARAMS
        return "compiled" if torch.device(device).type == "cuda" or big else "eager"
    return kernels


_compiled = None
_broken: str | None = None  # why compiling failed, once it has


def _compiled_kernel():
    global _compiled
    if _compiled is None:
        # one compiled graph per variant; a search or a test run may use a few dozen of them
        # (the setting's older name is cache_size_limit)
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _compiled = torch.compile(methods.task_vector_chunk, dynamic=True, fullgraph=True)
    return _compiled


def run_chunk(chunk: methods.TaskVectorChunk, *, compiled: bool) -> bool | None:
    """`methods.task_vector_chunk(chunk)`, compiled when asked and compiling works."""
    global _broken
    if compiled and _broken is None:
        try:
            result = _compiled_kernel()(chunk)
            return None if result is None else bool(result)
        except Exception as exc:
            # the compiler failed, not the merge: the same arithmetic runs eagerly below
            first_line = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            _broken = f"{type(exc).__name__}: {first_line}"
            warnings.warn(
                f"compiled merge kernels are unavailable here ({_broken}); using eager torch ops",
                RuntimeWarning,
                stacklevel=2,
            )
    with torch.no_grad():
        result = methods.task_vector_chunk(chunk)
    return None if result is None else bool(result)
