"""Evaluation engines: what holds a candidate's weights and runs the model for lm-eval.

An engine is started once per worker on the base model and kept for the whole study. For each
candidate it receives the merged weights (merging.CandidateWeights: tensor by tensor, under the
checkpoint's names) and an evaluator scores whatever it holds through `lm()`, an lm-eval LM.

- `hf` (the default): a transformers model in memory, wrapped in lm-eval's HFLM. The merger writes
  each tensor straight into the live model's parameters: no copy at all.
- `vllm`: a vLLM engine (evaluators/vllm_engine.py). It holds the weights in its own layout, so it
  receives them as a stream that vLLM loads in place; its prefix cache is reset after every swap.

ENGINES registers each kind once: the config's `evaluator.engine` choices come from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from evaluators.protocol import EvaluatorError

if TYPE_CHECKING:
    import torch

    from evaluators.config import HarnessSection, PerplexitySection


class EngineError(EvaluatorError):
    """An engine could not start, or could not take a candidate's weights."""


class CandidateWeights(Protocol):
    """A candidate's weights as the merger gives them (merging.CandidateWeights)."""

    @property
    def names(self) -> list[str]:
        """Every tensor of a complete candidate, in the checkpoint's order."""
        ...

    def base(self, name: str) -> torch.Tensor:
        """The base's tensor `name`."""
        ...

    def write_into(self, model: Any) -> None:
        """Merge every tensor in place into the transformers model's tensor of the same name."""
        ...

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, each merged as it is asked for."""
        ...


@dataclass(frozen=True)
class EngineStart:
    """Where and how a worker starts its engine (the models section's part of it)."""

    model_dir: str  # the base model's local folder (a hub model: its cached snapshot)
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "float32", "bfloat16", "float16"
    trust_remote_code: bool = False
    threads: int | None = None  # torch threads of a CPU worker
    # device bytes the merger allocates only while a candidate merges (scratch, placement staging):
    # an engine that sizes itself to the free memory (vLLM) leaves them free
    merge_reserve: int = 0


@runtime_checkable
class Engine(Protocol):
    """Everything a worker and an evaluator ask of an engine."""

    kind: str

    def load(self, weights: CandidateWeights) -> None:
        """Hold this candidate's weights, all of them, or raise (the candidate then fails, and the
        engine holds no candidate that an evaluator could score)."""
        ...

    def lm(self, batch_size: int | str) -> Any:
        """The lm-eval LM that scores what the engine holds (built once, reused)."""
        ...


class HFEngine:
    """A transformers model in memory: the live model every candidate is written into.

    Also what a test or a script wraps around a model it built itself: HFEngine(model, tokenizer).
    """

    kind = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._lms: dict[Any, Any] = {}

    @classmethod
    def start(cls, start: EngineStart, section: Any = None) -> HFEngine:
        """The base loaded once with transformers, on the worker's device in the study's dtype."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        remote = start.trust_remote_code
        model = AutoModelForCausalLM.from_pretrained(
            start.model_dir, dtype=getattr(torch, start.dtype), trust_remote_code=remote
        )
        tokenizer = AutoTokenizer.from_pretrained(start.model_dir, trust_remote_code=remote)
        return cls(model.to(start.device).eval(), tokenizer)

    def load(self, weights: CandidateWeights) -> None:
        import torch

        # a failure half-way fails the candidate: the next one writes every tensor again
        weights.write_into(self.model)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def lm(self, batch_size: int | str) -> Any:
        if self.model.training:
            self.model.eval()
        if batch_size not in self._lms:
            from lm_eval.models.huggingface import HFLM

            self._lms[batch_size] = HFLM(
                pretrained=self.model,
                tokenizer=self.tokenizer,
                batch_size=batch_size,
                device=str(self.model.device),
            )
        return self._lms[batch_size]


def _start_hf(start: EngineStart, section: Any) -> Engine:
    return HFEngine.start(start, section)


def _start_vllm(start: EngineStart, section: Any) -> Engine:
    from evaluators.vllm_engine import VLLMEngine

    return VLLMEngine.start(start, section)


# kind -> how a worker starts it (the section is the evaluator section, with the engine's options)
ENGINES = {"hf": _start_hf, "vllm": _start_vllm}


def start_engine(start: EngineStart, section: HarnessSection | PerplexitySection) -> Engine:
    """The engine `section.engine` names, started on the base model."""
    kind = section.engine
    if kind not in ENGINES:
        raise EngineError(f"unknown engine {kind!r}; Known: {', '.join(ENGINES)}")
    return ENGINES[kind](start, section)
