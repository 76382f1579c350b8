"""The sampler sees the searched trials only: a user's recipe outside the space is not shown to it.

Such a trial (search/user_recipes.py) has no params, or none that describe what it merged. Shown to
a sampler it would mislead it: TPE would count a score without a point, and samplers that search
the params every trial shares (CMA-ES, NSGA-II, GP: an intersection of the trials' spaces) would
find an empty space and fall back to random draws. `SearchedOnly` wraps the configured sampler and
hands it a view of the study without those trials; everything else reaches the study itself.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from search import attrs


def hidden(trial: FrozenTrial) -> bool:
    """A trial the sampler must not learn from: one that merged a recipe of its own."""
    return attrs.RECIPE in trial.user_attrs


class _StudyView:
    """The study as the sampler reads it: the same study, less the hidden trials."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        return [t for t in trials if not hidden(t)]

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy, states) if not hidden(t)]

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class SearchedOnly(optuna.samplers.BaseSampler):
    """`inner`, shown the study without the trials `hidden` picks."""

    def __init__(self, inner: optuna.samplers.BaseSampler) -> None:
        self.inner = inner

    def __str__(self) -> str:
        return str(self.inner)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(_StudyView(study), trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self.inner.sample_relative(_StudyView(study), trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.inner.sample_independent(
            _StudyView(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(_StudyView(study), trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(_StudyView(study), trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()
