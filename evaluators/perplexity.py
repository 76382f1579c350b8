"""Token-level perplexity of a live model on a local text file (no lm-eval)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluators.protocol import EvalResult, EvaluatorError, ItemScores


class PerplexityEvaluator:
    """Perplexity over fixed-length, non-overlapping token windows of one text file.

    window: tokens per window (capped at the model's max_position_embeddings); the tail shorter
        than a window is dropped, so every window predicts window-1 tokens and per-window nll
        averages exactly to the reported nll. A text shorter than one window is one window.
    limit: score only the first `limit` windows (also per call).
    Reports "<name>/nll" (mean negative log-likelihood per predicted token, nats) and
    "<name>/ppl" (its exp); both lower-is-better. Per-item scores are per-window nll.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        window: int = 256,
        batch_size: int = 8,
        limit: int | None = None,
        name: str = "perplexity",
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            problem = "is not a file" if self.path.exists() else "does not exist"
            raise EvaluatorError(
                f"perplexity text file {self.path} {problem}; pass the path of a UTF-8 text file"
            )
        try:
            self.text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise EvaluatorError(
                f"perplexity text file {self.path} is not UTF-8 text ({err})"
            ) from err
        if not self.text.strip():
            raise EvaluatorError(f"perplexity text file {self.path} is empty; give it some text")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise EvaluatorError(f"window must be an int >= 2 tokens, got {window!r}")
        _check_limit(batch_size, "batch_size")
        _check_limit(limit)
        self.window, self.batch_size, self.limit, self.name = window, batch_size, limit, name
        self._ids: tuple[Any, list[int]] | None = None  # (tokenizer, token ids), tokenized once

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return (f"{self.name}/nll", f"{self.name}/ppl")

    def higher_is_better(self, key: str) -> bool:
        """Both metrics are lower-is-better."""
        if key not in self.metric_keys:
            close = difflib.get_close_matches(key, self.metric_keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "."
            raise EvaluatorError(
                f"unknown metric {key!r}{hint} Known metrics: {', '.join(self.metric_keys)}."
            )
        return False

    def _token_ids(self, tokenizer: Any) -> list[int]:
        if self._ids is None or self._ids[0] is not tokenizer:
            ids = list(tokenizer(self.text, add_special_tokens=False)["input_ids"])
            if len(ids) < 2:
                raise EvaluatorError(
                    f"perplexity text file {self.path} has {len(ids)} token(s); it needs at least 2"
                )
            self._ids = (tokenizer, ids)
        return self._ids[1]

    def _windows(self, model: Any, tokenizer: Any, limit: int | None) -> list[list[int]]:
        ids = self._token_ids(tokenizer)
        size = self.window
        max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if isinstance(max_positions, int) and max_positions >= 2:
            size = min(size, max_positions)
        windows = [ids[i : i + size] for i in range(0, len(ids) - size + 1, size)] or [ids[:size]]
        for cap in (self.limit, limit):
            if cap is not None:
                windows = windows[:cap]
        return windows

    # Windows are cut from the text by the model's tokenizer, so they are not known before a model
    # is scored, and they are not items that scores add up over: no slices, no item counts.
    NO_ITEMS = (
        "the perplexity evaluator scores token windows of a text, not items in slices; "
        "multi-fidelity and the items budget need evaluator.kind: harness"
    )

    @property
    def split_sizes(self) -> dict[str, int]:
        return {}

    @property
    def item_counts(self) -> dict[str, int]:
        return {}

    def item_metrics(
        self, scores: dict[str, Sequence[float]]
    ) -> tuple[dict[str, float], ItemScores]:
        raise EvaluatorError(self.NO_ITEMS)

    def check_item_means(self, keys: Sequence[str]) -> None:
        raise EvaluatorError(self.NO_ITEMS)

    def evaluate(
        self,
        engine: Any,
        *,
        limit: int | None = None,
        per_item: bool = False,
        items: tuple[int, int] | None = None,
    ) -> EvalResult:
        """Score the model the engine holds, as its weights are now (the hf engine: this evaluator
        runs the model itself)."""
        import torch

        if items is not None:
            raise EvaluatorError(self.NO_ITEMS)
        model, tokenizer = getattr(engine, "model", None), getattr(engine, "tokenizer", None)
        if model is None:
            raise EvaluatorError(
                f"the perplexity evaluator runs the model itself; the {engine.kind} engine does "
                "not hold one (use the hf engine)"
            )
        _check_limit(limit)
        windows = self._windows(model, tokenizer, limit)
        if model.training:
            model.eval()
        device = next(model.parameters()).device
        nlls: list[float] = []
        with torch.no_grad():
            for start in range(0, len(windows), self.batch_size):
                batch = torch.tensor(windows[start : start + self.batch_size], device=device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                token_lp = logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
                nlls += (-token_lp.mean(dim=1)).tolist()
        nll = math.fsum(nlls) / len(nlls)
        ppl = math.inf if nll > 700 else math.exp(nll)  # exp overflows past ~709
        metrics = {f"{self.name}/nll": nll, f"{self.name}/ppl": ppl}
        return EvalResult(
            metrics=metrics,
            higher_is_better=dict.fromkeys(metrics, False),
            per_item={f"{self.name}/nll": tuple(nlls)} if per_item else None,
        )


def _check_limit(value: int | None, what: str = "limit") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise EvaluatorError(f"{what} must be a positive int, got {value!r}")
