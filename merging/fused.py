"""Compiled merge kernels: the task-vector family (task_arithmetic, ties, dare_*) in one fused pass.

In eager torch every op is one pass over memory, and a TIES merge of three models takes about 30 of
them (masks, sign election, agreement, disjoint mean, the finite check). torch.compile (inductor:
C++ with OpenMP on a CPU, Triton on a GPU) turns the same arithmetic into one kernel that reads each
input once and writes the output once. `combine_into` computes what `methods.combine` computes, in
the same order of operations; a compiler may still contract a multiply and an add into one rounding,
so the two agree to float32 rounding, not always to the bit. The resident path and the export use
the same kernels for the same setting and device, so they stay bit-identical to each other.

Kernels setting: "eager" (plain torch ops), "compiled", or "auto" (compiled on CUDA, eager on a CPU,
where a first compile of some seconds would dominate short runs and the test suite). The first call
of each variant (number of models, keep rule, sign election, normalize) compiles; inductor caches
the result on disk, so later processes start faster. Where compiling fails (no C++ compiler, say),
a warning is printed once and eager ops are used from then on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from merging.errors import unknown

KERNELS = ("auto", "eager", "compiled")


def resolve_kernels(kernels: str, device: str | torch.device) -> str:
    """'eager' or 'compiled' for a kernels setting on a device."""
    if kernels not in KERNELS:
        raise unknown("kernels setting", kernels, KERNELS)
    if kernels == "auto":
        return "compiled" if torch.device(device).type == "cuda" else "eager"
    return kernels


def _kernel(
    out: Tensor, base: Tensor, deltas: list[Tensor], draws: list[Tensor], coeffs: Tensor, cuts: Tensor,
    signs: Tensor, weights: Tensor, lam: Tensor, keep: str, consensus: bool, normalize: bool,
) -> Tensor:
    """Write the merge into `out` and return whether all of it is finite (after the cast to out's dtype).

    coeffs[k]: the factor of task vector k (lam * w * scale / divisor without sign election, w * scale
    with it); cuts[k]: its magnitude threshold or DARE byte cutoff; signs[k]: the sign of w_k;
    weights[k]: w_k, for the disjoint mean's divisor.
    """
    b = base.float()
    ds = [d.float() for d in deltas]
    if keep == "magnitude":
        masks = [d.abs() >= cuts[k] for k, d in enumerate(ds)]
    elif keep == "draw":  # compared as floats: a cutoff of 256 keeps every byte
        masks = [dr < cuts[k] for k, dr in enumerate(draws)]
    else:
        masks = [None] * len(ds)
    if not consensus:
        result = b
        for k, (d, m) in enumerate(zip(ds, masks)):
            result = result + coeffs[k] * (d if m is None else d * m)
    else:
        kept = [d if m is None else d * m for d, m in zip(ds, masks)]
        total = torch.zeros_like(b)
        for k, d in enumerate(kept):
            total = total + coeffs[k] * d
        elected = torch.where(total >= 0, 1.0, -1.0)
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b)
        for k, (d, m) in enumerate(zip(ds, masks)):
            agree = (d * elected) * signs[k] > 0
            if m is not None:
                agree = agree & m
            mixed = mixed + coeffs[k] * (d * agree)
            divisor = divisor + weights[k] * agree
        if normalize:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        result = mixed * lam + b
    out.copy_(result)
    return torch.isfinite(out).all()


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
        _compiled = torch.compile(_kernel, dynamic=True, fullgraph=True)
    return _compiled


def combine_into(
    out: Tensor,
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    keep: str,
    cuts: Sequence[float],
    draws: Sequence[Tensor] | None,
    scales: Sequence[float],
    consensus: bool,
    normalize: bool,
    lam: float,
    compiled: bool,
) -> bool:
    """`methods.combine` written into `out` by one kernel; returns whether `out` is all finite.

    keep: "all", "magnitude" (|delta_k| >= cuts[k]) or "draw" (draws[k] < cuts[k]).
    """
    global _broken
    if consensus:
        coeffs = [w * s for w, s in zip(weights, scales)]
    else:
        divisor = float(sum(weights)) if normalize else 1.0
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        coeffs = [lam * w * s / divisor for w, s in zip(weights, scales)]
    dev = out.device
    args = (
        out, base, list(deltas), list(draws or []), torch.tensor(coeffs, dtype=torch.float32, device=dev),
        torch.tensor(list(cuts) or [0.0] * len(deltas), dtype=torch.float32, device=dev),
        torch.tensor([1.0 if w > 0 else -1.0 for w in weights], device=dev),
        torch.tensor(list(weights), dtype=torch.float32, device=dev),
        torch.tensor(lam, dtype=torch.float32, device=dev), keep, consensus, normalize,
    )
    if compiled and _broken is None:
        try:
            return bool(_compiled_kernel()(*args))
        except Exception as exc:  # the compiler, not the merge: the same arithmetic runs eagerly below
            _broken = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            warnings.warn(f"compiled merge kernels are unavailable here ({_broken}); using eager torch ops",
                          RuntimeWarning, stacklevel=2)
    with torch.no_grad():
        return bool(_kernel(*args))
