"""Metrics -> objective values: one weighted score, or one value per objective (Pareto)."""

from __future__ import annotations

import math
from collections.abc import Callable

from search.config import ObjectivesSection


def resolve_directions(
    objectives: ObjectivesSection, higher_is_better: Callable[[str], bool]
) -> list[str]:
    """Each objective's direction: the config's, else the metric's own (lm-eval's flag)."""
    return [
        o.direction or ("maximize" if higher_is_better(o.key) else "minimize")
        for o in objectives.items
    ]


def study_directions(objectives: ObjectivesSection, directions: list[str]) -> list[str]:
    """Optuna's directions: one 'maximize' for a weighted score, else one per objective."""
    return ["maximize"] if objectives.mode == "single" else list(directions)


def objective_values(
    objectives: ObjectivesSection, directions: list[str], metrics: dict[str, float]
) -> list[float]:
    """The values told to Optuna for these metrics."""
    missing = [o.key for o in objectives.items if o.key not in metrics]
    if missing:
        raise KeyError(f"the evaluation returned no {missing}; it has {sorted(metrics)}")
    if objectives.mode == "pareto":
        return [float(metrics[o.key]) for o in objectives.items]
    # single: larger is better; a minimized metric enters with a negative sign
    return [
        sum(
            o.weight * metrics[o.key] * (1.0 if d == "maximize" else -1.0)
            for o, d in zip(objectives.items, directions)
        )
    ]


def checked_values(
    objectives: ObjectivesSection, directions: list[str], metrics: dict[str, float]
) -> list[float]:
    """`objective_values`, refusing values Optuna cannot rank; ValueError/KeyError say why.

    Optuna would fail a trial told NaN silently while its record said COMPLETE.
    """
    values = objective_values(objectives, directions, metrics)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(
            f"the objective values {values} are not finite (NaN or inf): the candidate is broken"
        )
    return values
