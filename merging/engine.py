"""One tensor's merge from a recipe: resolve the per-tensor scalars, then run the method in chunks.

Both the resident path (search) and the streaming export call `merge_tensor` with the same inputs,
so they produce the same bits on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from merging import fused, methods
from merging.errors import MergeError
from merging.layers import LayerMap
from merging.recipe import MergeRecipe

# Elements per chunk: on a CPU the passes of TIES/DARE then stay in the last-level cache. Smaller
# chunks multiply torch's per-op cost and its thread hand-offs (costly on a busy machine); on a
# GPU one launch per tensor is cheaper.
CPU_CHUNK = 1 << 20
GPU_CHUNK = 1 << 28


class NonFiniteMergeError(MergeError):
    """A candidate's merged weights contain NaN or inf."""


@dataclass(frozen=True)
class TensorScalars:
    """The recipe's values at one tensor's place."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float
    t: float


@dataclass
class TensorInputs:
    """What one tensor's merge reads: the reference tensor, task vectors and their precomputed aids."""

    base: Tensor
    deltas: list[Tensor]
    tables: list[Tensor | methods.MagnitudeRanks] | None = None  # magnitude tables, for TIES
    draws: list[Tensor] | None = None  # DARE bytes, for dare_*


def plan_scalars(recipe: MergeRecipe, layer_map: LayerMap) -> dict[str, TensorScalars]:
    """Per-tensor scalars for every tensor; checks per-layer lists and zero weights up front."""
    params = [("parameters.lambda", recipe.lam), ("parameters.t", recipe.t)]
    for i, m in enumerate(recipe.models):
        params += [(f"models[{i}].weight", m.weight), (f"models[{i}].density", m.density)]
    for where, param in params:
        if param.max_anchors() > layer_map.num_layers:
            raise MergeError(
                f"{where} has {param.max_anchors()} values over depth but the model has "
                f"{layer_map.num_layers} layers: give at most one value per layer (fewer are interpolated)"
            )
    plan = {}
    for name, place in layer_map.places.items():
        weights = tuple(m.weight.at(place.depth, place.kind) for m in recipe.models)
        if recipe.method != "slerp" and recipe.normalize_ and all(w == 0.0 for w in weights):
            raise MergeError(
                f"every model's weight is 0 at tensor '{name}' and normalize is on, so the merge "
                "divides by zero: give at least one model a non-zero weight there, or set normalize: false"
            )
        if recipe.method == "linear" and recipe.normalize_ and abs(sum(weights)) < 1e-12:
            raise MergeError(
                f"the models' weights {list(weights)} sum to 0 at tensor '{name}' and linear with normalize "
                "divides by that sum: give weights with a non-zero sum there, or set normalize: false"
            )
        plan[name] = TensorScalars(
            weights=weights,
            densities=tuple(m.density.at(place.depth, place.kind) for m in recipe.models),
            lam=recipe.lam.at(place.depth, place.kind),
            t=recipe.t.at(place.depth, place.kind),
        )
    return plan


def merge_tensor(
    recipe: MergeRecipe, name: str, s: TensorScalars, x: TensorInputs, out: Tensor, *, check_finite: bool = True,
    kernels: str = "eager",
) -> None:
    """Write tensor `name`'s merge into `out` (same shape; any float dtype) without full-size copies.

    kernels: "eager" (torch ops) or "compiled" (one fused kernel per chunk for the task-vector
    family; see merging.fused). linear and slerp always run eagerly.
    """
    try:
        _merge_into(recipe, s, x, out, check_finite, kernels == "compiled")
    except NonFiniteMergeError:
        raise NonFiniteMergeError(
            f"the merged tensor '{name}' contains NaN or inf; lower the weights or lambda of this recipe"
        ) from None
    except RuntimeError as exc:  # a coefficient beyond float32 ("cannot be converted ... without overflow")
        if "overflow" not in str(exc):
            raise
        raise NonFiniteMergeError(
            f"the coefficients of tensor '{name}' overflow float32 (weights {s.weights}, lambda {s.lam}); "
            "lower the weights or lambda of this recipe"
        ) from None


def _merge_into(recipe: MergeRecipe, s: TensorScalars, x: TensorInputs, out: Tensor, check_finite: bool,
                compiled: bool) -> None:
    method = recipe.method
    with torch.no_grad():
        if method == "slerp":
            a = x.base.float() + x.deltas[0].float()
            b = x.base.float() + x.deltas[1].float()
            result = methods.slerp(a, b, s.t)
            out.copy_(result)
            _finite(out, check_finite)  # after the cast: float16 can overflow where float32 did not
            return
        active = [k for k, w in enumerate(s.weights) if w != 0.0]  # zero weights change nothing
        chunk = GPU_CHUNK if out.device.type == "cuda" else CPU_CHUNK
        flat_out = out.view(-1)
        flat_base = x.base.reshape(-1)
        flat_deltas = [x.deltas[k].reshape(-1) for k in active]
        weights = [s.weights[k] for k in active]
        thresholds = cutoffs = None
        scales = [1.0] * len(active)
        if method == "ties":
            assert x.tables is not None, "TIES needs magnitude tables"
            thresholds = [methods.magnitude_threshold(x.tables[k], s.densities[k]) for k in active]
        elif method in ("dare_linear", "dare_ties"):
            assert x.draws is not None, "DARE needs its draws"
            cut = [methods.dare_cutoff(s.densities[k]) for k in active]
            cutoffs = [c for c, _ in cut]
            if recipe.rescale_:
                scales = [1.0 / p for _, p in cut]
            flat_draws = [x.draws[k].reshape(-1) for k in active]
        consensus = method in ("ties", "dare_ties")
        for start in range(0, flat_out.numel(), chunk):
            stop = min(start + chunk, flat_out.numel())
            if compiled and method != "linear":  # one kernel: mask, elect, mix, cast, check
                finite = fused.combine_into(
                    flat_out[start:stop], flat_base[start:stop], [d[start:stop] for d in flat_deltas], weights,
                    keep="magnitude" if thresholds is not None else "draw" if cutoffs is not None else "all",
                    cuts=thresholds or cutoffs or [], draws=[dr[start:stop] for dr in flat_draws] if cutoffs else None,
                    scales=scales, consensus=consensus, normalize=recipe.normalize_, lam=s.lam, compiled=True,
                )
                if check_finite and not finite:
                    raise NonFiniteMergeError("non-finite values in a merged tensor")
                continue
            base = flat_base[start:stop].float()
            deltas = [d[start:stop].float() for d in flat_deltas]
            if method == "linear":
                result = methods.linear(base, deltas, weights, normalize=recipe.normalize_)
            else:
                if thresholds is not None:
                    keep = [d.abs() >= thr for d, thr in zip(deltas, thresholds)]
                elif cutoffs is not None:  # a cutoff of 256 keeps every byte (and overflows uint8)
                    keep = [None if c >= methods.DARE_LEVELS else dr[start:stop] < c for dr, c in zip(flat_draws, cutoffs)]
                else:
                    keep = [None] * len(deltas)
                result = methods.combine(
                    base, deltas, weights, keep=keep, scales=scales, consensus=consensus,
                    normalize=recipe.normalize_, lam=s.lam,
                )
            flat_out[start:stop].copy_(result)
            _finite(flat_out[start:stop], check_finite)  # after the cast, as above


def _finite(t: Tensor, check: bool) -> None:
    if check and not methods.all_finite(t):
        raise NonFiniteMergeError("non-finite values in a merged tensor")
