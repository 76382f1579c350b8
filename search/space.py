"""The search space: trial -> params (`suggest`), params -> MergeRecipe (`recipe_from_params`,
pure).

Parameter names: `method`; `weight.<model>[.<attn|mlp>][.<slot>]` and likewise `density`, `gamma`
and `epsilon` per fine-tune, where the method reads them (merging/catalog.py); `lambda`; `t`.
Slots are the granularity's depth positions: none for one value per model, `g<j>` per group of
consecutive layers, `a<j>` per anchor depth. With split_attn_mlp, attention and MLP tensors get
their own slots and the plain name holds the value of the rest (norms, embeddings, head).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from merging.catalog import METHOD_TABLE, PARAMS, PER_MODEL, Family, method_spec
from merging.recipe import LayerParam, MergeRecipe, ModelEntry, validate_recipe
from search.config import SpaceSection, StudyConfig

# Where a magnitude-ranked method is searched, density and gamma are searched on this grid (for
# every method of the space: search.space._step): the worker's precomputed tables hold the TIES
# bounds of every density on it, and values over depth are stored rounded to it.
RANK_GRID = 0.001


@dataclass(frozen=True)
class SearchSpace:
    """The space of one study: what is searched, over which models and layers."""

    config: SpaceSection
    base: str
    model_paths: tuple[str, ...]
    model_names: tuple[str, ...]
    num_layers: int
    dtype: str

    @property
    def slots(self) -> tuple[str, ...]:
        cfg = self.config
        if cfg.granularity == "group":
            return tuple(f"g{j}" for j in range(math.ceil(self.num_layers / cfg.group_size)))
        if cfg.granularity == "anchors":
            return tuple(f"a{j}" for j in range(min(cfg.anchors, self.num_layers)))
        return ("",)

    def names(self, kind: str, model: str) -> list[str]:
        """Parameter names of one per-model quantity ('weight' or 'density') over slots and
        parts."""
        parts = ["attn.", "mlp."] if self.config.split_attn_mlp else [""]
        names = [
            f"{kind}.{model}.{part}{slot}".rstrip(".") for part in parts for slot in self.slots
        ]
        if self.config.split_attn_mlp:
            names.append(f"{kind}.{model}")
        return names


def _model_names(paths: list[str]) -> tuple[str, ...]:
    """Short, distinct, parameter-safe names for the fine-tunes."""
    names: list[str] = []
    for path in paths:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path.rstrip("/")).name) or "model"
        name, i = stem, 2
        while name in names:
            name, i = f"{stem}_{i}", i + 1
        names.append(name)
    return tuple(names)


def num_layers_of(model_dir: str | Path) -> int:
    """The layer count from a model folder's config.json (no weights are read)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    raise ValueError(f"{model_dir}/config.json names no layer count (num_hidden_layers or n_layer)")


def build_space(
    config: StudyConfig, base_dir: str | Path | None, num_layers: int | None = None
) -> SearchSpace:
    """The space over the config's models; the layer count is read from the base's config in
    `base_dir` unless given."""
    return SearchSpace(
        config=config.space,
        base=config.models.base,
        model_paths=tuple(config.models.finetunes),
        model_names=_model_names(config.models.finetunes),
        num_layers=num_layers if num_layers is not None else num_layers_of(base_dir),
        dtype=config.models.dtype,
    )


def _value(trial: optuna.trial.BaseTrial, name: str, spec: float | tuple[float, float]) -> float:
    if isinstance(spec, tuple):
        return trial.suggest_float(name, spec[0], spec[1])
    return float(spec)


def _setting(cfg: SpaceSection, name: str) -> float | tuple[float, float]:
    return cfg.lam if name == "lambda" else getattr(cfg, name)


def _step(methods: Sequence[str], name: str) -> float | None:
    """The grid a param's values take in the recipe, the same for every method of the space.

    The sampler itself searches the range without a step: Optuna's TPE scores a value of a stepped
    range by a mass of its truncated normals, evaluated element by element in Python, and a
    multivariate TPE sample of a range that is stepped for one method and not for another falls
    off the grid and is sampled again alone. Measured (58 params, 120 trials of TPE with grid
    densities): 0.55 s per proposal with a grid for ties only, 0.3 s with it for every method,
    0.08 s without a step. So the recipe puts each value on the grid (`_layer_param`).
    """
    ranked = any(method_spec(m).magnitude_ranked for m in methods)
    return RANK_GRID if name in ("density", "gamma") and ranked else None


def suggest(trial: optuna.trial.BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """Ask the trial for every free value of the space; returns all values, fixed ones included."""
    cfg = space.config
    params: dict[str, Any] = {}
    methods = cfg.methods
    params["method"] = (
        trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
    )
    spec = method_spec(params["method"])
    for model in space.model_names:
        for kind in (k for k in PER_MODEL if spec.uses(k)):
            for name in space.names(kind, model):
                params[name] = _value(trial, name, _setting(cfg, kind))
    for name in ("lambda", "t"):
        if spec.uses(name):
            params[name] = _value(trial, name, _setting(cfg, name))
    return params


def _layer_param(
    space: SearchSpace,
    params: dict[str, Any],
    kind: str,
    model: str,
    default: float,
    grid: float | None = None,
) -> LayerParam:
    def on_grid(value: float) -> float:
        # the sampler's steps carry float noise (0.42500000000000004): the recipe states, and
        # merges, the grid point itself, as a user would write it
        return round(round(value / grid) * grid, 9) if grid is not None else value

    def values(prefix: str) -> tuple[float, ...]:
        slots = [
            on_grid(float(params.get(f"{prefix}.{s}".rstrip("."), default))) for s in space.slots
        ]
        if space.config.granularity == "group":
            # one value per layer, each layer taking its group's value
            return tuple(slots[i // space.config.group_size] for i in range(space.num_layers))
        if grid is not None and len(slots) > 1:
            # the anchors' interpolation at every layer, on the grid: the stored values are the
            # applied ones
            over = LayerParam(default=tuple(slots))
            span = max(space.num_layers - 1, 1)
            return tuple(on_grid(over.at(i / span, "other")) for i in range(space.num_layers))
        return tuple(slots)

    if not space.config.split_attn_mlp:
        return LayerParam(default=values(f"{kind}.{model}"))
    return LayerParam(
        default=(on_grid(float(params.get(f"{kind}.{model}", default))),),
        attn=values(f"{kind}.{model}.attn"),
        mlp=values(f"{kind}.{model}.mlp"),
    )


def recipe_from_params(params: dict[str, Any], space: SearchSpace) -> MergeRecipe:
    """The merge recipe of a trial's params (values `suggest` returned, or a trial's stored params
    completed with the space's fixed values): a pure function, the same recipe every time."""
    full = suggest(optuna.trial.FixedTrial(dict(params)), space)  # adds the space's fixed values
    method = full["method"]
    entries = []
    for model, path in zip(space.model_names, space.model_paths):
        entries.append(
            ModelEntry(
                path=path,
                weight=_layer_param(space, full, "weight", model, 0.0),
                **{
                    kind: _layer_param(
                        space,
                        full,
                        kind,
                        model,
                        PARAMS[kind].default,
                        _step(space.config.methods, kind),
                    )
                    for kind in PER_MODEL[1:]
                },
            )
        )
    recipe = MergeRecipe(
        method=method,
        models=tuple(entries),
        base=space.base,
        lam=LayerParam.constant(full.get("lambda", 1.0)),
        t=LayerParam.constant(full.get("t", 0.5)),
        normalize=space.config.normalize,
        seed=space.config.seed,
        dtype=space.dtype,
        slerp_over=(
            space.config.slerp_over if method_spec(method).family is Family.NUSLERP else "tensor"
        ),
    )
    validate_recipe(recipe)
    return recipe


def baseline_params(space: SearchSpace) -> list[tuple[str, dict[str, Any]]]:
    """Reference recipes as params of this space: each fine-tune alone, the uniform average, plain
    task arithmetic, TIES and Model Stock, each only where the space can express it exactly."""
    cfg, k = space.config, len(space.model_names)
    allowed = set(cfg.methods)

    def settable(spec: float | tuple[float, float], value: float) -> bool:
        return isinstance(spec, tuple) or spec == value

    def can(method: str, weights: list[float], **values: float) -> bool:
        if method not in allowed:
            return False
        spec = method_spec(method)
        wanted = {"density": 1.0, "lambda": 1.0, **values}
        if spec.uses("weight") and not all(settable(cfg.weight, w) for w in weights):
            return False
        return all(settable(_setting(cfg, n), v) for n, v in wanted.items() if spec.uses(n))

    def params(method: str, weights: list[float], **values: float) -> dict[str, Any]:
        spec = method_spec(method)
        p: dict[str, Any] = {"method": method} if len(cfg.methods) > 1 else {}
        wanted = {"density": 1.0, "lambda": 1.0, **values}
        for model, w in zip(space.model_names, weights):
            if spec.uses("weight") and isinstance(cfg.weight, tuple):
                p.update({n: w for n in space.names("weight", model)})
            for kind in ("density", "gamma", "epsilon"):
                if spec.uses(kind) and kind in wanted and isinstance(_setting(cfg, kind), tuple):
                    p.update({n: wanted[kind] for n in space.names(kind, model)})
        if spec.uses("lambda") and isinstance(cfg.lam, tuple):
            p["lambda"] = wanted["lambda"]
        return p

    # with density 1 and lambda 1, each of these gives a one-hot weighted model itself
    alone_families = (Family.LINEAR, Family.TASK_VECTOR)
    alone_methods = [m.name for m in METHOD_TABLE.values() if m.family in alone_families]
    out: list[tuple[str, dict[str, Any]]] = []
    for i, model in enumerate(space.model_names):
        one = [1.0 if j == i else 0.0 for j in range(k)]
        method = next((m for m in alone_methods if can(m, one)), None)
        if method and k > 1:
            out.append((f"alone:{model}", params(method, one)))
        elif "slerp" in allowed and settable(cfg.t, float(i)) and k == 2:
            out.append(
                (
                    f"alone:{model}",
                    {**({"method": "slerp"} if len(cfg.methods) > 1 else {}), "t": float(i)},
                )
            )
    for method, weights in (
        ("linear", [1.0] * k),
        ("task_arithmetic", [1.0 / k] * k),
        ("dare_linear", [1.0 / k] * k),
    ):
        if can(method, weights):
            out.append(("uniform", params(method, weights)))
            break
    # plain task arithmetic and TIES: common defaults where free, the space's value where fixed
    lam = 0.5 if isinstance(cfg.lam, tuple) else cfg.lam
    if can("task_arithmetic", [1.0] * k, **{"lambda": lam}):
        out.append(("task_arithmetic", params("task_arithmetic", [1.0] * k, **{"lambda": lam})))
    density = 0.5 if isinstance(cfg.density, tuple) else cfg.density
    ties_lam = 1.0 if isinstance(cfg.lam, tuple) else cfg.lam
    if can("ties", [1.0] * k, density=density, **{"lambda": ties_lam}):
        out.append(("ties", params("ties", [1.0] * k, density=density, **{"lambda": ties_lam})))
    if "model_stock" in allowed and k >= 2 and len(cfg.methods) > 1:
        out.append(("model_stock", {"method": "model_stock"}))
    return [(name, p) for name, p in out if p]
