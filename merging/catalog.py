"""The merge methods: one frozen description each, read by every part of basin that names a method.

Recipe validation, the search space and its baselines, the resident and export paths, the memory
plan, the mergekit conversion and the report all ask this table what a method needs, instead of
spelling method names themselves. Adding a method means a row here, its math (merging/methods.py)
and its tests. A row's family and keep rule are members of `Family` and `Keep`, checked when the
row is made: branch on those members (`is`) and on the rows' flags, not on their names.

Families (`Family`):
- TASK_VECTOR: base + lambda * mix of the task vectors T_k = M_k - base, each sparsified by its
  `keep` rule, with or without a sign election (`consensus`); one kernel runs them all;
- LINEAR: sum_k w_k M_k, normalized by the sum of the weights by default;
- SLERP: spherical interpolation between exactly two models;
- NUSLERP: spherical interpolation of two models, or of their task vectors when a base is given,
  at t = w2 / (w1 + w2), over whole tensors, rows or columns (the recipe's slerp_over);
- MODEL_STOCK: base + t * mean_k T_k with t from the angle between the task vectors (nothing to
  set).

Keep rules (`Keep`: how a task vector is sparsified; mergekit's names in brackets):
- ALL: nothing dropped;
- MAGNITUDE [magnitude]: the max(1, int(d*n)) entries of largest |T|;
- OUTLIERS [magnitude_outliers]: the int(d*n) largest after the int(gamma*n) largest are set aside;
- RANDOM [random]: each entry kept with probability d;
- DELLA [della_magprune]: each entry kept with a probability from d - epsilon (smallest |T| in its
  row) to d + epsilon (largest), clamped to [0, 1].
MAGNITUDE and OUTLIERS are `ranked` (by magnitude over the whole tensor), RANDOM and DELLA `drawn`
(from the recipe's seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from merging.errors import MergeError, unknown


# Family and Keep are str-valued: a member equals its name as recipes, the YAML and reports spell it
class Family(str, Enum):
    """How a method combines the models (the module docstring describes each)."""

    TASK_VECTOR = "task_vector"
    LINEAR = "linear"
    SLERP = "slerp"
    NUSLERP = "nuslerp"
    MODEL_STOCK = "model_stock"


class Keep(str, Enum):
    """How the task-vector family sparsifies a task vector (see the module docstring)."""

    ALL = "all"
    MAGNITUDE = "magnitude"
    OUTLIERS = "outliers"
    RANDOM = "random"
    DELLA = "della"

    @property
    def ranked(self) -> bool:
        """Whether entries are kept by their rank of magnitude in the whole tensor."""
        return self in (Keep.MAGNITUDE, Keep.OUTLIERS)

    @property
    def drawn(self) -> bool:
        """Whether entries are kept by random draws (from the recipe's seed)."""
        return self in (Keep.RANDOM, Keep.DELLA)


SLERP_OVER = ("tensor", "rows", "columns")  # nuslerp: what one interpolated vector is


@dataclass(frozen=True)
class Param:
    """A number a recipe may set for a method: per model (weight, density, gamma, epsilon) or
    shared."""

    name: str
    per_model: bool
    default: float | None  # None: required (a per-model weight)
    low: float  # valid values: low <(=) value <= high
    high: float
    low_open: bool  # low itself is not allowed
    search: tuple[float, float]  # the default search range
    what: str  # for messages: what the number means


WEIGHT = Param(
    "weight",
    True,
    None,
    float("-inf"),
    float("inf"),
    True,
    (0.0, 1.0),
    "the model's share of the mix",
)
DENSITY = Param(
    "density", True, 1.0, 0.0, 1.0, True, (0.1, 1.0), "the fraction of each task vector kept"
)
GAMMA = Param(
    "gamma",
    True,
    0.01,
    0.0,
    1.0,
    False,
    (0.0, 0.05),
    "the fraction of largest-magnitude entries set aside before the density is kept",
)
EPSILON = Param(
    "epsilon",
    True,
    0.15,
    0.0,
    0.5,
    False,
    (0.0, 0.15),
    "half the spread of keep probabilities between the smallest and largest entries",
)
LAMBDA = Param(
    "lambda",
    False,
    1.0,
    float("-inf"),
    float("inf"),
    True,
    (0.3, 1.5),
    "the global scale of the merged task vector",
)
T = Param(
    "t",
    False,
    0.5,
    0.0,
    1.0,
    False,
    (0.0, 1.0),
    "the position between the two models (0: the first, 1: the second)",
)
PARAMS = {p.name: p for p in (WEIGHT, DENSITY, GAMMA, EPSILON, LAMBDA, T)}
PER_MODEL = tuple(p.name for p in PARAMS.values() if p.per_model)  # weight, density, gamma, epsilon


@dataclass(frozen=True)
class Method:
    name: str
    family: Family
    params: tuple[str, ...]  # the PARAMS this method reads
    keep: Keep = Keep.ALL  # only the task-vector family sparsifies
    consensus: bool = False  # elect a sign per entry and mix only agreeing entries (TIES)
    normalize: bool = False  # the default of `normalize` (mergekit's)
    rescale: bool | None = None  # the default of `rescale`; None: the method has no rescale
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    mergekit: str = ""  # mergekit's name for it ("" when mergekit has no such method)
    summary: str = ""

    def __post_init__(self) -> None:
        # a plain name would equal its member yet fail the `is` tests the merge code branches on
        if not isinstance(self.family, Family):
            raise TypeError(
                f"method {self.name!r}: family {self.family!r} is not a Family; use one of "
                f"{', '.join(f'Family.{f.name}' for f in Family)}"
            )
        if not isinstance(self.keep, Keep):
            raise TypeError(
                f"method {self.name!r}: keep {self.keep!r} is not a Keep rule; use one of "
                f"{', '.join(f'Keep.{k.name}' for k in Keep)}"
            )
        if (self.keep is not Keep.ALL or self.consensus) and self.family is not Family.TASK_VECTOR:
            raise ValueError(
                f"method {self.name!r}: only the task-vector family sparsifies or elects signs; "
                "set family=Family.TASK_VECTOR, or leave keep and consensus at their defaults"
            )

    @property
    def random(self) -> bool:
        """Whether its merge depends on random draws (the recipe's seed)."""
        return self.keep.drawn

    @property
    def magnitude_ranked(self) -> bool:
        """Whether it keeps entries by their rank of magnitude (tables precomputed per worker)."""
        return self.keep.ranked

    def uses(self, param: str) -> bool:
        return param in self.params


_TV = ("weight", "lambda")
METHOD_TABLE: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "linear",
            Family.LINEAR,
            ("weight",),
            normalize=True,
            needs_base=False,
            mergekit="linear",
            summary="weighted average of the models",
        ),
        Method(
            "task_arithmetic",
            Family.TASK_VECTOR,
            _TV,
            mergekit="task_arithmetic",
            summary="base + lambda * weighted sum of task vectors",
        ),
        Method(
            "ties",
            Family.TASK_VECTOR,
            ("weight", "density", "lambda"),
            keep=Keep.MAGNITUDE,
            consensus=True,
            normalize=True,
            mergekit="ties",
            summary=(
                "trim each task vector to its largest entries, elect a sign, mix agreeing entries"
            ),
        ),
        Method(
            "dare_linear",
            Family.TASK_VECTOR,
            ("weight", "density", "lambda"),
            keep=Keep.RANDOM,
            rescale=True,
            mergekit="dare_linear",
            summary="drop entries at random, rescale survivors, weighted sum",
        ),
        Method(
            "dare_ties",
            Family.TASK_VECTOR,
            ("weight", "density", "lambda"),
            keep=Keep.RANDOM,
            consensus=True,
            rescale=True,
            mergekit="dare_ties",
            summary="DARE drops, then TIES' sign election",
        ),
        Method(
            "breadcrumbs",
            Family.TASK_VECTOR,
            ("weight", "density", "gamma", "lambda"),
            keep=Keep.OUTLIERS,
            mergekit="breadcrumbs",
            summary="drop the largest (gamma) and the smallest entries, weighted sum",
        ),
        Method(
            "breadcrumbs_ties",
            Family.TASK_VECTOR,
            ("weight", "density", "gamma", "lambda"),
            keep=Keep.OUTLIERS,
            consensus=True,
            mergekit="breadcrumbs_ties",
            summary="breadcrumbs' drops, then TIES' sign election",
        ),
        Method(
            "della",
            Family.TASK_VECTOR,
            ("weight", "density", "epsilon", "lambda"),
            keep=Keep.DELLA,
            consensus=True,
            normalize=True,
            rescale=True,
            mergekit="della",
            summary="drop at random with probabilities ranked by magnitude, rescale, sign election",
        ),
        Method(
            "della_linear",
            Family.TASK_VECTOR,
            ("weight", "density", "epsilon", "lambda"),
            keep=Keep.DELLA,
            rescale=True,
            mergekit="della_linear",
            summary="DELLA's drops, weighted sum",
        ),
        Method(
            "model_stock",
            Family.MODEL_STOCK,
            (),
            min_models=2,
            mergekit="model_stock",
            summary="base + t * mean task vector, t from the angle between the task vectors",
        ),
        Method(
            "slerp",
            Family.SLERP,
            ("t",),
            needs_base=False,
            min_models=2,
            max_models=2,
            mergekit="slerp",
            summary="spherical interpolation between two models",
        ),
        Method(
            "nuslerp",
            Family.NUSLERP,
            ("weight",),
            needs_base=False,
            min_models=2,
            max_models=2,
            mergekit="nuslerp",
            summary=(
                "spherical interpolation at t = w2 / (w1 + w2): of the task vectors given a base, "
                "else of the models; per tensor, row or column"
            ),
        ),
    )
}
METHODS = tuple(METHOD_TABLE)


def method_spec(name: str) -> Method:
    """The method's description; an unknown name gets a did-you-mean message."""
    if name not in METHOD_TABLE:
        raise unknown("method", name, METHODS)
    return METHOD_TABLE[name]


def check_model_count(method: Method, n: int, where: str = "this recipe") -> str | None:
    """A message when `n` fine-tunes do not suit the method, else None."""
    if (
        method.max_models is not None
        and method.min_models == method.max_models
        and n != method.min_models
    ):
        count = {2: "two", 3: "three"}.get(method.min_models, str(method.min_models))
        return (
            f"{method.name} merges exactly {count} models; {where} has {n}. "
            "Use linear or ties for more"
        )
    if n < method.min_models:
        return f"{method.name} needs at least {method.min_models} fine-tunes; {where} has {n}"
    return None


def check_value(param: Param, value: float, where: str) -> None:
    """Raise MergeError unless `value` is valid for `param`."""
    if value != value or abs(value) == float("inf"):
        raise MergeError(f"{where}: {value} is not a finite number; it is {param.what}")
    below = value < param.low or (param.low_open and value == param.low)
    if below or value > param.high:
        bounds = f"{'(' if param.low_open else '['}{param.low:g}, {param.high:g}]"
        raise MergeError(f"{where}: {value} is outside {bounds}: it is {param.what}")
