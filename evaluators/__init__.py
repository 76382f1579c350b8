"""Scoring a model that is already in memory."""

from evaluators.harness import HarnessEvaluator
from evaluators.perplexity import PerplexityEvaluator
from evaluators.protocol import EvalResult, Evaluator, EvaluatorError

__all__ = ["EvalResult", "Evaluator", "EvaluatorError", "HarnessEvaluator", "PerplexityEvaluator"]
