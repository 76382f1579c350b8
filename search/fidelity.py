"""Multi-fidelity search: score candidates on growing rungs of items and stop most of them early.

Each task's search items are put in one seeded order (evaluators.harness: `order_seed`); rung k
holds the first `rungs[k]` items of every task, the last rung all of them. Every candidate sees
the same items at a rung, so candidates are compared on paired items. A candidate goes on to the
next rung while it can still matter, on the worker that holds its merged weights, which scores
only the new items and adds them to the per-item scores it already has.

- Single objective: Optuna's pruning interface. The rung's value is reported with step = the
  rung's items per task; `KeepBestPruner` promotes a candidate while its value is among the best
  `keep` share of the values every trial reported at that rung (asynchronous successive halving:
  nobody waits for a rung to fill). A pruned trial is PRUNED with that last value, which Optuna's
  samplers learn from.
- Pareto (Optuna's pruners are single-objective): a candidate goes on unless another trial
  dominates it at that rung by more than the per-item noise: better on every objective by more
  than `margin` standard errors of the paired per-item differences on the rung's items.

Baselines are never stopped: they anchor the report and every rung's comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config import FidelitySection, ObjectivesSection
from search.objectives import objective_values

PEERS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
ITEM_SCORES = "item_scores"  # user attr: per objective, its per-item scores (one list per task) up to the last rung


class KeepBestPruner(optuna.pruners.BasePruner):
    """Prune unless the trial's value at its last rung is among the best `keep` share reported there.

    With n trials at a rung (the trial included), the best max(1, ceil(keep * n)) go on, so the
    first trial at a rung always does; among equal values the earlier trial ranks first.
    Baselines are never pruned.
    """

    def __init__(self, keep: float) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1]; got {keep}")
        self.keep = keep

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or trial.user_attrs.get("baseline"):
            return False
        value = trial.intermediate_values[step]
        peers = [
            (t.number, t.intermediate_values[step])
            for t in study.get_trials(deepcopy=False, states=PEERS)
            if step in t.intermediate_values
        ]
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        # ahead: better, or as good and there first (scores on a few items tie often; a tie
        # promoting every tied candidate would promote far more than `keep`)
        ahead = sum(sign * (v - value) > 0 or (v == value and n < trial.number) for n, v in peers)
        return ahead >= max(1, math.ceil(self.keep * len(peers)))


def make_pruner(fidelity: FidelitySection | None) -> optuna.pruners.BasePruner | None:
    return KeepBestPruner(fidelity.keep) if fidelity is not None else None


def rung_items(fidelity: FidelitySection, sizes: dict[str, int]) -> list[int | None]:
    """Items per task of each rung that adds items (None: all of them, the last rung)."""
    full = max(sizes.values())
    return [n for n in fidelity.rungs if n < full] + [None]


Parts = dict[
    str, Sequence[Sequence[float]]
]  # per key, per-item scores in one list per task (a group's: several)


def _rung(parts: Sequence[Sequence[float]], n: int) -> list[float]:
    """A key's per-item scores on a rung: the first n items of each of its tasks."""
    return [v for part in parts for v in part[:n]]


def dominated(
    mine: Parts, theirs: Parts, keys: Sequence[str], signs: Sequence[float], n: int, margin: float
) -> bool:
    """Whether `theirs` beats `mine` on every objective, on the first n items of each task, by more
    than `margin` standard errors of the mean paired per-item difference (and by more than 0)."""
    for key, sign in zip(keys, signs):
        a, b = _rung(mine[key], n), _rung(theirs[key], n)
        if not a or len(a) != len(b):
            return False
        diffs = [sign * (y - x) for x, y in zip(a, b)]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1)
        if mean <= margin * math.sqrt(var / len(diffs)) or mean <= 0:
            return False
    return True


def pareto_go_on(
    study: optuna.Study,
    trial: optuna.trial.Trial,
    scores: Parts,
    stop: int,
    objectives: ObjectivesSection,
    directions: Sequence[str],
    margin: float,
) -> bool:
    """The Pareto rule: go on unless a trial that reached this rung dominates the candidate by more than the noise."""
    if trial.user_attrs.get("baseline"):
        return True
    keys = [o.key for o in objectives.items]
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    for other in study.get_trials(deepcopy=False, states=PEERS):
        theirs = other.user_attrs.get(ITEM_SCORES)
        if (
            other.number == trial.number
            or not theirs
            or other.user_attrs.get("rung_stop", 0) < stop
        ):
            continue
        if all(k in theirs for k in keys) and dominated(scores, theirs, keys, signs, stop, margin):
            return False
    return True


def kept_scores(scores: Parts, keys: Sequence[str], up_to: int) -> dict[str, list[list[float]]]:
    """The per-item scores stored with a trial for later comparisons: the objectives', up to the last rung."""
    return {
        k: [[round(float(v), 6) for v in part[:up_to]] for part in scores[k]]
        for k in keys
        if k in scores
    }


def note_items(trial: optuna.trial.Trial, result: dict[str, Any], rung: int) -> None:
    """Record on the trial the rung it reached and the items it scored (per task and in all)."""
    if "items" in result:
        trial.set_user_attr("rung", rung)
        trial.set_user_attr("rung_stop", result["stop"])
        trial.set_user_attr("items_per_task", result["items"])
        trial.set_user_attr("items", sum(result["items"].values()))


def go_on(s: Any, flight: Any, result: dict[str, Any]) -> bool:
    """After a rung's result (s: the StudySetup, flight: the loop's Flight): True when the candidate
    is promoted (the caller sends the next rung to its worker); False when the result is to be told:
    the last rung, an error, or a stop (then `flight.pruned` is set)."""
    if s.rungs is None or "error" in result:
        return False
    trial, cfg = flight.trial, s.config
    note_items(trial, result, flight.rung)
    if flight.rung == len(s.rungs) - 1:
        return False
    try:
        values = objective_values(cfg.objectives, s.directions, result["metrics"])
    except (KeyError, TypeError, ValueError):
        return False  # the loop fails the trial with the reason
    if not all(math.isfinite(v) for v in values):
        return False
    stop, keys = result["stop"], [o.key for o in cfg.objectives.items]
    trial.set_user_attr(ITEM_SCORES, kept_scores(result["item_scores"], keys, s.rungs[-2]))
    if len(s.study.directions) == 1:
        trial.report(values[0], step=stop)
        promoted = not trial.should_prune()
    else:
        promoted = pareto_go_on(
            s.study,
            trial,
            result["item_scores"],
            stop,
            cfg.objectives,
            s.directions,
            cfg.fidelity.margin,
        )
    if not promoted:
        flight.pruned = True
        return False
    flight.rung += 1
    trial.set_user_attr(
        "promoted_to", s.rungs[flight.rung]
    )  # items per task it is now scored to (None: all)
    flight.merge_s += result["merge_s"]
    flight.eval_s += result["eval_s"]
    return True


def trial_items(trial: FrozenTrial | optuna.trial.Trial) -> int:
    """Items a trial scored, over all tasks (0 before its first rung)."""
    return int(trial.user_attrs.get("items", 0))


def spent(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(items scored, trials pruned) over `trials`."""
    return sum(trial_items(t) for t in trials), sum(t.state == TrialState.PRUNED for t in trials)
