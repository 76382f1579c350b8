"""The evaluator section of a study config, and the one place evaluators are built from it.

`kind: harness` (the default) scores lm-eval tasks; `kind: perplexity` scores a text file. A study
scores candidates in two roles: "search" (what the sampler sees) and "report" (held-out scores of
the finalists). Each section says what each role scores; `build_evaluator` builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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
from evaluators.protocol import Evaluator, EvaluatorError

Role = Literal["search", "report"]
ROLES: tuple[str, ...] = ("search", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HarnessSection(_Section):
    """lm-eval tasks (local yaml files or built-ins), scored on one split for search, another for reports.

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

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"batch_size must be a positive number or 'auto'; got {v}")
        return v

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

    def carve(self, role: Role) -> Carve | None:
        if self.holdout is None:
            return None
        return Carve(self.holdout, self.holdout_seed, "search" if role == "search" else "holdout")

    def overlap(self) -> str | None:
        """Why the report would score items the search saw, or None when it does not."""
        if self.holdout is None and self.split == self.report_split:
            return (
                f"evaluator.split and evaluator.report_split are both '{self.split}': the report scores the "
                "very items the search chose its recipes on, so its held-out scores are not held out; carve "
                "the split instead (evaluator.holdout: 0.3), or report on another split"
            )
        return None

    def resolved(self) -> HarnessSection:
        """The same section with its local paths made absolute (workers may run elsewhere)."""
        return self.model_copy(
            update={"include_path": [_absolute(p) for p in self.include_paths] or None}
        )


class PerplexitySection(_Section):
    """Perplexity over fixed token windows of a text file: `text` for search, `report_text` held out."""

    kind: Literal["perplexity"]
    name: str = Field(default="perplexity", pattern=r"^[A-Za-z0-9_.-]+$")
    text: str
    report_text: str | None = None  # None: the report has no held-out scores
    window: int = Field(default=256, ge=2)
    batch_size: int = Field(default=8, ge=1)
    limit: int | None = Field(default=None, ge=1)  # windows per candidate

    @property
    def task_names(self) -> list[str]:
        return [self.name]

    def label(self, role: Role) -> str:
        return Path(self.text).name if role == "search" else Path(self.report_text or "-").name

    def overlap(self) -> str | None:
        if (
            self.report_text is not None
            and Path(self.report_text).resolve() == Path(self.text).resolve()
        ):
            return (
                "evaluator.report_text is evaluator.text: the report scores the very text the search chose its "
                "recipes on; give a held-out text file"
            )
        return None

    def resolved(self) -> PerplexitySection:
        report = _absolute(self.report_text) if self.report_text else None
        return self.model_copy(update={"text": _absolute(self.text), "report_text": report})


def _kind(value: Any) -> str:
    kind = (
        value.get("kind", "harness")
        if isinstance(value, dict)
        else getattr(value, "kind", "harness")
    )
    return kind if kind in KINDS else "unknown"


EvaluatorSection = Annotated[
    Annotated[HarnessSection, Tag("harness")] | Annotated[PerplexitySection, Tag("perplexity")],
    Discriminator(
        _kind,
        custom_error_type="evaluator_kind",
        custom_error_message="unknown evaluator kind; Known: harness, perplexity",
    ),
]
KINDS: dict[str, type[_Section]] = {"harness": HarnessSection, "perplexity": PerplexitySection}


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

    order_seed: the items in a seeded order that slices can be scored from (multi-fidelity; harness only).
    """
    if role not in ROLES:
        raise EvaluatorError(f"unknown role {role!r}; Known: {', '.join(ROLES)}")
    if isinstance(section, HarnessSection):
        from evaluators.harness import HarnessEvaluator

        return HarnessEvaluator(
            section.tasks,
            include_path=section.include_paths or None,
            split=section.split
            if role == "search" or section.holdout is not None
            else section.report_split,
            carve=section.carve(role),
            order_seed=order_seed,
            batch_size=section.batch_size,
            limit=limit or section.limit,
            sample_seed=section.sample_seed,
            num_fewshot=section.num_fewshot,
            apply_chat_template=section.apply_chat_template,
            fewshot_as_multiturn=section.fewshot_as_multiturn,
            system_instruction=section.system_instruction,
            gen_kwargs=section.gen_kwargs,
            builtin_tasks=section.builtin_tasks,
        )
    if isinstance(section, PerplexitySection):
        from evaluators.perplexity import PerplexityEvaluator

        if order_seed is not None:
            raise EvaluatorError(
                "multi-fidelity (order_seed) scores lm-eval items; the perplexity evaluator has none"
            )

        path = section.text if role == "search" else section.report_text
        if path is None:
            raise EvaluatorError(
                "evaluator.report_text is not set: there is no held-out text to score; "
                "give evaluator.report_text, or skip held-out scores (basin report --no-heldout)"
            )
        return PerplexityEvaluator(
            path,
            window=section.window,
            batch_size=section.batch_size,
            limit=limit or section.limit,
            name=section.name,
        )
    raise EvaluatorError(f"not an evaluator section: {type(section).__name__}")


def has_report(section: HarnessSection | PerplexitySection) -> bool:
    """Whether the section names something held out for the report to score."""
    return not isinstance(section, PerplexitySection) or section.report_text is not None
