"""Merge math: pure functions on tensors, with mergekit's semantics.

Every method is expressed on a base tensor B and task vectors T_k = M_k - B. TIES and DARE are one
generalized task-arithmetic routine (`combine`) with switches: which entries each task vector keeps
(by magnitude, at random, or all), whether a sign is elected per entry, whether the mix is normalized.

Two choices made here, both deterministic and shared by the search and the export paths:
- TIES thresholds come from a table of each task vector's magnitudes at ranks int(j/1000 * n);
  a density on that 0.001 grid keeps exactly mergekit's int(density * n) largest entries
  (ties at the threshold aside), a density between grid points interpolates the threshold.
- DARE draws one byte per entry from a seed derived from (recipe seed, model index, tensor name):
  an entry survives when its byte < round(density * 256), so keep probabilities are multiples of
  1/256; survivors are divided by that keep probability (the DARE paper's rescale, not an L1 match).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

TABLE_POINTS = 1000
DARE_LEVELS = 256


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in `t`: one reduction pass instead of isfinite's mask and a second pass over it.

    A sum is finite only if every term is (NaN and inf propagate); only a sum that overflows from
    finite terms needs the exact check.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def magnitude_table(delta: Tensor, points: int = TABLE_POINTS) -> Tensor:
    """|delta| at the ranks max(1, int(j / points * n)) for j = 0..points, largest first (float32, CPU)."""
    flat = delta.detach().reshape(-1).abs().float()
    n = flat.numel()
    ranks = torch.tensor([max(1, int(j / points * n)) for j in range(points + 1)])  # int(d * n) in floats, as mergekit
    if flat.device.type == "cpu":  # numpy's sort is about 10x faster than torch.sort on a CPU here
        ascending = torch.from_numpy(np.sort(flat.numpy()))
        return ascending[n - ranks]  # the rank-th largest
    ordered = torch.sort(flat, descending=True).values
    return ordered[ranks.to(ordered.device) - 1].cpu()


class MagnitudeRanks:
    """The entries of `magnitude_table(delta)` computed on demand by selection, not a full sort:
    the export needs one or two of them per tensor, the resident path all of them once.

    On a CPU numpy's introselect does the selection (about 9x faster than torch.kthvalue here);
    an order statistic is exact whichever algorithm finds it.
    """

    def __init__(self, delta: Tensor, points: int = TABLE_POINTS) -> None:
        self._abs = delta.detach().reshape(-1).abs().float()
        self._points = points

    def numel(self) -> int:
        return self._points + 1

    def __getitem__(self, j: int) -> float:
        n = self._abs.numel()
        rank = max(1, int(j / self._points * n))  # the rank-th largest = the (n - rank)-th smallest, from 0
        if self._abs.device.type == "cpu":
            return float(np.partition(self._abs.numpy(), n - rank)[n - rank])
        return float(torch.kthvalue(self._abs, n - rank + 1).values)


def magnitude_threshold(table: Tensor | MagnitudeRanks, density: float) -> float:
    """The magnitude at or above which an entry is kept for this density."""
    points = table.numel() - 1
    pos = round(density * points, 9)
    lo = min(int(pos), points - 1)
    frac = pos - lo
    low = float(table[lo])
    if frac == 0.0:  # a density on the table's grid: one rank, no interpolation
        return low
    high = float(table[lo + 1])
    return low + (high - low) * frac


def dare_seed(seed: int, model_index: int, name: str) -> int:
    """A stable 63-bit seed for one model's tensor, the same on every machine and run."""
    digest = hashlib.blake2b(f"{seed}:{model_index}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def dare_draws(shape: Sequence[int], seed: int, model_index: int, name: str) -> Tensor:
    """One uniform byte per entry, drawn on the CPU so every device gets the same draws."""
    gen = torch.Generator(device="cpu").manual_seed(dare_seed(seed, model_index, name))
    return torch.randint(0, DARE_LEVELS, tuple(shape), dtype=torch.uint8, generator=gen)


def dare_cutoff(density: float) -> tuple[int, float]:
    """(byte cutoff, keep probability) for a DARE density; at least one level survives."""
    cutoff = min(DARE_LEVELS, max(1, round(density * DARE_LEVELS)))
    return cutoff, cutoff / DARE_LEVELS


def combine(
    base: Tensor,
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    keep: Sequence[Tensor | None],
    scales: Sequence[float],
    consensus: bool,
    normalize: bool,
    lam: float,
) -> Tensor:
    """Generalized task arithmetic: B + lam * mix of the kept, scaled and weighted task vectors.

    keep[k] is a boolean mask of the entries task vector k keeps (None keeps all); scales[k]
    multiplies the survivors (DARE's rescale). With consensus, a sign is elected per entry from
    the sum of the weighted vectors (zero counts as +) and only agreeing, non-zero entries are
    mixed; normalize divides by the sum of the weights that took part (a zero divisor counts as 1).
    """
    if not deltas:
        return base.clone()
    # Fused ops (add_ with alpha, addcmul_) keep the number of passes over the tensor small.
    if not consensus:
        divisor = float(sum(weights)) if normalize else 1.0
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        out = base.clone()
        for delta, w, mask, scale in zip(deltas, weights, keep, scales, strict=True):
            coeff = lam * w * scale / divisor
            if mask is None:
                out.add_(delta, alpha=coeff)
            else:
                out.addcmul_(delta, mask, value=coeff)
        return out
    # Sign election: the sum of the kept, scaled, weighted vectors; zero counts as +.
    total = torch.zeros_like(base)
    for delta, w, mask, scale in zip(deltas, weights, keep, scales, strict=True):
        if mask is None:
            total.add_(delta, alpha=w * scale)
        else:
            total.addcmul_(delta, mask, value=w * scale)
    elected = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if normalize else None
    for delta, w, mask, scale in zip(deltas, weights, keep, scales, strict=True):
        aligned = delta * elected  # > 0 where delta's sign is the elected one, for w > 0
        agree = aligned > 0 if w > 0 else aligned < 0
        if mask is not None:
            agree &= mask
        mixed.addcmul_(delta, agree, value=w * scale)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    if divisor is not None:
        mixed /= divisor.masked_fill_(divisor == 0, 1.0)
    if lam != 1.0:
        mixed *= lam
    return mixed.add_(base)


def linear(base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool) -> Tensor:
    """sum_k w_k M_k (divided by sum_k w_k when normalize), with M_k = base + deltas[k]."""
    total = float(sum(weights))
    if normalize:
        out = base.clone()
        for delta, w in zip(deltas, weights):
            out.add_(delta, alpha=w / total)
        return out
    out = base * total
    for delta, w in zip(deltas, weights):
        out.add_(delta, alpha=w)
    return out


def slerp(a: Tensor, b: Tensor, t: float, *, eps: float = 1e-8, parallel: float = 0.9995) -> Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) over the whole tensor; linear when nearly parallel."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm(), b64.norm()
    if na < eps or nb < eps:
        return torch.lerp(a.float(), b.float(), t)
    cos = float(torch.dot(a64 / na, b64 / nb).clamp(-1.0, 1.0))
    if abs(cos) > parallel:
        return torch.lerp(a.float(), b.float(), t)
    theta = math.acos(cos)
    s = math.sin(theta)
    wa, wb = math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s
    return (a.float() * wa).add_(b.float(), alpha=wb)
