"""Which front members the report scores on the held-out split: a bounded set that covers the front.

A large front (129 members on a 400-trial, 4-objective study) would make the report's held-out time
grow with the front; a person reads a table of a few rows. The choice here is pure: trial numbers
and signed objective values in (larger is better), trial numbers out.

Coverage, in order, until `k` are chosen: the anchor (the trial the report leads with), the best
trial on each objective, then again and again the member farthest from every one chosen so far
(distance in objective space, each objective divided by its range over the front). Ties go to the
lower trial number. The trials the user names are added on top and never displace a choice, so
naming one more costs one more evaluation and the earlier scores stay in use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_FINALISTS = 8  # the rows of a table a person reads


def choose_finalists(
    front: Mapping[int, Sequence[float]],
    k: int,
    named: Iterable[int] = (),
    anchor: int | None = None,
) -> list[int]:
    """The trial numbers to score, ascending: up to `k` front members chosen for coverage, plus
    every number in `named` (front member or not).

    `front` maps each front member's trial number to its signed objective values (a minimized
    objective negated); `anchor`, when it is on the front, is chosen first.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return sorted(set(_coverage(front, k, anchor)) | set(named))


def _coverage(front: Mapping[int, Sequence[float]], k: int, anchor: int | None) -> list[int]:
    numbers = sorted(front)
    if len(numbers) <= k:
        return numbers
    points = _normalised({n: front[n] for n in numbers})
    chosen = [anchor] if anchor in points else []
    for i in range(len(points[numbers[0]])):
        best = max(numbers, key=lambda n: (points[n][i], -n))  # the lowest number among equals
        if best not in chosen:
            chosen.append(best)
    chosen = chosen[:k]
    # each member's distance to the nearest chosen one, updated as the choice grows
    nearest = {n: min(math.dist(points[n], points[c]) for c in chosen) for n in numbers}
    while len(chosen) < k:
        far = max((n for n in numbers if n not in chosen), key=lambda n: (nearest[n], -n))
        chosen.append(far)
        for n in numbers:
            nearest[n] = min(nearest[n], math.dist(points[n], points[far]))
    return chosen


def _normalised(front: dict[int, Sequence[float]]) -> dict[int, list[float]]:
    """Each objective scaled to [0, 1] by its range over the front (a constant one to 0); an
    infinite value goes to the end of its range."""
    width = len(next(iter(front.values())))
    lows, spans = [], []
    for i in range(width):
        finite = [v[i] for v in front.values() if math.isfinite(v[i])] or [0.0]
        lows.append(min(finite))
        spans.append(max(finite) - min(finite) or 1.0)
    return {
        n: [min(max((x - lo) / span, 0.0), 1.0) for x, lo, span in zip(v, lows, spans)]
        for n, v in front.items()
    }
