"""The finalists the report scores on the held-out split: a bounded choice that covers the front."""

from __future__ import annotations

import math
import random

import pytest

from search.finalists import choose_finalists


def arc(n: int) -> dict[int, list[float]]:
    """n points on a quarter circle, a two-objective front (signed: larger is better)."""
    return {
        i: [math.cos(math.pi / 2 * i / (n - 1)), math.sin(math.pi / 2 * i / (n - 1))]
        for i in range(n)
    }


def simplex(n: int, width: int, seed: int = 0) -> dict[int, list[float]]:
    """n random points with a constant sum: every one on the front of `width` objectives."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        cut = sorted(rng.random() for _ in range(width - 1))
        out[i * 3 + 10] = [b - a for a, b in zip([0.0, *cut], [*cut, 1.0])]
    return out


def test_a_front_no_larger_than_k_is_kept_whole():
    front = arc(5)
    assert choose_finalists(front, 5) == [0, 1, 2, 3, 4]
    assert choose_finalists(front, 50) == [0, 1, 2, 3, 4]
    assert choose_finalists({}, 8) == []


def test_the_best_on_each_objective_is_kept_then_the_farthest_points():
    front = arc(21)  # trial 0 best on the first objective, 20 on the second
    assert choose_finalists(front, 2) == [0, 20]
    assert choose_finalists(front, 3) == [0, 10, 20]  # the middle is farthest from both ends
    assert choose_finalists(front, 5) == [0, 5, 10, 15, 20]  # then the quarters


def test_the_objectives_are_scaled_by_their_range_on_the_front():
    # the second objective spans 1000 times the first: unscaled, the middle pick would follow it
    front = {n: [x, 1000 * (1 - x) ** 3] for n, x in enumerate(i / 20 for i in range(21))}
    assert choose_finalists(front, 3)[1] in range(5, 9)
    unscaled_middle = min(front, key=lambda n: abs(front[n][1] - 500))
    assert unscaled_middle not in choose_finalists(front, 3)


def test_a_minimized_objective_counts_by_its_signed_value():
    # signed values: the caller negates a minimized objective, so the best is the largest
    front = {7: [0.9, -5.0], 8: [0.5, -1.0], 9: [0.1, -0.2]}
    assert choose_finalists(front, 2) == [7, 9]


def test_the_anchor_comes_first_and_counts_within_k():
    front = arc(21)
    assert choose_finalists(front, 3, anchor=4) == [0, 4, 20]
    assert choose_finalists(front, 1, anchor=4) == [4]
    assert choose_finalists(front, 2, anchor=99) == [0, 20]  # not on the front: no anchor


def test_named_trials_are_added_and_never_displace_a_choice():
    front = simplex(129, 4)
    chosen = choose_finalists(front, 8)
    assert len(chosen) == 8
    left = sorted(set(front) - set(chosen))
    with_named = choose_finalists(front, 8, named=[left[0], 5000])
    # a named trial costs one more evaluation, the earlier ones stay; off the front is fine too
    assert with_named == sorted({*chosen, left[0], 5000})
    assert choose_finalists(front, 8, named=[chosen[0]]) == chosen


def test_extremes_are_kept_on_a_large_four_objective_front():
    front = simplex(129, 4, seed=1)
    chosen = choose_finalists(front, 8)
    for i in range(4):
        best = max(front, key=lambda n: (front[n][i], -n))
        assert best in chosen, f"the best trial on objective {i}"
    # coverage: every objective's range is reached from both ends, not only the best end
    for i in range(4):
        values = [front[n][i] for n in chosen]
        assert min(values) < 0.1 and max(values) > 0.6


def test_the_choice_is_deterministic_and_ties_go_to_the_lower_trial_number():
    front = simplex(60, 3, seed=2)
    shuffled = dict(random.Random(0).sample(sorted(front.items()), len(front)))
    assert choose_finalists(front, 6) == choose_finalists(shuffled, 6)
    # equal points: the lowest trial number of the equals is taken
    twins = {12: [1.0, 0.0], 4: [1.0, 0.0], 9: [0.0, 1.0], 3: [0.0, 1.0], 6: [0.5, 0.5]}
    assert choose_finalists(twins, 2) == [3, 4]
    assert choose_finalists(twins, 3) == [3, 4, 6]


def test_a_constant_or_infinite_objective_does_not_break_the_choice():
    front = {1: [0.2, 5.0, -math.inf], 2: [0.8, 5.0, -1.0], 3: [0.5, 5.0, -2.0], 4: [0.4, 5.0, -3]}
    chosen = choose_finalists(front, 3)
    assert len(chosen) == 3 and {2} <= set(chosen)


def test_k_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        choose_finalists(arc(4), 0)
