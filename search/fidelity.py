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
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import attrs
from search.config import FidelitySection, ObjectivesSection, StudyConfig
from search.result import RungScores

PEERS = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def of_comparable_age(
    peers: Sequence[FrozenTrial], number: int, window: int | None
) -> list[FrozenTrial]:
    """The `window` peers nearest in trial number to trial `number` (all of them: None); the
    earlier of two equally near comes first. Later candidates come from a sampler that has
    learned more: compared with every earlier score, a candidate ranks high against the first,
    random ones, and far more than the `keep` share go on."""
    if window is None:
        return list(peers)
    return sorted(peers, key=lambda t: (abs(t.number - number), t.number))[:window]


class KeepBestPruner(optuna.pruners.BasePruner):
    """Prune unless the trial's value at its last rung is among the best `keep` share reported
    there by its peers: the `window` trials nearest in trial number that reached the rung (all
    of them: None).

    With n peers at a rung (the trial included), the best max(1, ceil(keep * n)) go on, so the
    first trial at a rung always does; among equal values the earlier trial ranks first.
    Baselines are never pruned.
    """

    def __init__(self, keep: float, window: int | None = None) -> None:
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1]; got {keep}")
        self.keep, self.window = keep, window

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or trial.user_attrs.get(attrs.BASELINE):
            return False
        value = trial.intermediate_values[step]
        others = [
            t
            for t in study.get_trials(deepcopy=False, states=PEERS)
            if step in t.intermediate_values and t.number != trial.number
        ]
        peers = [(trial.number, value)] + [
            (t.number, t.intermediate_values[step])
            for t in of_comparable_age(others, trial.number, self.window)
        ]
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        # ahead: better, or as good and there first (scores on a few items tie often; a tie
        # promoting every tied candidate would promote far more than `keep`)
        ahead = sum(sign * (v - value) > 0 or (v == value and n < trial.number) for n, v in peers)
        return ahead >= max(1, math.ceil(self.keep * len(peers)))


def make_pruner(fidelity: FidelitySection | None) -> optuna.pruners.BasePruner | None:
    return KeepBestPruner(fidelity.keep, fidelity.window) if fidelity is not None else None


# The rungs when `fidelity.rungs` is not given: these shares of the largest task's search items,
# and none when the first would hold fewer than MIN_RUNG_ITEMS (a rung's few items say too little
# to stop a candidate on). Chosen with tests/benchmarks/bench_fidelity.py (README).
DEFAULT_SHARES = (1 / 6, 1 / 2)
MIN_RUNG_ITEMS = 16


def rung_items(fidelity: FidelitySection, sizes: dict[str, int]) -> list[int | None]:
    """Items per task of each rung that adds items (None: all of them, the last rung); [None]
    alone: full fidelity."""
    full = max(sizes.values())
    asked = fidelity.rungs
    if asked is None:
        asked = [round(full * share) for share in DEFAULT_SHARES]
        if asked[0] < MIN_RUNG_ITEMS:
            return [None]
    return [n for n in asked if n < full] + [None]


def describe(config: StudyConfig, sizes: dict[str, int] | None) -> str:
    """What `basin validate` says of multi-fidelity (`sizes`: search items per task, when known)."""
    section = config.fidelity
    if section is None:
        return "off: every candidate is scored on every search item"
    how = (
        "on by default (one objective); `fidelity: null` turns it off"
        if (config.fidelity_by_default())
        else "on"
    )
    if sizes:
        rungs = [n for n in rung_items(section, sizes) if n is not None]
        if not rungs:
            return (
                f"off: the search set ({max(sizes.values())} items in its largest task) is too "
                f"small for a first rung of {MIN_RUNG_ITEMS} items or more"
            )
        steps = ", ".join(map(str, rungs))
        return f"{how}: rungs of {steps} items per task, then all {max(sizes.values())}"
    if section.rungs is None:
        return f"{how}: rungs of 1/6 and 1/2 of the largest task's search items"
    return f"{how}: rungs of {', '.join(map(str, section.rungs))} items per task"


def study_rungs(config: StudyConfig, study: optuna.Study) -> list[int]:
    """The rungs (items per task) a study's candidates are scored on before the whole search set;
    empty when it runs at full fidelity."""
    sizes = study.user_attrs.get(attrs.SEARCH_ITEMS)
    if config.fidelity is None or not sizes:
        return []
    return [n for n in rung_items(config.fidelity, sizes) if n is not None]


# per key, per-item scores in one list per task (a group's: several)
Parts = dict[str, Sequence[Sequence[float]]]


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
    window: int | None = None,
) -> bool:
    """The Pareto rule: go on unless a peer (one of the `window` trials nearest in trial number
    that reached this rung; all of them: None) dominates the candidate by more than the noise."""
    if trial.user_attrs.get(attrs.BASELINE):
        return True
    keys = [o.key for o in objectives.items]
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    others = [
        t
        for t in study.get_trials(deepcopy=False, states=PEERS)
        if t.number != trial.number
        and t.user_attrs.get(attrs.ITEM_SCORES)
        and t.user_attrs.get(attrs.RUNG_STOP, 0) >= stop
    ]
    for other in of_comparable_age(others, trial.number, window):
        theirs = other.user_attrs[attrs.ITEM_SCORES]
        if all(k in theirs for k in keys) and dominated(scores, theirs, keys, signs, stop, margin):
            return False
    return True


def kept_scores(scores: Parts, keys: Sequence[str], up_to: int) -> dict[str, list[list[float]]]:
    """The per-item scores stored with a trial for later comparisons: the objectives', up to the
    last rung."""
    return {
        k: [[round(float(v), 6) for v in part[:up_to]] for part in scores[k]]
        for k in keys
        if k in scores
    }


def note_items(trial: optuna.trial.Trial, rung: int, scores: RungScores) -> None:
    """Record on the trial the rung it reached and the items it scored (per task and in all)."""
    trial.set_user_attr(attrs.RUNG, rung)
    trial.set_user_attr(attrs.RUNG_STOP, scores.stop)
    trial.set_user_attr(attrs.ITEMS_PER_TASK, scores.items)
    trial.set_user_attr(attrs.ITEMS, scores.total)


@dataclass(frozen=True)
class Rungs:
    """A study's rungs, and the rule that promotes a candidate from one to the next."""

    items: tuple[int | None, ...]  # items per task of each rung; the last is None (all of them)
    objectives: ObjectivesSection
    directions: tuple[str, ...]  # each objective's
    margin: float  # the Pareto rule's, in standard errors
    window: int | None = None  # peers of comparable age a candidate is compared with (None: all)

    @classmethod
    def plan(
        cls, config: StudyConfig, sizes: dict[str, int], directions: Sequence[str]
    ) -> Rungs | None:
        """The study's rungs over its search items per task; None without a fidelity section."""
        if config.fidelity is None or len(items := rung_items(config.fidelity, sizes)) == 1:
            return None  # (no rung below the whole search set: nothing to stop a candidate on)
        return cls(
            tuple(items),
            config.objectives,
            tuple(directions),
            config.fidelity.margin,
            config.fidelity.window,
        )

    @property
    def first(self) -> int | None:
        return self.items[0]

    def last(self, rung: int) -> bool:
        return rung == len(self.items) - 1

    def promote(
        self,
        study: optuna.Study,
        trial: optuna.trial.Trial,
        rung: int,
        values: Sequence[float],
        scores: RungScores,
    ) -> bool:
        """Whether a candidate scored at `rung` (not the last; `values` its objective values there)
        goes on to the next rung. Records on the trial what later comparisons read."""
        keys = [o.key for o in self.objectives.items]
        kept = kept_scores(scores.item_scores, keys, self.items[-2])
        trial.set_user_attr(attrs.ITEM_SCORES, kept)
        if len(study.directions) == 1:
            trial.report(values[0], step=scores.stop)
            return not trial.should_prune()
        return pareto_go_on(
            study,
            trial,
            scores.item_scores,
            scores.stop,
            self.objectives,
            self.directions,
            self.margin,
            self.window,
        )


def trial_items(trial: FrozenTrial | optuna.trial.Trial) -> int:
    """Items a trial scored, over all tasks (0 before its first rung)."""
    return int(trial.user_attrs.get(attrs.ITEMS, 0))


def spent(trials: Sequence[FrozenTrial]) -> tuple[int, int]:
    """(items scored, trials pruned) over `trials`."""
    return sum(trial_items(t) for t in trials), sum(t.state == TrialState.PRUNED for t in trials)
