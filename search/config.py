"""The study config: a YAML file validated by pydantic.

Every error is named with its field and value.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evaluators.config import KINDS, EvaluatorSection
from merging.catalog import METHODS, PARAMS, SLERP_OVER, Family, check_model_count, method_spec

SAMPLERS = ("tpe", "cmaes", "nsga2", "gp", "random")  # search.setup.make_sampler builds each
Method = Literal[METHODS]  # the method table's names (merging/catalog.py)
Range = float | tuple[float, float]


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class StudySection(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="folder-safe study name")
    output_dir: str | None = None  # default results/<name>
    storage: str | None = None  # default: Optuna's journal file in output_dir
    # database storages: seconds between a running trial's heartbeats; a trial silent for twice
    # that (its runner died, on any host) is failed and queued again by any runner of the study
    heartbeat_s: int = Field(default=60, ge=1)

    @property
    def folder(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("results") / self.name


class ModelsSection(_Strict):
    base: str
    finetunes: list[str] = Field(min_length=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto: cuda when available, else cpu
    # merge kernels (merging/fused.py): auto = compiled on CUDA and for big models on a CPU
    kernels: Literal["auto", "eager", "compiled"] = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    # where each worker holds the base and task vectors (merging/placement.py): auto = the device
    # up to what fits beside the live model and the evaluation, then host memory up to
    # host_memory_gib, then disk (search/memory.py)
    placement: str = "auto"
    # host memory a worker may hold tensors in (on a CPU device: everything it holds); None: half
    # of this machine's memory
    host_memory_gib: float | None = Field(default=None, gt=0)
    # the disk tier's folder (task vectors written once, memory-mapped); None: ~/.cache/basin
    cache_dir: str | None = None

    @field_validator("finetunes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a fine-tune is listed twice; list each once")
        return v

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        from merging.placement import PLACEMENTS

        if v not in PLACEMENTS:
            close = difflib.get_close_matches(v, PLACEMENTS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise ValueError(f"{v!r} is not allowed{hint} Known: {', '.join(PLACEMENTS)}")
        return v

    def resolved(self) -> ModelsSection:
        """The same section, local model paths made absolute (workers may run elsewhere).

        Hub ids are left unchanged.
        """
        return self.model_copy(
            update={
                "base": _absolute(self.base),
                "finetunes": [_absolute(p) for p in self.finetunes],
                "cache_dir": str(Path(self.cache_dir).expanduser().resolve())
                if self.cache_dir
                else None,
            }
        )


def _absolute(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


class SpaceSection(_Strict):
    # Default: task arithmetic with lambda searched, the method found reliably above the
    # base (README)
    methods: list[Method] = Field(default_factory=lambda: ["task_arithmetic"], min_length=1)
    granularity: Literal["model", "group", "anchors"] = "model"
    group_size: int = Field(default=1, ge=1)  # layers per group, for granularity: group
    anchors: int = Field(default=3, ge=2)  # depths interpolated linearly, for granularity: anchors
    split_attn_mlp: bool = False
    weight: Range = PARAMS["weight"].search
    density: Range = PARAMS["density"].search
    gamma: Range = PARAMS["gamma"].search  # breadcrumbs*
    epsilon: Range = PARAMS["epsilon"].search  # della*
    lam: Range = Field(default=PARAMS["lambda"].search, alias="lambda")
    t: Range = PARAMS["t"].search
    normalize: bool | None = None  # None: each method's default
    seed: int = 0  # DARE's draws; fixed so candidates share random numbers
    # nuslerp: whole tensors, or each pair of rows or columns
    slerp_over: Literal[SLERP_OVER] = "tensor"

    @field_validator("weight", "density", "gamma", "epsilon", "lam", "t", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) != 2:
                raise ValueError(f"a range is [low, high]; got {v}")
            return tuple(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> SpaceSection:
        problems = []
        for name in ("weight", "density", "gamma", "epsilon", "lam", "t"):
            value = getattr(self, name)
            key = "lambda" if name == "lam" else name
            if isinstance(value, tuple) and value[0] > value[1]:
                problems.append(f"{key}: low {value[0]} is above high {value[1]}")
            param = PARAMS[key]
            lo, hi = value if isinstance(value, tuple) else (value, value)
            if lo < param.low or (param.low_open and lo == param.low) or hi > param.high:
                bounds = f"{'(' if param.low_open else '['}{param.low:g}, {param.high:g}]"
                problems.append(f"{key} must lie in {bounds} ({param.what}); got {value}")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class Objective(_Strict):
    task: str
    metric: str = "acc"
    weight: float = 1.0
    direction: Literal["maximize", "minimize"] | None = None  # default: lm-eval's higher_is_better

    @property
    def key(self) -> str:
        return f"{self.task}/{self.metric}"


class ObjectivesSection(_Strict):
    mode: Literal["single", "pareto"] = "single"
    items: list[Objective] = Field(min_length=1)


class SamplerSection(_Strict):
    name: Literal[SAMPLERS] = "tpe"
    # The sampler's draws. With one worker a seed repeats a study; with several, results arrive
    # in an order the machine decides and the sampler learns them in that order, so it does not,
    # unless `reproducible`.
    seed: int | None = 0
    n_startup_trials: int = Field(default=10, ge=0)
    # Results told in trial order and each proposal made at its place in that order, so a seeded
    # study with several workers proposes the same candidates when run again; a worker whose
    # candidate finishes before an earlier one waits for it (search/loop.py, README).
    reproducible: bool = False
    # Processes that make the proposals (search/proposers.py), each with a sampler of its own; 0:
    # a thread of the run's process. For many workers with short candidates, or a slow sampler:
    # a proposal must take less than an evaluation divided by the workers (README, "The sampler's
    # cost"). Not with `reproducible` (proposals in trial order are made one at a time).
    proposers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _proposers_or_order(self) -> SamplerSection:
        if self.proposers and self.reproducible:
            raise ValueError(
                f"sampler.proposers: {self.proposers} with sampler.reproducible: true: proposals "
                "in trial order are made one at a time, on the run's own thread; drop one of the "
                "two (proposers: 0 keeps the study reproducible)"
            )
        return self


class BudgetSection(_Strict):
    """When the study ends: whichever of its limits is reached first.

    n_trials defaults to 50 only when neither timeout nor items is given: a budget of items (or
    seconds) alone runs until those are spent.
    """

    # candidates finished (scored to the end or pruned)
    n_trials: int | None = Field(default=50, ge=1)
    timeout: float | None = Field(default=None, gt=0)  # seconds of search, over all runs
    # evaluation items scored, over all trials and tasks
    items: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _count_only_by_default(cls, data: Any) -> Any:
        limited = isinstance(data, dict) and (data.get("items") or data.get("timeout"))
        if limited and "n_trials" not in data:
            data = {**data, "n_trials": None}
        return data

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetSection:
        if self.n_trials is None and self.timeout is None and self.items is None:
            raise ValueError("give n_trials, timeout or items: a study needs a budget to end")
        return self


class FidelitySection(_Strict):
    """Multi-fidelity search (search/fidelity.py): candidates scored on growing item rungs.

    Most candidates are stopped early.
    """

    # items per task of each rung before the full search set; null: 1/6 and 1/2 of the largest
    # task's search items, none (full fidelity) when 1/6 is under 16 items (search/fidelity.py)
    rungs: list[int] | None = Field(default=None, min_length=1)
    # single objective: share of candidates promoted at a rung
    keep: float = Field(default=0.2, gt=0, le=1)
    # Pareto: dominated by more than this many standard errors
    margin: float = Field(default=1.0, ge=0)
    # a candidate is compared at a rung with the `window` searched candidates nearest to it in
    # trial number that reached the rung (of comparable age); null: with every one
    window: int | None = Field(default=None, ge=1)
    seed: int = 0  # the items' order, hence which items each rung holds

    @field_validator("rungs")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(n < 1 for n in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(
                "rungs must be positive item counts in increasing order, such as [32, 128]; "
                f"got {v}"
            )
        return v


class WorkersSection(_Strict):
    count: int = Field(default=1, ge=1)
    # 0: CPU workers, torch threads split between them
    gpus_per_worker: float = Field(default=0, ge=0)
    # torch threads per worker; None: a CPU worker's share of the cores but one
    threads: int | None = Field(default=None, ge=1)
    # an existing Ray cluster ("auto" or host:port); None starts a local one
    address: str | None = None
    # seconds before a candidate is failed
    candidate_timeout: float | None = Field(default=None, gt=0)
    # each worker's GPU; validate and run check the memory plan
    gpu_memory_gib: float | None = Field(default=None, gt=0)


class BaselinesSection(_Strict):
    """Reference trials scored beside the search: basin's own and the user's recipes."""

    # each fine-tune alone, the uniform average, task arithmetic, TIES, Model Stock where the
    # space expresses them
    builtin: bool = True
    # the user's recipes (basin YAML or mergekit configs over the study's models), each a baseline
    # named after its file; one that is a point of the space also seeds the search
    recipes: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, data: Any) -> Any:
        # `baselines: true | false`, as configs wrote it before there were recipes
        return {"builtin": data} if isinstance(data, bool) else data

    @field_validator("recipes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a recipe is listed twice; list each once")
        return v


class StudyConfig(_Strict):
    study: StudySection
    models: ModelsSection
    space: SpaceSection = SpaceSection()
    evaluator: EvaluatorSection
    objectives: ObjectivesSection
    sampler: SamplerSection = SamplerSection()
    budget: BudgetSection = BudgetSection()
    workers: WorkersSection = WorkersSection()
    # None: every candidate scored on every search item. Not given: on, with the default rungs,
    # for one objective (or their weighted sum) from an evaluator that scores items, where
    # tests/benchmarks/bench_fidelity.py shows it pays; off otherwise (a Pareto study)
    fidelity: FidelitySection | None = None
    baselines: BaselinesSection = BaselinesSection()

    @model_validator(mode="after")
    def _fidelity_by_default(self) -> StudyConfig:
        one = self.objectives.mode == "single" or len(self.objectives.items) == 1
        if "fidelity" not in self.model_fields_set and one and self.evaluator.scores_items:
            object.__setattr__(self, "fidelity", FidelitySection())  # (a frozen model)
        return self

    def fidelity_by_default(self) -> bool:
        """Multi-fidelity is on because the config left it to basin (not a `fidelity` section)."""
        return self.fidelity is not None and "fidelity" not in self.model_fields_set

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        problems = cross_problems(self.model_dump(by_alias=True))
        if not searchable(self.space, len(self.models.finetunes)):
            problems.append(
                "space: nothing to search (one method and every value fixed); "
                "give a range such as weight: [0, 1], or apply one recipe with `basin merge`"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_problems(data: dict) -> list[str]:
    """Checks across sections, on the raw mapping too, so they are reported beside field errors."""

    def get(*path: str) -> Any:
        node: Any = data
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    problems = []
    kind = get("evaluator", "kind") or "harness"
    section = KINDS.get(kind)
    raw = get("evaluator")
    tasks = section.raw_task_names(raw) if section is not None and isinstance(raw, dict) else None
    items = get("objectives", "items")
    if isinstance(tasks, list) and isinstance(items, list):
        for i, obj in enumerate(items):
            task = obj.get("task") if isinstance(obj, dict) else None
            if isinstance(task, str) and task not in tasks:
                close = difflib.get_close_matches(task, [str(t) for t in tasks], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else "."
                problems.append(
                    f"objectives.items[{i}].task: '{task}' is not among {section.tasks_field}"
                    f"{hint} Known: {', '.join(map(str, tasks))}"
                )
    if get("objectives", "mode") == "pareto" and isinstance(items, list) and len(items) < 2:
        problems.append(
            "objectives.mode: pareto needs at least two objectives; use mode: single for one"
        )
    if section is not None and not section.scores_items:
        if get("fidelity") is not None:
            problems.append(
                f"fidelity: multi-fidelity scores lm-eval items in rungs; the {kind} evaluator has "
                "none. Remove the fidelity section, or use evaluator.kind: harness"
            )
        if get("budget", "items") is not None:
            problems.append(
                f"budget.items: the items budget counts scored lm-eval items; the {kind} evaluator "
                "has none. Use budget.n_trials or budget.timeout"
            )
    methods, finetunes = get("space", "methods"), get("models", "finetunes")
    if isinstance(methods, list) and isinstance(finetunes, list):
        for name in methods:
            if name in METHODS and (
                problem := check_model_count(method_spec(name), len(finetunes), "this config")
            ):
                problems.append(f"space.methods: {problem}")
    return problems


def searchable(space: SpaceSection, n_models: int) -> bool:
    """Whether the space has at least one free parameter."""
    if len(space.methods) > 1:
        return True
    spec = method_spec(space.methods[0])
    for name in spec.params:
        free = isinstance(getattr(space, "lam" if name == "lambda" else name), tuple)
        normalize = spec.normalize if space.normalize is None else space.normalize
        if name == "weight" and spec.family is Family.LINEAR and normalize and n_models == 1:
            free = False  # one normalized weight always gives the model itself
        if free:
            return True
    return False


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides; values are parsed as YAML (numbers, lists, booleans)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r}: expected key.sub=value, e.g. --set budget.n_trials=20"
            )
        key, raw = item.split("=", 1)
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise ConfigError(f"--set {item!r}: '{key}' is not a dotted field name")
        _set_path(data, key, yaml.safe_load(raw))
    return data


def _format_errors(exc: ValidationError, data: Any = None) -> list[str]:
    lines = []
    for err in exc.errors():
        err["loc"] = _without_tags(err["loc"])
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            field_name = str(err["loc"][-1])
            known = _known_fields(err["loc"][:-1], data)
            close = difflib.get_close_matches(field_name, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            lines.append(f"{loc}: unknown key{hint} Known: {', '.join(known)}")
        elif err["type"] == "literal_error":
            lines.append(f"{loc}: {err.get('input')!r} is not allowed; {msg[0].lower() + msg[1:]}")
        elif err["type"] == "evaluator_kind":
            kind = err.get("input", {}).get("kind") if isinstance(err.get("input"), dict) else None
            close = difflib.get_close_matches(str(kind), list(KINDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            lines.append(
                f"{loc}.kind: unknown evaluator kind {kind!r}{hint} Known: {', '.join(KINDS)}"
            )
        elif err["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        elif err["type"] == "value_error":  # our own checks: one line per problem
            lines += [f"{loc}: {m}" if loc else m for m in msg.split("\n")]
        else:
            shown = (
                f" (got {err.get('input')!r})"
                if "input" in err and not isinstance(err.get("input"), dict)
                else ""
            )
            lines.append(f"{loc}: {msg}{shown}" if loc else msg)
    return [f"  - {line}" for line in lines]


def _without_tags(loc: tuple) -> tuple:
    """An error location without the evaluator kind pydantic inserts after `evaluator`."""
    if len(loc) > 1 and loc[0] == "evaluator" and loc[1] in KINDS:
        return (loc[0], *loc[2:])
    return loc


def _known_fields(loc: tuple, data: Any = None) -> list[str]:
    model: type[BaseModel] = StudyConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if model is StudyConfig and part == "evaluator":
            raw = data.get("evaluator") if isinstance(data, dict) else None
            kind = raw.get("kind", "harness") if isinstance(raw, dict) else "harness"
            model = KINDS.get(kind, KINDS["harness"])
            continue
        annotation = model.model_fields[str(part)].annotation
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return [f.alias or name for name, f in model.model_fields.items()]


def config_from_dict(
    data: Any, source: str = "config", overrides: Sequence[str] = ()
) -> StudyConfig:
    """Validate a config mapping; `overrides` are the --set items already applied to it, so that a
    problem they caused is blamed on them, not on the file."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: a study config must be a YAML mapping with study, models, evaluator and "
            "objectives (configs/demo.yaml is an example)"
        )
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        lines = _format_errors(exc, data)
        if not any(err["loc"] == () for err in exc.errors()):  # cross checks did not run: add them
            lines += [f"  - {p}" for p in cross_problems(data)]
        blamed = [_override_of(line, overrides) for line in lines]
        lines = [f"{ln} (from --set {item})" if item else ln for ln, item in zip(lines, blamed)]
        if all(blamed):
            fix = "fix the --set values"
        else:
            fix = "fix them in the file, or override a field with --set key.sub=value"
        n = len(lines)
        raise ConfigError(
            f"{source}: {n} problem{'s' if n > 1 else ''} ({fix}):\n" + "\n".join(lines)
        ) from None


def _override_of(line: str, overrides: Sequence[str]) -> str | None:
    """The --set item whose field a problem line names, if any."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if line.startswith((f"  - {key}:", f"  - {key}.")):
            return item
    return None


def read_config_data(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}; check the path (configs/demo.yaml is an example)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not valid YAML; fix it where the parser points: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a study config must be a YAML mapping with study, models, evaluator and "
            "objectives (configs/demo.yaml is an example)"
        )
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override and validate a study config; raises ConfigError listing every problem."""
    data = apply_overrides(read_config_data(path), overrides or [])
    return config_from_dict(data, str(path), overrides or [])


def config_to_dict(config: StudyConfig) -> dict:
    return config.model_dump(mode="json", by_alias=True)
