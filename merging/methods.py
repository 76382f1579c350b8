"""Merge math: pure functions on tensors, with mergekit's semantics where mergekit has the method.

The task-vector family (task_arithmetic, ties, dare_*, breadcrumbs*, della*) is one routine,
`task_vector_chunk`: every task vector T_k = M_k - B is sparsified by a keep rule, optionally a sign
is elected per entry, and B + lambda * mix is written out. The same function runs eagerly or
compiled (merging/fused.py), so the two paths cannot drift apart.

Recipes mean exactly what they say:
- magnitude keep rules rank entries by |T| (largest first) and, among equal magnitudes, by position
  (lowest first), so TIES keeps exactly max(1, int(d*n)) entries and breadcrumbs exactly int(d*n)
  after setting aside int(gamma*n), for any density. mergekit keeps the same counts; where
  magnitudes tie at the boundary it keeps whichever its (unstable) sort puts first;
- random keep rules (DARE, DELLA) keep an entry when its uniform draw u < p. u comes from a
  counter-based hash of (seed, model, tensor, position), 24 bits: the same on every device, for any
  chunking, and nothing is stored. A density d keeps with probability d (to 2^-24); survivors are
  divided by their keep probability when rescale is on (the papers' rescale; mergekit matches the
  L1 norm instead).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from merging.catalog import Keep

TABLE_POINTS = 1000  # magnitude bounds precomputed at densities j / TABLE_POINTS
TABLE_POINT_BYTES = 20  # host memory per point: position and index (int64), magnitude (float32)
_HASH_MUL = 0x45D9F3B  # an odd multiplier below 2**31, so it is the same number as an int32


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in `t`: one reduction pass instead of isfinite's mask and a second pass over
    it.

    A sum is finite only if every term is (NaN and inf propagate); only a sum that overflows from
    finite terms needs the exact check.
    """
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


# --- magnitude ranks -----------------------------------------------------------------------------

NONE_KEPT = (math.inf, -1)  # a lower bound no finite entry passes
NO_UPPER = (math.inf, -1)  # an upper bound every finite entry passes


def kept_range(keep: Keep, n: int, density: float, gamma: float = 0.0) -> tuple[int, int] | None:
    """(skip, count) for a ranked keep rule: the entries at positions skip .. skip + count - 1 of
    the magnitude order are kept; None keeps every entry (density 1, as mergekit)."""
    if density >= 1.0:
        return None
    if keep is Keep.MAGNITUDE:  # mergekit's magnitude: at least one entry survives
        return 0, max(1, int(density * n))
    target, top = int(density * n), int(gamma * n)  # mergekit's magnitude_outliers
    bottom = max(0, n - target - top)
    return n - bottom - target, target


def order_bound(absval: Tensor, position: int) -> tuple[float, int]:
    """(magnitude, index) of the entry at `position` (from 0) when the flat float32 `absval` is
    ordered by magnitude, largest first, then by index, lowest first."""
    n = absval.numel()
    if absval.device.type == "cpu":  # numpy's introselect: about 9x faster than torch.kthvalue here
        a = absval.numpy()
        value = float(np.partition(a, n - 1 - position)[n - 1 - position])
        greater = int(np.count_nonzero(a > value))
        index = int(np.flatnonzero(a == value)[position - greater])
        return value, index
    value = float(torch.kthvalue(absval, n - position).values)
    greater = int((absval > value).sum())
    index = int(torch.nonzero(absval == value)[position - greater])
    return value, index


class MagnitudeOrder:
    """Bounds of the magnitude order of one task vector: precomputed at the TIES densities of the
    0.001 grid (one sort, for a worker that merges many candidates), any other position selected
    exactly when asked."""

    def __init__(
        self,
        delta: Tensor,
        *,
        table: bool,
        points: int = TABLE_POINTS,
        rebuild: Callable[[], Tensor] | None = None,
    ) -> None:
        # rebuild: makes the task vector again for a bound off the table, instead of keeping it
        # (a LoRA adapter's, expanded from its factors)
        self._delta = None if rebuild is not None else delta
        self._rebuild = rebuild
        self.n = delta.numel()
        # the table, on the host: sorted positions and the (magnitude, index) at each
        self._positions = np.zeros(0, dtype=np.int64)
        self._values = np.zeros(0, dtype=np.float32)
        self._indices = np.zeros(0, dtype=np.int64)
        if table:
            absval = delta.detach().reshape(-1).abs().float()
            positions = np.array(
                sorted({max(1, int(j / points * self.n)) - 1 for j in range(points + 1)}),
                dtype=np.int64,
            )
            if absval.device.type == "cpu":
                a = absval.numpy()
                order = np.argsort(-a, kind="stable")[positions]
                values = a[order]
            else:
                values, ranked = torch.sort(absval, descending=True, stable=True)
                pos = torch.from_numpy(positions).to(absval.device)
                values, order = values[pos].cpu().numpy(), ranked[pos].cpu().numpy()
            self._positions, self._values, self._indices = (
                positions,
                values.astype(np.float32),
                order.astype(np.int64),
            )

    def table_bytes(self) -> int:
        return self._positions.nbytes + self._values.nbytes + self._indices.nbytes

    def bound(self, position: int) -> tuple[float, int]:
        slot = int(np.searchsorted(self._positions, position))
        if slot < len(self._positions) and self._positions[slot] == position:
            return float(self._values[slot]), int(self._indices[slot])
        delta = self._delta if self._rebuild is None else self._rebuild()
        return order_bound(delta.detach().reshape(-1).abs().float(), position)

    def bounds(self, kept: tuple[int, int]) -> tuple[tuple[float, int], tuple[float, int]]:
        """(lower, upper) bounds for a kept range: keep |x| above lower (ties: index at most its
        index) and below upper (ties: index above its index)."""
        skip, count = kept
        lower = self.bound(skip + count - 1) if count > 0 else NONE_KEPT
        upper = self.bound(skip - 1) if skip > 0 else NO_UPPER
        return lower, upper


# --- random draws --------------------------------------------------------------------------------


def draw_keys(seed: int, model_index: int, name: str) -> tuple[int, int]:
    """(tensor key, model key): 32-bit keys, the same on every machine and run; the tensor key is
    the same for every model of a tensor."""

    def key(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")

    return key(f"{seed}:{name}"), key(f"{seed}:{model_index}:{name}")


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit mixing round (lowbias32) on int32 lanes holding unsigned values: products wrap
    modulo 2^32 and right shifts are masked to logical ones, so it equals the same round on
    unsigned integers."""
    x = (((x >> 16) & 0xFFFF) ^ x) * _HASH_MUL
    x = (((x >> 16) & 0xFFFF) ^ x) * _HASH_MUL
    return ((x >> 16) & 0xFFFF) ^ x


def position_hash(index: Tensor, tensor_key: Tensor) -> Tensor:
    """The part of a draw every model of a tensor shares: one round on each int64 position in
    `index` (its low 32 bits, keyed; the high bits folded in after), as int32 lanes."""
    x = _mix32(index.to(torch.int32) ^ tensor_key.to(torch.int32))
    return x ^ (index >> 32).to(torch.int32)


def draw(shared: Tensor, model_key: Tensor) -> Tensor:
    """One model's float32 uniforms in [0, 1), 24 bits each, from `position_hash` values: a second
    round keyed by the model."""
    x = _mix32(shared ^ model_key.to(torch.int32))
    return ((x >> 8) & 0xFFFFFF).float() * (2.0**-24)


def uniform(index: Tensor, keys: Tensor) -> Tensor:
    """The uniforms of one model's tensor at positions `index`, keyed by `draw_keys` (an int64
    tensor of two): integer arithmetic only, so every device and any chunking draw the same.
    A merge of k models hashes each position 1 + k times (the first round is shared)."""
    return draw(position_hash(index, keys[0]), keys[1])


def row_ranks(delta: Tensor) -> Tensor:
    """Each entry's rank of magnitude within its row, scaled to [0, 1] (0: smallest), float32, as
    DELLA's keep probabilities use it; rows are the last dimension (a 1-D tensor is one row).
    Equal magnitudes are ranked by position."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.dim() > 1 else delta.reshape(1, -1)
    width = rows.shape[1]
    order = torch.argsort(rows.abs().float(), dim=1, stable=True)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    steps = torch.arange(width, dtype=torch.float32, device=rows.device).expand_as(ranks)
    ranks.scatter_(1, order, steps)
    return ranks.div_(max(width - 1, 1)).reshape(delta.shape)


# --- the task-vector family ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskVectorSettings:
    """What a task-vector merge of one tensor applies to each of its chunks; index k is the k-th
    task vector with a non-zero weight.

    coeffs[k] is its factor (lam * w * scale / divisor without sign election, w * scale with it);
    lower/upper bounds (magnitude `_v`, index `_i`) its magnitude keep rule; probs[k] its keep
    probability (random) or d - epsilon (della) with spread[k] = 2 * epsilon; keys[k] its
    `draw_keys` (the tensor key, keys[k, 0], is the same for all k); signs[k] the sign of w_k;
    weights[k] w_k, for the disjoint mean's divisor; lam the scale applied after a sign election.

    The switches pick the kernel's variant (each compiles once): the keep rule, the sign election,
    normalize (the disjoint mean's divisor), rescale (della's survivors divided by their keep
    probability) and check (return whether the chunk is finite after the cast to out's dtype).
    """

    coeffs: Tensor
    lower_v: Tensor
    lower_i: Tensor
    upper_v: Tensor
    upper_i: Tensor
    probs: Tensor
    spread: Tensor
    keys: Tensor
    signs: Tensor
    weights: Tensor
    lam: Tensor
    keep: Keep
    consensus: bool
    normalize: bool
    rescale: bool
    check: bool


@dataclass(frozen=True)
class TaskVectorChunk:
    """One flat chunk of a tensor's task-vector merge: the output, base and task vectors there,
    each task vector's row ranks there (della; empty otherwise), and the tensor's settings.
    `start` is the chunk's flat offset in the tensor (draws and tie-breaks see positions in the
    whole tensor)."""

    out: Tensor
    base: Tensor
    deltas: tuple[Tensor, ...]
    start: Tensor
    ranks: tuple[Tensor, ...]
    settings: TaskVectorSettings


def task_vector_chunk(chunk: TaskVectorChunk) -> Tensor | None:
    """Write one flat chunk of a task-vector merge into `chunk.out`; with the settings' `check`,
    return whether it is all finite after the cast to out's dtype."""
    s, keep = chunk.settings, chunk.settings.keep
    b = chunk.base.float()
    index = (
        torch.arange(b.numel(), device=b.device, dtype=torch.int64) + chunk.start
        if keep is not Keep.ALL
        else None
    )
    # the tensor key, keys[k, 0], is the same for every k: one shared round serves them all
    shared = position_hash(index, s.keys[0, 0]) if keep.drawn else None
    kept = []
    for k, delta in enumerate(chunk.deltas):
        d = delta.float()
        if keep.ranked:
            a = d.abs()
            mask = (a > s.lower_v[k]) | ((a == s.lower_v[k]) & (index <= s.lower_i[k]))
            if keep is Keep.OUTLIERS:
                mask = mask & ((a < s.upper_v[k]) | ((a == s.upper_v[k]) & (index > s.upper_i[k])))
            d = torch.where(mask, d, 0.0)
        elif keep is Keep.RANDOM:
            d = torch.where(draw(shared, s.keys[k, 1]) < s.probs[k], d, 0.0)
        elif keep is Keep.DELLA:
            p = (s.probs[k] + s.spread[k] * chunk.ranks[k]).clamp(0.0, 1.0)
            survive = draw(shared, s.keys[k, 1]) < p
            d = torch.where(survive, d / p if s.rescale else d, 0.0)
        kept.append(d)
    if not s.consensus:
        result = b.clone()
        for k, d in enumerate(kept):
            result.add_(d * s.coeffs[k])
    else:
        total = torch.zeros_like(b)
        for k, d in enumerate(kept):
            total.add_(d * s.coeffs[k])
        elected = torch.where(total >= 0, 1.0, -1.0)  # zero counts as +
        mixed = torch.zeros_like(b)
        divisor = torch.zeros_like(b) if s.normalize else None
        for k, d in enumerate(kept):
            agree = (d * elected) * s.signs[k] > 0  # the weighted entry has the elected sign
            mixed.add_(torch.where(agree, d, 0.0) * s.coeffs[k])
            if divisor is not None:
                divisor.add_(agree * s.weights[k])
        if divisor is not None:
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        result = mixed.mul_(s.lam).add_(b)
    chunk.out.copy_(result)
    return torch.isfinite(chunk.out).all() if s.check else None


# --- the other families --------------------------------------------------------------------------


def linear(
    base: Tensor, deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool
) -> Tensor:
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
    """Spherical interpolation from a (t=0) to b (t=1) over the whole tensor; linear when nearly
    parallel."""
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


def nuslerp_angles(
    a: Tensor, b: Tensor, *, over: str = "tensor", eps: float = 1e-8
) -> tuple[Tensor, Tensor]:
    """(theta, linear) of each vector pair of a and b for `nuslerp`: the angle from the pair's dot
    product over its norms (each floored at 1e-7, so a zero vector counts as orthogonal to the
    other), and whether the pair is parallel or opposite (1 - cos^2 <= eps^2), shaped to broadcast
    against the tensors. They do not depend on t: a worker computes them once per tensor."""
    x, y = a.float(), b.float()
    dims = _nuslerp_dims(x, over)
    nx = torch.linalg.vector_norm(x, dim=dims, keepdim=True).clamp(min=1e-7)
    ny = torch.linalg.vector_norm(y, dim=dims, keepdim=True).clamp(min=1e-7)
    cos = ((x * y).sum(dim=dims, keepdim=True) / (nx * ny)).clamp(-1.0, 1.0)
    linear = (1.0 - cos * cos) <= eps * eps
    return torch.acos(torch.where(linear, 0.0, cos)), linear


def nuslerp(
    a: Tensor,
    b: Tensor,
    t: float,
    *,
    over: str = "tensor",
    angles: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Spherical interpolation from a (t=0) to b (t=1) of the whole tensors ('tensor'), of each pair
    of rows (vectors along the last dimension: 'rows') or of each pair of columns (along the first:
    'columns'), in float32, as mergekit's nuslerp; parallel pairs are interpolated linearly.
    A 1-D tensor is one vector for every `over`. `angles`: `nuslerp_angles(a, b, over=over)`,
    computed here when not given.

    The result is c_a * a + c_b * b with one pair of coefficients per vector: besides the output,
    float32 copies of 16-bit inputs are allocated (and for the angles one product of the tensor's
    size).
    """
    theta, linear = angles if angles is not None else nuslerp_angles(a, b, over=over)
    sin = torch.where(linear, 1.0, torch.sin(theta))
    ca = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin)
    return (a.float() * ca).addcmul_(b.float(), cb)


def _nuslerp_dims(x: Tensor, over: str) -> tuple[int, ...]:
    """The dimensions one interpolated vector spans."""
    if over == "tensor" or x.dim() < 2:
        return tuple(range(x.dim()))
    return (0,) if over == "columns" else (-1,)


def nuslerp_t(w_first: float, w_second: float) -> float:
    """nuslerp's position from the two models' weights: w2 / (w1 + w2), 0.5 where the sum is ~0."""
    total = w_first + w_second
    return 0.5 if abs(total) < 1e-6 else w_second / total


def model_stock_ratio(deltas: Sequence[Tensor]) -> float:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos) for one tensor, with cos the
    mean pairwise cosine of the k task vectors (float64 sums); 0 where the ratio is singular.
    The merge is then base + t * mean_k T_k."""
    flat = [d.reshape(-1).double() for d in deltas]
    norms = [float(f.norm()) for f in flat]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            dot = float(torch.dot(flat[i], flat[j]))
            cosines.append(max(-1.0, min(1.0, dot / max(norms[i] * norms[j], 1e-6))))
    cos = sum(cosines) / len(cosines)
    k = len(flat)
    denominator = 1.0 + (k - 1) * cos
    return 0.0 if abs(denominator) < 1e-6 else k * cos / denominator
