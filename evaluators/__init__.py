"""Scoring a model that is already in memory."""

from evaluators.config import (
    EvaluatorSection,
    HarnessSection,
    PerplexitySection,
    Role,
    build_evaluator,
)
from evaluators.harness import HarnessEvaluator
from evaluators.perplexity import PerplexityEvaluator
from evaluators.protocol import EvalResult, Evaluator, EvaluatorError

__all__ = [
    "EvalResult",
    "Evaluator",
    "EvaluatorError",
    "EvaluatorSection",
    "HarnessEvaluator",
    "HarnessSection",
    "PerplexityEvaluator",
    "PerplexitySection",
    "Role",
    "build_evaluator",
]
