"""The evaluator kinds: each kind's config section, which carries everything about the kind.

`kind: harness` (the default) scores lm-eval tasks; `kind: perplexity` scores a text file. A study
scores candidates in two roles: "search" (what the sampler sees) and "report" (held-out scores of
the finalists). A section says what each role scores, builds the evaluator of a role (`build`),
checks its task definitions without their data (`check_tasks`) and estimates what evaluation
needs on the device (`memory_estimate`). KINDS registers each kind once; the config's
`evaluator` field, its error messages and `build_evaluator` are derived from it.

A new kind is a section class here, with these methods, and one entry in KINDS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from evaluators.carve import Carve
from evaluators.engines import ENGINES
from evaluators.protocol import Evaluator, EvaluatorError, TaskInfo

Role = Literal["search", "report"]
ROLES: tuple[str, ...] = ("search", "report")


EVAL_TOKENS = 1024  # tokens per sequence in a memory estimate (prompt and answer of a typical item)


@dataclass(frozen=True)
class MemoryEstimate:
    """What evaluating one candidate needs on the device on top of the model."""

    what: str
    bytes: int
    notes: list[str] = field(default_factory=list)


def sequence_bytes(shape: dict, batch: int, tokens: int, width: int) -> int:
    """Logits (model dtype) and their float32 log-softmax for a batch, plus the KV cache, from a
    Hugging Face config.json's fields."""
    shape = shape.get("text_config", shape)  # multimodal configs keep the language model's apart
    vocab = shape.get("vocab_size", 0)
    layers = shape.get("num_hidden_layers") or shape.get("n_layer") or 0
    hidden = shape.get("hidden_size") or shape.get("n_embd") or 0
    heads = shape.get("num_attention_heads") or shape.get("n_head") or 1
    kv_heads = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or hidden // heads
    n = batch * tokens
    return n * vocab * (width + 4) + 2 * layers * n * kv_heads * head_dim * width


class VLLMOptions(BaseModel):
    """Options of the vllm engine (evaluators/vllm_engine.py), passed to vLLM as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # share of the GPU's memory vLLM takes (weights, KV cache); None: what is free once the merger
    # holds its tensors, less a headroom (vllm_engine.gpu_share)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16)  # None: the model's own
    # True: no compiled graphs (starts faster, decodes slower); None: True on a CPU, False on a GPU
    enforce_eager: bool | None = None
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)  # None: vLLM's default
    block_size: int | None = Field(default=None, ge=1)  # KV block; None: 32 on CPU, else vLLM's
    cpu_kv_cache_gib: int = Field(default=1, ge=1)  # a CPU engine's KV cache

    @field_validator("tensor_parallel_size")
    @classmethod
    def _one_gpu(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                f"tensor_parallel_size {v} needs a worker that spans {v} GPUs, and a basin worker "
                "holds one device; use 1 (one engine per worker, one worker per GPU)"
            )
        return v


EngineKind = Literal[tuple(ENGINES)]  # evaluators/engines.py registers each kind


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # where a config names the kind's tasks (for messages) and whether it scores items one by one
    # (multi-fidelity and the items budget need that)
    tasks_field: ClassVar[str] = "evaluator.tasks"
    scores_items: ClassVar[bool] = True


class HarnessSection(_Section):
    """lm-eval tasks (local yaml files or built-ins): one split for search, another for reports.

    With `holdout`, the one `split` is carved in two (evaluators/carve.py): the search scores one
    part, the report the held-out other.
    """

    kind: Literal["harness"] = "harness"
    tasks: list[str] = Field(min_length=1)
    include_path: str | list[str] | None = None
    split: Literal["validation", "test"] = "validation"
    report_split: Literal["validation", "test"] = "test"
    holdout: float | None = Field(
        default=None, gt=0, lt=1
    )  # share of `split` held out for the report
    holdout_seed: int = 0
    limit: int | None = Field(default=None, ge=1)
    sample_seed: int | None = None
    batch_size: int | Literal["auto"] = 16  # auto: lm-eval finds the largest that fits
    num_fewshot: int | None = Field(default=None, ge=0)
    apply_chat_template: bool | str = False  # a name picks one of the tokenizer's templates
    fewshot_as_multiturn: bool = True
    system_instruction: str | None = None
    gen_kwargs: dict[str, Any] | None = (
        None  # merged into every generative task's generation_kwargs
    )
    builtin_tasks: bool = True
    # what holds each candidate and runs it: hf (transformers, in place) or vllm
    engine: EngineKind = "hf"
    vllm: VLLMOptions | None = None  # the vllm engine's options

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"batch_size must be a positive number or 'auto'; got {v}")
        return v

    @model_validator(mode="after")
    def _options_of_the_engine(self) -> HarnessSection:
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError(
                "evaluator.vllm sets the vllm engine's options, but evaluator.engine is "
                f"{self.engine}; set evaluator.engine: vllm, or remove evaluator.vllm"
            )
        return self

    @property
    def vllm_options(self) -> VLLMOptions:
        return self.vllm or VLLMOptions()

    @model_validator(mode="before")
    @classmethod
    def _carve_has_one_split(cls, data: Any) -> Any:
        """With holdout, both roles score `split`: report_split is `split` (given or not)."""
        if isinstance(data, dict) and data.get("holdout") is not None:
            split, report = data.get("split", "validation"), data.get("report_split")
            if report is not None and report != split:
                raise ValueError(
                    f"with holdout, the report scores the held-out items of split '{split}'; "
                    f"remove report_split '{report}' (or drop holdout to report on it)"
                )
            data = {**data, "report_split": split}
        return data

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    @property
    def include_paths(self) -> list[str]:
        include = self.include_path
        return [include] if isinstance(include, str) else list(include or [])

    def label(self, role: Role) -> str:
        """What a role scores, as the report names it (also a folder name)."""
        if self.holdout is not None:
            return f"{self.split}-search" if role == "search" else f"{self.split}-holdout"
        return self.split if role == "search" else self.report_split

    @classmethod
    def raw_task_names(cls, raw: dict) -> Any:
        """The task names of a section not yet validated (for checks across sections)."""
        return raw.get("tasks")

    @property
    def has_report(self) -> bool:
        """Whether the section names something held out for the report to score."""
        return True

    def carve(self, role: Role) -> Carve | None:
        """The carve of the one scored split a role scores, or None when the split is not carved."""
        if self.holdout is None:
            return None
        part = "search" if role == "search" else "holdout"
        return Carve(self.holdout, self.holdout_seed, part, split=self.split)

    def build(self, role: Role, limit: int | None, order_seed: int | None) -> Evaluator:
        from evaluators.harness import HarnessEvaluator

        search_split = role == "search" or self.holdout is not None
        return HarnessEvaluator(
            self,
            split=self.split if search_split else self.report_split,
            carve=self.carve(role),
            order_seed=order_seed,
            limit=limit or self.limit,
        )

    def check_tasks(self, metrics: list[str]) -> TaskInfo:
        from evaluators.harness import check_task_definitions

        found = check_task_definitions(
            self.tasks,
            include_path=self.include_paths,
            builtin_tasks=self.builtin_tasks,
            split=self.split,
            metrics=metrics,
        )
        return TaskInfo(found.directions, found.hub_datasets)

    def memory_estimate(self, shape: dict, width: int) -> MemoryEstimate:
        batch = self.batch_size if isinstance(self.batch_size, int) else 1
        what = f"evaluation estimate (batch {batch} x {EVAL_TOKENS} tokens: logits, KV cache)"
        notes = []
        if self.batch_size == "auto":
            notes.append(
                "evaluator.batch_size is auto: the estimate is for one sequence; lm-eval picks the "
                "largest batch that fits"
            )
        return MemoryEstimate(what, sequence_bytes(shape, batch, EVAL_TOKENS, width), notes)

    def overlap(self) -> str | None:
        """Why the report would score items the search saw, or None when it does not."""
        if self.holdout is None and self.split == self.report_split:
            return (
                f"evaluator.split and evaluator.report_split are both '{self.split}': the report "
                "scores the very items the search chose its recipes on, so its held-out scores are "
                "not held out; carve the split instead (evaluator.holdout: 0.3), or report on "
                "another split"
            )
        return None

    def resolved(self) -> HarnessSection:
        """The same section with its local paths made absolute (workers may run elsewhere)."""
        return self.model_copy(
            update={"include_path": [_absolute(p) for p in self.include_paths] or None}
        )


class PerplexitySection(_Section):
    """Perplexity over fixed token windows of a text file: `text` for search, `report_text` held
    out."""

    kind: Literal["perplexity"]
    name: str = Field(default="perplexity", pattern=r"^[A-Za-z0-9_.-]+$")
    text: str
    report_text: str | None = None  # None: the report has no held-out scores
    window: int = Field(default=256, ge=2)
    batch_size: int = Field(default=8, ge=1)
    limit: int | None = Field(default=None, ge=1)  # windows per candidate
    engine: Literal["hf"] = "hf"

    tasks_field: ClassVar[str] = "evaluator.name (the perplexity evaluator's task)"
    scores_items: ClassVar[bool] = False

    @field_validator("engine", mode="before")
    @classmethod
    def _hf_only(cls, v: Any) -> Any:
        if v != "hf":
            raise ValueError(
                f"the perplexity evaluator runs the model itself, with the hf engine only; got "
                f"engine {v!r}: remove evaluator.engine (or score lm-eval tasks, kind: harness)"
            )
        return v

    @classmethod
    def raw_task_names(cls, raw: dict) -> Any:
        return [raw.get("name") or "perplexity"]

    @property
    def task_names(self) -> list[str]:
        return [self.name]

    @property
    def has_report(self) -> bool:
        return self.report_text is not None

    def label(self, role: Role) -> str:
        return Path(self.text).name if role == "search" else Path(self.report_text or "-").name

    def carve(self, role: Role) -> Carve | None:
        return None

    def build(self, role: Role, limit: int | None, order_seed: int | None) -> Evaluator:
        from evaluators.perplexity import PerplexityEvaluator

        if order_seed is not None:
            raise EvaluatorError(
                "multi-fidelity (order_seed) scores lm-eval items; "
                "the perplexity evaluator has none"
            )
        path = self.text if role == "search" else self.report_text
        if path is None:
            raise EvaluatorError(
                "evaluator.report_text is not set: there is no held-out text to score; "
                "give evaluator.report_text, or skip held-out scores (basin report --no-heldout)"
            )
        return PerplexityEvaluator(
            path,
            window=self.window,
            batch_size=self.batch_size,
            limit=limit or self.limit,
            name=self.name,
        )

    def check_tasks(self, metrics: list[str]) -> TaskInfo:
        probe = self.build("search", None, None)
        return TaskInfo({key: probe.higher_is_better(key) for key in metrics}, {})

    def memory_estimate(self, shape: dict, width: int) -> MemoryEstimate:
        batch, tokens = self.batch_size, self.window
        what = f"evaluation estimate (batch {batch} x {tokens} tokens: logits, KV cache)"
        return MemoryEstimate(what, sequence_bytes(shape, self.batch_size, self.window, width))

    def overlap(self) -> str | None:
        if (
            self.report_text is not None
            and Path(self.report_text).resolve() == Path(self.text).resolve()
        ):
            return (
                "evaluator.report_text is evaluator.text: the report scores the very text the "
                "search chose its recipes on; give a held-out text file"
            )
        return None

    def resolved(self) -> PerplexitySection:
        report = _absolute(self.report_text) if self.report_text else None
        return self.model_copy(update={"text": _absolute(self.text), "report_text": report})


KINDS: dict[str, type[HarnessSection | PerplexitySection]] = {
    "harness": HarnessSection,
    "perplexity": PerplexitySection,
}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        kind = value.get("kind", "harness")
    else:
        kind = getattr(value, "kind", "harness")
    return kind if kind in KINDS else "unknown"


EvaluatorSection = Annotated[
    Union[tuple(Annotated[section, Tag(name)] for name, section in KINDS.items())],  # noqa: UP007
    Discriminator(
        _kind,
        custom_error_type="evaluator_kind",
        custom_error_message=f"unknown evaluator kind; Known: {', '.join(KINDS)}",
    ),
]


def _absolute(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def build_evaluator(
    section: HarnessSection | PerplexitySection,
    role: Role,
    *,
    limit: int | None = None,
    order_seed: int | None = None,
) -> Evaluator:
    """The evaluator that scores `role` as `section` describes; `limit` overrides the section's.

    order_seed: the items in a seeded order that slices can be scored from (multi-fidelity; only
    kinds that score items).
    """
    if role not in ROLES:
        raise EvaluatorError(f"unknown role {role!r}; Known: {', '.join(ROLES)}")
    if type(section) not in KINDS.values():
        raise EvaluatorError(f"not an evaluator section: {type(section).__name__}")
    return section.build(role, limit, order_seed)
