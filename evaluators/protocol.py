"""What every evaluator promises: score the model in memory, return flat metrics."""

from __future__ import annotations

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


@runtime_checkable
class Evaluator(Protocol):
    """Scores a model that is already in memory; called again after its weights change in place.

    limit: score only the first `limit` items of each task on this call (the same items every
        call); None scores every item the evaluator was built for.
    per_item: also return per-item scores (EvalResult.per_item).
    metric_keys: every "<task>/<metric>" the evaluator can report, known before any model is scored.
    higher_is_better: a metric's direction; an unknown key raises EvaluatorError naming the known ones.
    """

    def evaluate(
        self, model: Any, tokenizer: Any, *, limit: int | None = None, per_item: bool = False
    ) -> EvalResult: ...

    @property
    def metric_keys(self) -> tuple[str, ...]: ...

    def higher_is_better(self, key: str) -> bool: ...
