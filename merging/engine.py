"""One tensor's merge from a recipe: resolve the per-tensor scalars, then run the method in chunks.

Both the resident path (search) and the streaming export call `merge_tensor` with the same inputs,
so they produce the same bits on the same device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from merging import fused, methods
from merging.catalog import PER_MODEL, Family, Keep, Method, method_spec
from merging.errors import MergeError
from merging.layers import LayerMap
from merging.recipe import MergeRecipe

# Elements per chunk: on a CPU the passes of TIES/DARE then stay in the last-level cache. Smaller
# chunks multiply torch's per-op cost and its thread hand-offs (costly on a busy machine); on a
# GPU one launch per tensor is cheaper.
CPU_CHUNK = 1 << 20
GPU_CHUNK = 1 << 28
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_KEEP_ALL = (-1.0, -1)  # a lower magnitude bound every entry passes


class NonFiniteMergeError(MergeError):
    """A candidate's merged weights contain NaN or inf."""


class _CoefficientOverflow(Exception):
    """A coefficient of the merge does not fit float32; `merge_tensor` reports it with the
    recipe's values at the tensor."""


@dataclass(frozen=True)
class TensorScalars:
    """The recipe's values at one tensor's place."""

    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float
    t: float
    gammas: tuple[float, ...] = ()
    epsilons: tuple[float, ...] = ()


@dataclass
class TensorInputs:
    """What one tensor's merge reads: the reference tensor, the task vectors, and what depends on
    them alone: for magnitude keep rules each task vector's magnitude order, for model_stock its
    ratio, for nuslerp the angles between the two task vectors (each computed here when not given;
    a resident merger computes them once for all candidates)."""

    base: Tensor
    deltas: list[Tensor]
    orders: list[methods.MagnitudeOrder] | None = None
    stock_ratio: float | None = None
    nuslerp_angles: tuple[Tensor, Tensor] | None = None


def plan_scalars(recipe: MergeRecipe, layer_map: LayerMap) -> dict[str, TensorScalars]:
    """Per-tensor scalars for every tensor; checks per-layer lists and zero weights up front."""
    params = [("parameters.lambda", recipe.lam), ("parameters.t", recipe.t)]
    for i, m in enumerate(recipe.models):
        params += [(f"models[{i}].{key}", getattr(m, key)) for key in PER_MODEL]
    for where, param in params:
        if param.max_anchors() > layer_map.num_layers:
            raise MergeError(
                f"{where} has {param.max_anchors()} values over depth but the model "
                f"has {layer_map.num_layers} layers: give at most one value per "
                "layer (fewer are interpolated)"
            )
    spec = method_spec(recipe.method)
    plan = {}
    for name, place in layer_map.places.items():
        weights = tuple(m.weight.at(place.depth, place.kind) for m in recipe.models)
        if spec.uses("weight") and recipe.normalize_ and all(w == 0.0 for w in weights):
            raise MergeError(
                f"every model's weight is 0 at tensor '{name}' and normalize is on, so "
                "the merge divides by zero: give at least one model a non-zero weight "
                "there, or set normalize: false"
            )
        if spec.family is Family.LINEAR and recipe.normalize_ and abs(sum(weights)) < 1e-12:
            raise MergeError(
                f"the models' weights {list(weights)} sum to 0 at tensor '{name}' and linear "
                "with normalize divides by that sum: give weights with a non-zero sum "
                "there, or set normalize: false"
            )
        plan[name] = TensorScalars(
            weights=weights,
            densities=tuple(m.density.at(place.depth, place.kind) for m in recipe.models),
            lam=recipe.lam.at(place.depth, place.kind),
            t=recipe.t.at(place.depth, place.kind),
            gammas=tuple(m.gamma.at(place.depth, place.kind) for m in recipe.models),
            epsilons=tuple(m.epsilon.at(place.depth, place.kind) for m in recipe.models),
        )
    return plan


def merge_tensor(
    recipe: MergeRecipe,
    name: str,
    s: TensorScalars,
    x: TensorInputs,
    out: Tensor,
    *,
    check_finite: bool = True,
    kernels: str = "eager",
) -> None:
    """Write tensor `name`'s merge into `out` (same shape; any float dtype) without full-size
    copies.

    kernels: "eager" (torch ops) or "compiled" (one fused kernel per chunk for the task-vector
    family; see merging.fused). linear, slerp and nuslerp always run eagerly.
    """
    try:
        _merge_into(recipe, name, s, x, out, check_finite, kernels == "compiled")
    except NonFiniteMergeError:
        raise NonFiniteMergeError(
            f"the merged tensor '{name}' contains NaN or inf; "
            "lower the weights or lambda of this recipe"
        ) from None
    except _CoefficientOverflow:
        raise NonFiniteMergeError(
            f"the coefficients of tensor '{name}' overflow float32 "
            f"(weights {s.weights}, lambda {s.lam}); lower the weights or lambda of this recipe"
        ) from None


def _merge_into(
    recipe: MergeRecipe,
    name: str,
    s: TensorScalars,
    x: TensorInputs,
    out: Tensor,
    check_finite: bool,
    compiled: bool,
) -> None:
    spec = method_spec(recipe.method)
    with torch.no_grad():
        if spec.family is Family.SLERP:
            a = x.base.float() + x.deltas[0].float()
            b = x.base.float() + x.deltas[1].float()
            out.copy_(methods.slerp(a, b, s.t))
            _finite(out, check_finite)  # after the cast: float16 can overflow where float32 did not
            return
        if spec.family is Family.NUSLERP:
            t = methods.nuslerp_t(*s.weights)
            # without a base: the models themselves (the reference is the first: its delta is 0)
            if recipe.base is None:
                merged = methods.nuslerp(
                    x.base.float() + x.deltas[0].float(),
                    x.base.float() + x.deltas[1].float(),
                    t,
                    over=recipe.slerp_over,
                )
            else:  # the task vectors, then back onto the base
                merged = methods.nuslerp(
                    x.deltas[0], x.deltas[1], t, over=recipe.slerp_over, angles=x.nuslerp_angles
                ).add_(x.base.float())
            out.copy_(merged)
            _finite(out, check_finite)
            return
        chunk = GPU_CHUNK if out.device.type == "cuda" else CPU_CHUNK
        flat_out, flat_base = out.view(-1), x.base.reshape(-1)
        if spec.family is Family.LINEAR:
            active = [k for k, w in enumerate(s.weights) if w != 0.0]  # zero weights change nothing
            weights = [s.weights[k] for k in active]
            # the factors methods.linear hands to torch on float32 tensors: torch refuses a finite
            # one beyond float32; an infinite one passes, and the finite check sees its result
            total = float(sum(weights))
            factors = [w / total for w in weights] if recipe.normalize_ else weights
            if any(math.isfinite(f) and abs(f) > _FLOAT32_MAX for f in factors):
                raise _CoefficientOverflow
            for start in range(0, flat_out.numel(), chunk):
                stop = min(start + chunk, flat_out.numel())
                deltas = [x.deltas[k].reshape(-1)[start:stop].float() for k in active]
                result = methods.linear(
                    flat_base[start:stop].float(), deltas, weights, normalize=recipe.normalize_
                )
                flat_out[start:stop].copy_(result)
                _finite(flat_out[start:stop], check_finite)  # after the cast, as above
            return
        _task_vectors(recipe, spec, name, s, x, out, chunk, check_finite, compiled)


def _task_vectors(
    recipe: MergeRecipe,
    spec: Method,
    name: str,
    s: TensorScalars,
    x: TensorInputs,
    out: Tensor,
    chunk: int,
    check_finite: bool,
    compiled: bool,
) -> None:
    """The task-vector family (and model_stock, task arithmetic with its own weights) in chunks."""
    if spec.family is Family.MODEL_STOCK:
        ratio = methods.model_stock_ratio(x.deltas) if x.stock_ratio is None else x.stock_ratio
        active, weights, keep, lam, normalize = (
            list(range(len(x.deltas))),
            [ratio / len(x.deltas)] * len(x.deltas),
            Keep.ALL,
            1.0,
            False,
        )
    else:
        active = [k for k, w in enumerate(s.weights) if w != 0.0]  # zero weights change nothing
        weights, keep, lam, normalize = (
            [s.weights[k] for k in active],
            spec.keep,
            s.lam,
            recipe.normalize_,
        )
    n, dev = out.numel(), out.device
    scales = [1.0] * len(active)
    lower, upper = [_KEEP_ALL] * len(active), [methods.NO_UPPER] * len(active)
    probs, spread = [1.0] * len(active), [0.0] * len(active)
    if keep.ranked:
        orders = x.orders or [methods.MagnitudeOrder(d, table=False) for d in x.deltas]
        for j, k in enumerate(active):
            kept = methods.kept_range(keep, n, s.densities[k], s.gammas[k] if s.gammas else 0.0)
            if kept is not None:
                lower[j], upper[j] = orders[k].bounds(kept)
        if all(b == _KEEP_ALL for b in lower) and all(b == methods.NO_UPPER for b in upper):
            keep = Keep.ALL  # density 1 everywhere: nothing to rank
    elif keep is Keep.RANDOM:
        probs = [min(1.0, s.densities[k]) for k in active]
        if recipe.rescale_:
            # divided by the probability as applied: in float32
            scales = [1.0 / float(torch.tensor(p, dtype=torch.float32)) for p in probs]
        if all(p >= 1.0 for p in probs):
            keep = Keep.ALL
    elif keep is Keep.DELLA:
        for j, k in enumerate(active):
            if s.densities[k] < 1.0:  # density 1 keeps everything, as mergekit
                probs[j], spread[j] = s.densities[k] - s.epsilons[k], 2.0 * s.epsilons[k]
        if all(p >= 1.0 for p in probs):
            keep = Keep.ALL
    if spec.consensus:
        coeffs = [w * sc for w, sc in zip(weights, scales)]
    else:
        divisor = float(sum(weights)) if normalize else 1.0
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        coeffs = [lam * w * sc / divisor for w, sc in zip(weights, scales)]
    if any(abs(c) > _FLOAT32_MAX for c in coeffs):
        raise _CoefficientOverflow
    f32 = dict(dtype=torch.float32, device=dev)
    i64 = dict(dtype=torch.int64, device=dev)
    keys = (
        [methods.draw_keys(recipe.seed, k, name) for k in active]
        if keep.drawn
        else [(0, 0)] * len(active)
    )
    settings = methods.TaskVectorSettings(
        coeffs=torch.tensor(coeffs, **f32),
        lower_v=torch.tensor([b[0] for b in lower], **f32),
        lower_i=torch.tensor([b[1] for b in lower], **i64),
        upper_v=torch.tensor([b[0] for b in upper], **f32),
        upper_i=torch.tensor([b[1] for b in upper], **i64),
        probs=torch.tensor(probs, **f32),
        spread=torch.tensor(spread, **f32),
        keys=torch.tensor(keys, **i64),
        signs=torch.tensor([1.0 if w > 0 else -1.0 for w in weights], **f32),
        weights=torch.tensor(weights, **f32),
        lam=torch.tensor(lam, **f32),
        keep=keep,
        consensus=spec.consensus,
        normalize=normalize,
        rescale=recipe.rescale_,
        check=compiled and check_finite,
    )
    flat_out, flat_base = out.view(-1), x.base.reshape(-1)
    flat_deltas = [x.deltas[k].reshape(-1) for k in active]
    if keep is Keep.DELLA:  # ranks are taken within rows: chunks hold whole rows
        width = out.shape[-1] if out.dim() > 1 else n
        chunk = max(width, chunk // width * width)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        ranks = (
            tuple(methods.row_ranks(d[start:stop].view(-1, width)).view(-1) for d in flat_deltas)
            if keep is Keep.DELLA
            else ()
        )
        piece = methods.TaskVectorChunk(
            out=flat_out[start:stop],
            base=flat_base[start:stop],
            deltas=tuple(d[start:stop] for d in flat_deltas),
            start=torch.tensor(start, **i64),
            ranks=ranks,
            settings=settings,
        )
        finite = fused.run_chunk(piece, compiled=compiled)
        if finite is None:
            # after the cast: float16 can overflow where float32 did not
            _finite(flat_out[start:stop], check_finite)
        elif check_finite and not finite:
            raise NonFiniteMergeError("non-finite values in a merged tensor")


def _finite(t: Tensor, check: bool) -> None:
    if check and not methods.all_finite(t):
        raise NonFiniteMergeError("non-finite values in a merged tensor")
