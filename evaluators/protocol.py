"""What every evaluator promises: score the model in memory, return flat metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class EvaluatorError(ValueError):
    """A mistake in how an evaluator was asked to run (unknown task, missing split, bad file)."""


@dataclass(frozen=True)
class EvalResult:
    """Scores of one evaluation, keyed "<task>/<metric>".

    metrics: the aggregate value of each metric.
    higher_is_better: the direction of each metric, as the metric's source declares it.
    per_item: when asked for, each metric's per-item scores in a fixed item order (the same order
        on every call of the same evaluator), for paired comparisons between candidates.
    """

    metrics: dict[str, float]
    higher_is_better: dict[str, bool]
    per_item: dict[str, tuple[float, ...]] | None = field(default=None)

    def __post_init__(self) -> None:
        missing = sorted(set(self.metrics) - set(self.higher_is_better))
        if missing:
            raise EvaluatorError(f"no higher_is_better flag for metrics {missing}")
        if self.per_item is not None:
            unknown = sorted(set(self.per_item) - set(self.metrics))
            if unknown:
                raise EvaluatorError(f"per-item scores for metrics not in the result: {unknown}")

    def objective(self, key: str) -> float:
        """The metric `key` signed so that larger is better (for maximising searches)."""
        if key not in self.metrics:
            raise EvaluatorError(f"no metric {key!r} in this result; it has {sorted(self.metrics)}")
        value = self.metrics[key]
        return value if self.higher_is_better[key] else -value


@dataclass(frozen=True)
class TaskInfo:
    """What an evaluator section's task definitions say, before any data is loaded."""

    higher_is_better: dict[str, bool]  # each metric asked about: its direction
    hub_datasets: dict[str, str]  # task -> the hub dataset its data comes from (none: local)


ItemScores = dict[str, list[list[float]]]  # per metric key, its per-item scores: one list per task


@runtime_checkable
class Evaluator(Protocol):
    """Everything search asks of an evaluator: it scores whatever an engine holds
    (evaluators/engines.py), and is called again after the engine takes another candidate.

    Items are what an evaluator scores one by one (a task's documents); multi-fidelity scores them
    in slices and adds up per-item scores. An evaluator that scores no items (perplexity) has no
    item counts, and refuses `items=` and `check_item_means` with an EvaluatorError saying so.
    """

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """Every "<task>/<metric>" it can report, known before any model is scored."""
        ...

    def higher_is_better(self, key: str) -> bool:
        """A metric's direction; an unknown key raises EvaluatorError naming the known ones."""
        ...

    def evaluate(
        self,
        engine: Any,
        *,
        limit: int | None = None,
        per_item: bool = False,
        items: tuple[int, int] | None = None,
    ) -> EvalResult:
        """Score the candidate the engine holds.

        limit: only the first `limit` items of each task (the same items every call); None: all.
        per_item: also return per-item scores (EvalResult.per_item).
        items: (start, stop): only that slice of each task's items, with per-item scores.
        """
        ...

    @property
    def split_sizes(self) -> dict[str, int]:
        """Items per task of the scored split before any carve or limit (the carve's input)."""
        ...

    @property
    def item_counts(self) -> dict[str, int]:
        """Items per task it scores (after carve and limit)."""
        ...

    def item_metrics(
        self, scores: dict[str, Sequence[float]]
    ) -> tuple[dict[str, float], ItemScores]:
        """Metrics from per-item scores of the tasks, as a full evaluation computes them; with each
        metric's per-item scores as one list per task it adds up from."""
        ...

    def check_item_means(self, keys: Sequence[str]) -> None:
        """Raise EvaluatorError unless each metric key adds up from per-item scores (a mean)."""
        ...
