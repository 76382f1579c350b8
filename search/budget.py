"""The study's budget, shared by every runner of the study: trials and seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from search import attrs, compat, fidelity, records
from search.config import BudgetSection
from search.recovery import runner_alive


class Budget:
    """Time left, fewer finished (complete or pruned) plus running trials (of every live runner)
    than n_trials, and fewer items scored than `items`."""

    def __init__(self, study: optuna.Study, budget: BudgetSection) -> None:
        self.study, self.budget = study, budget
        self.started = time.perf_counter()
        self.elapsed_before = float(study.user_attrs.get(attrs.ELAPSED_S, 0.0))

    def elapsed_s(self) -> float:
        """Seconds searched over all runs of the study, this one included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def items_spent(self) -> int:
        """Evaluation items scored by every trial so far (multi-fidelity trials record theirs)."""
        return fidelity.spent(self.study.get_trials(deepcopy=False))[0]

    def finished(self) -> int:
        """Trials finished (complete or pruned) by every runner."""
        done = (TrialState.COMPLETE, TrialState.PRUNED)
        return len(self.study.get_trials(deepcopy=False, states=done))

    def ended(self) -> bool:
        """The seconds or the items are spent (a candidate already proposed runs no more)."""
        if self.budget.timeout is not None and self.elapsed_s() >= self.budget.timeout:
            return True
        return self.budget.items is not None and self.items_spent() >= self.budget.items

    def left(self) -> bool:
        if self.ended():
            return False
        if self.budget.n_trials is None:
            return True
        trials = self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        )
        return (
            sum(t.state != TrialState.RUNNING or runner_alive(t) for t in trials)
            < self.budget.n_trials
        )


def claim(
    study: optuna.Study,
    folder: Any,
    runner: dict[str, Any],
    more: Callable[[], bool],
    storage: str | None = None,
) -> optuna.trial.Trial | None:
    """Ask for the next trial if `more()` allows one, recording its runner.

    Check and ask happen under the runners' lock (records.study_lock: the study folder's, and with
    a PostgreSQL `storage` an advisory lock in the database), so two runners, on one machine or on
    several, cannot both take the last trial of the budget.
    """
    with records.study_lock(folder, storage, study.study_name):
        if not more():
            return None
        trial = study.ask()
        # at once: a trial never heard from is never found silent
        with compat.batched_writes(study):
            compat.record_heartbeat(study, trial)
            trial.set_user_attr(attrs.RUNNER, runner)
        return trial
