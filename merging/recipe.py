"""The merge recipe: a value type, its hand-written YAML form, and its validation.

```yaml
method: ties                 # one of merging.catalog.METHODS (README: the method table)
base: path/to/base           # required by every method but linear, slerp and nuslerp
models:
  - path: path/to/code-ft
    weight: 0.7              # a number ...
    density: [0.3, 0.8]      # ... or values over depth, interpolated linearly across layers
  - path: path/to/chat-ft
    weight: {attn: 0.2, mlp: [0.4, 0.9], default: 0.5}   # separate attention / MLP values
    # gamma: 0.01            # breadcrumbs: fraction of largest entries set aside
    # epsilon: 0.15          # della: spread of the keep probabilities
parameters:
  lambda: 1.0                # global scale of the merged task vector (also per-layer)
  normalize: true            # default per method, as in mergekit
  rescale: true              # DARE, DELLA: divide survivors by their keep probability
  seed: 0                    # DARE's and DELLA's random draws
  t: 0.5                     # slerp only: 0 gives the first model, 1 the second
  slerp_over: tensor         # nuslerp: interpolate whole tensors, or each pair of rows or columns
dtype: bfloat16
```
Which keys a method reads, and their defaults, come from the method table (merging/catalog.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merging.catalog import (
    METHODS,
    PARAMS,
    PER_MODEL,
    SLERP_OVER,
    Family,
    check_model_count,
    check_value,
    method_spec,
)
from merging.errors import MergeError, did_you_mean, unknown

DTYPES = ("float32", "float16", "bfloat16")
PARAM_KINDS = ("attn", "mlp", "default")


@dataclass(frozen=True)
class LayerParam:
    """A number, or anchor values over depth, optionally separate for attention and MLP tensors."""

    default: tuple[float, ...]
    attn: tuple[float, ...] | None = None
    mlp: tuple[float, ...] | None = None

    @classmethod
    def constant(cls, value: float) -> LayerParam:
        return cls(default=(float(value),))

    def anchors(self, kind: str) -> tuple[float, ...]:
        """The anchor values that apply to a tensor of this kind ('attn', 'mlp' or 'other')."""
        specific = {"attn": self.attn, "mlp": self.mlp}.get(kind)
        return specific if specific is not None else self.default

    def at(self, depth: float, kind: str) -> float:
        """The value at relative depth in [0, 1] for a tensor of this kind, interpolated
        linearly."""
        values = self.anchors(kind)
        if len(values) == 1:
            return values[0]
        pos = depth * (len(values) - 1)
        if abs(pos - round(pos)) < 1e-9:  # on an anchor (one value per layer): that value, exactly
            return values[round(pos)]
        lo = min(int(pos), len(values) - 2)
        frac = pos - lo
        return values[lo] * (1.0 - frac) + values[lo + 1] * frac

    def all_values(self) -> tuple[float, ...]:
        return self.default + (self.attn or ()) + (self.mlp or ())

    def max_anchors(self) -> int:
        return max(len(v) for v in (self.default, self.attn, self.mlp) if v is not None)

    def to_yaml(self) -> Any:
        def plain(values: tuple[float, ...]) -> float | list[float]:
            return values[0] if len(values) == 1 else list(values)

        if self.attn is None and self.mlp is None:
            return plain(self.default)
        out = {"attn": self.attn, "mlp": self.mlp, "default": self.default}
        return {k: plain(v) for k, v in out.items() if v is not None}


def _default(name: str) -> LayerParam:
    return LayerParam.constant(PARAMS[name].default)


@dataclass(frozen=True)
class ModelEntry:
    path: str
    weight: LayerParam = field(default_factory=lambda: LayerParam.constant(1.0))
    density: LayerParam = field(default_factory=lambda: _default("density"))
    gamma: LayerParam = field(default_factory=lambda: _default("gamma"))
    epsilon: LayerParam = field(default_factory=lambda: _default("epsilon"))


@dataclass(frozen=True)
class MergeRecipe:
    """Everything needed to rebuild one merge, bit for bit on the same device and dtype."""

    method: str
    models: tuple[ModelEntry, ...]
    base: str | None = None
    lam: LayerParam = field(default_factory=lambda: LayerParam.constant(1.0))
    t: LayerParam = field(default_factory=lambda: LayerParam.constant(0.5))
    normalize: bool | None = None  # None: the method's default
    rescale: bool | None = None
    seed: int = 0
    dtype: str = "float32"
    slerp_over: str = "tensor"  # nuslerp: one of catalog.SLERP_OVER

    @property
    def normalize_(self) -> bool:
        return method_spec(self.method).normalize if self.normalize is None else self.normalize

    @property
    def rescale_(self) -> bool:
        return bool(method_spec(self.method).rescale) if self.rescale is None else self.rescale

    @property
    def reference(self) -> str:
        """The tensor every task vector is taken against: the base, or the first model."""
        return self.base if self.base is not None else self.models[0].path


def _parse_param(value: Any, where: str, *, required_default: float | None) -> LayerParam:
    def numbers(v: Any, at: str) -> tuple[float, ...]:
        if isinstance(v, bool) or not isinstance(v, (int, float, list, tuple)):
            raise MergeError(f"{at}: expected a number or a list of numbers, got {v!r}")
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        if not items:
            raise MergeError(
                f"{at}: the list of values over depth is empty; give at least one number"
            )
        for x in items:
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise MergeError(f"{at}: expected numbers, got {x!r}")
        return tuple(float(x) for x in items)

    if isinstance(value, Mapping):
        for key in value:
            if key not in PARAM_KINDS:
                raise MergeError(
                    f"{where}: unknown tensor kind '{key}'"
                    f"{did_you_mean(str(key), PARAM_KINDS) or '.'} Known: {', '.join(PARAM_KINDS)}"
                )
        if "default" in value:
            default = numbers(value["default"], f"{where}.default")
        elif required_default is not None:
            default = (required_default,)
        else:
            raise MergeError(
                f"{where}: the attn/mlp form needs a 'default' value for the other "
                "tensors (norms, embeddings, head)"
            )
        attn = numbers(value["attn"], f"{where}.attn") if "attn" in value else None
        mlp = numbers(value["mlp"], f"{where}.mlp") if "mlp" in value else None
        return LayerParam(default=default, attn=attn, mlp=mlp)
    return LayerParam(default=numbers(value, where))


def _check_keys(data: Mapping, known: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in known:
            raise MergeError(
                f"{where}: unknown key '{key}'{did_you_mean(str(key), known) or '.'} "
                f"Known: {', '.join(known)}"
            )


def recipe_from_dict(data: Any) -> MergeRecipe:
    """Parse the YAML form (see the module docstring) and validate it."""
    if not isinstance(data, Mapping):
        raise MergeError("a recipe must be a YAML mapping with at least 'method' and 'models'")
    if "merge_method" in data:
        raise MergeError(
            "this looks like a mergekit config; convert it first: basin convert FILE --to basin"
        )
    _check_keys(data, ("method", "base", "models", "parameters", "dtype"), "recipe")
    if "method" not in data:
        raise MergeError(f"recipe: 'method' is missing. Known: {', '.join(METHODS)}")
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeError(
            "recipe: 'models' must be a non-empty list of {path, weight, density, ...}"
        )
    entries = []
    for i, m in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, Mapping) or "path" not in m:
            raise MergeError(f"{where}: each model needs a 'path' (a local folder or a hub id)")
        _check_keys(m, ("path", *PER_MODEL), where)
        entries.append(
            ModelEntry(
                path=str(m["path"]),
                weight=_parse_param(m.get("weight", 1.0), f"{where}.weight", required_default=None),
                **{
                    key: _parse_param(
                        m.get(key, PARAMS[key].default),
                        f"{where}.{key}",
                        required_default=PARAMS[key].default,
                    )
                    for key in PER_MODEL[1:]
                },
            )
        )
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise MergeError("recipe: 'parameters' must be a mapping")
    _check_keys(params, ("lambda", "normalize", "rescale", "seed", "t", "slerp_over"), "parameters")
    for flag in ("normalize", "rescale"):
        if flag in params and not isinstance(params[flag], bool):
            raise MergeError(f"parameters.{flag}: expected true or false, got {params[flag]!r}")
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MergeError(f"parameters.seed: expected an integer, got {seed!r}")
    recipe = MergeRecipe(
        method=str(data["method"]),
        models=tuple(entries),
        base=None if data.get("base") is None else str(data["base"]),
        lam=_parse_param(params.get("lambda", 1.0), "parameters.lambda", required_default=1.0),
        t=_parse_param(params.get("t", 0.5), "parameters.t", required_default=None),
        normalize=params.get("normalize"),
        rescale=params.get("rescale"),
        seed=seed,
        dtype=str(data.get("dtype", "float32")),
        slerp_over=str(params.get("slerp_over", "tensor")),
    )
    validate_recipe(recipe)
    return recipe


def validate_recipe(recipe: MergeRecipe) -> None:
    """Check what can be checked without the models; raises MergeError."""
    spec = method_spec(recipe.method)
    if recipe.dtype not in DTYPES:
        raise unknown("dtype", recipe.dtype, DTYPES)
    if spec.needs_base and recipe.base is None:
        raise MergeError(
            f"method '{recipe.method}' works on task vectors and needs 'base': the model the "
            "others were fine-tuned from"
        )
    if recipe.rescale and spec.rescale is None:
        raise MergeError(
            f"parameters.rescale: {recipe.method} has no rescale (it applies to the methods that "
            "drop entries at random: dare_*, della*); remove it"
        )
    if recipe.slerp_over not in SLERP_OVER:
        raise unknown("parameters.slerp_over", recipe.slerp_over, SLERP_OVER)
    if recipe.slerp_over != "tensor" and spec.family is not Family.NUSLERP:
        raise MergeError(
            f"parameters.slerp_over: {recipe.method} interpolates no rows or columns (only nuslerp "
            "reads slerp_over); remove it"
        )
    if problem := check_model_count(spec, len(recipe.models)):
        raise MergeError(problem)
    paths = [m.path for m in recipe.models]
    if len(set(paths)) != len(paths):
        raise MergeError("the same model is listed twice in 'models'; give each fine-tune once")
    for i, m in enumerate(recipe.models):
        for key in PER_MODEL:
            for value in getattr(m, key).all_values():
                check_value(PARAMS[key], value, f"models[{i}].{key}")
    for key, param in (("t", recipe.t), ("lambda", recipe.lam)):
        for value in param.all_values():
            check_value(PARAMS[key], value, f"parameters.{key}")


def recipe_to_dict(recipe: MergeRecipe) -> dict[str, Any]:
    """The YAML form; `recipe_from_dict(recipe_to_dict(r)) == r`."""
    params: dict[str, Any] = {"lambda": recipe.lam.to_yaml(), "seed": recipe.seed}
    if method_spec(recipe.method).uses("t"):
        params["t"] = recipe.t.to_yaml()
    if method_spec(recipe.method).family is Family.NUSLERP:
        params["slerp_over"] = recipe.slerp_over
    if recipe.normalize is not None:
        params["normalize"] = recipe.normalize
    if recipe.rescale is not None:
        params["rescale"] = recipe.rescale
    out: dict[str, Any] = {"method": recipe.method}
    if recipe.base is not None:
        out["base"] = recipe.base
    spec = method_spec(recipe.method)
    models = []
    for m in recipe.models:
        entry: dict[str, Any] = {"path": m.path, "weight": m.weight.to_yaml()}
        # written where the method reads it, or where it was set (a task-arithmetic recipe shows
        # no density it would not read)
        for key in ("density", "gamma", "epsilon"):
            if spec.uses(key) or getattr(m, key) != _default(key):
                entry[key] = getattr(m, key).to_yaml()
        models.append(entry)
    out["models"] = models
    out["parameters"] = params
    out["dtype"] = recipe.dtype
    return out


def read_yaml(path: str | Path, what: str = "recipe file") -> Any:
    """A YAML file's content; a missing file or bad YAML is a MergeError."""
    path = Path(path)
    if not path.is_file():
        raise MergeError(f"{what} not found: {path}; check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MergeError(
            f"{path} is not valid YAML; fix it where the parser points: {exc}"
        ) from None


def load_recipe(path: str | Path) -> MergeRecipe:
    """Read and validate a recipe YAML file."""
    return recipe_from_dict(read_yaml(path))


def dump_recipe(recipe: MergeRecipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
