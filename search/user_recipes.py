"""The user's own recipes in a study (`baselines.recipes`): read, placed in the space, queued.

Each file (a basin recipe or a mergekit config) becomes one baseline trial named after the file.
A recipe that is a point of the space is queued as those params, so the sampler learns from its
score like from any other trial. One that is not (another method, a value out of range, values
over depth the granularity cannot express) is queued with the recipe itself stored on the trial
(attrs.RECIPE): the worker merges that recipe, the trial is scored and reported like the others,
and the sampler never sees it (search/sampler_view.py), since its params would say nothing true.

Every recipe is merged by the study's workers, which hold the study's base and fine-tunes in its
dtype: a recipe must list exactly those fine-tunes (matched by path, in any order) over that base.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from merging.catalog import PER_MODEL, Family, method_spec
from merging.errors import MergeError
from merging.recipe import LayerParam, MergeRecipe, read_yaml, recipe_from_dict, recipe_to_dict
from search import attrs
from search.config import ConfigError, StudyConfig
from search.space import (
    RANK_GRID,
    SearchSpace,
    _setting,
    _step,
    baseline_params,
    recipe_from_params,
    suggest,
)

TOLERANCE = 1e-6  # a recipe value and the space's rebuilt value are the same point within this


@dataclass(frozen=True)
class UserRecipe:
    """One of baselines.recipes, as the study's workers merge it."""

    name: str  # the baseline's name: the file's stem (or its file name: `_names`)
    path: str
    recipe: MergeRecipe  # the study's model paths, in its order, its base and dtype
    notes: tuple[str, ...]  # what reading it changed that a user should know
    params: dict[str, Any] | None  # its point of the space; None: outside it
    outside: str | None  # why it is not a point of the space


def _where(i: int, path: str) -> str:
    return f"baselines.recipes[{i}] ({path})"


def _read(path: str) -> tuple[MergeRecipe, list[str]]:
    from merging.mergekit_yaml import from_mergekit_with_notes

    data = read_yaml(path, "recipe file")
    if isinstance(data, dict) and "merge_method" in data:
        return from_mergekit_with_notes(data)
    return recipe_from_dict(data), []


def _absolute(path: str) -> str:
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _placed(recipe: MergeRecipe, where: str, space: SearchSpace) -> tuple[MergeRecipe, list[str]]:
    """The recipe over the study's model paths, in its order, against its base and in its dtype;
    ConfigError when the study's workers cannot merge it."""
    study = {_absolute(p): p for p in space.model_paths}
    mine = [_absolute(m.path) for m in recipe.models]
    if sorted(mine) != sorted(study) or len(set(mine)) != len(mine):
        raise ConfigError(
            f"{where} merges {', '.join(m.path for m in recipe.models)}; the study's fine-tunes "
            f"are {', '.join(space.model_paths)}. The study's workers hold exactly these: list "
            "each of them once in the recipe (a weight of 0 leaves one out), or remove the recipe"
        )
    notes = []
    base = recipe.base
    if base is None:
        if method_spec(recipe.method).family is Family.NUSLERP:
            raise ConfigError(
                f"{where}: nuslerp without a base interpolates the models themselves; the "
                "study's workers hold task vectors against models.base and merge nuslerp on "
                f"those: set base: {space.base} in the recipe (a different merge), or remove it"
            )
        base = space.base  # the same merge: only the rounding of the reference differs
    elif _absolute(base) != _absolute(space.base):
        raise ConfigError(
            f"{where} merges against base {base}; the study's base is {space.base}, against "
            "which its workers hold every task vector: give the recipe that base, or remove it"
        )
    if recipe.dtype != space.dtype:
        notes.append(
            f"{where}: merged in {space.dtype} like every candidate of the study (the recipe "
            f"says {recipe.dtype})"
        )
    order = {a: i for i, a in enumerate(study)}
    models = sorted(recipe.models, key=lambda m: order[_absolute(m.path)])
    models = [replace(m, path=study[_absolute(m.path)]) for m in models]
    placed = replace(recipe, models=tuple(models), base=space.base, dtype=space.dtype)
    return placed, notes


def _depths(space: SearchSpace) -> list[float]:
    span = max(space.num_layers - 1, 1)
    return [i / span for i in range(space.num_layers)]


def _slot_depth(space: SearchSpace, slot: str) -> float:
    """The relative depth whose value a slot takes: its anchor, or its group's first layer."""
    span = max(space.num_layers - 1, 1)
    if slot.startswith("a"):
        return int(slot[1:]) / max(len(space.slots) - 1, 1)
    if slot.startswith("g"):
        return int(slot[1:]) * space.config.group_size / span
    return 0.0


def _candidate_params(recipe: MergeRecipe, space: SearchSpace) -> dict[str, Any]:
    """The params the recipe would be if it is a point of the space: each slot's value read off
    the recipe at that slot's depth and part."""
    spec = method_spec(recipe.method)
    params: dict[str, Any] = {"method": recipe.method}
    for model, entry in zip(space.model_names, recipe.models):
        for kind in (k for k in PER_MODEL if spec.uses(k)):
            param: LayerParam = getattr(entry, kind)
            for name in space.names(kind, model):
                # <kind>.<model>[.<attn|mlp>][.<slot>]; model names hold no dots
                rest = name[len(f"{kind}.{model}") :].lstrip(".")
                part, slot = "other", rest
                if rest.split(".")[0] in ("attn", "mlp"):
                    part, _, slot = rest.partition(".")
                params[name] = param.at(_slot_depth(space, slot), part)
    for name, param in (("lambda", recipe.lam), ("t", recipe.t)):
        if spec.uses(name):
            params[name] = param.at(0.0, "other")
    return params


def _free(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Only the values the sampler draws (the space's fixed ones are filled in from the config),
    those on a grid rounded to it."""
    trial = optuna.trial.FixedTrial(dict(params))
    with warnings.catch_warnings():  # a value off the range or grid: found and said below
        warnings.simplefilter("ignore")
        suggest(trial, space)
    out = {}
    for name in trial.params:
        value = params[name]
        if name != "method" and _step(space.config.methods, name.split(".")[0]) is not None:
            value = round(round(value / RANK_GRID) * RANK_GRID, 9)
        out[name] = value
    return out


def _first_difference(recipe: MergeRecipe, rebuilt: MergeRecipe, space: SearchSpace) -> str | None:
    """Where the space's nearest point differs from the recipe, in words; None: the same merge."""
    spec = method_spec(recipe.method)
    depths = _depths(space)
    parts = ("other", "attn", "mlp")  # a value the same for every part is named without one
    for model, mine, theirs in zip(space.model_names, recipe.models, rebuilt.models):
        for kind in (k for k in PER_MODEL if spec.uses(k)):
            for i, d in enumerate(depths):
                for part in parts:
                    a, b = getattr(mine, kind).at(d, part), getattr(theirs, kind).at(d, part)
                    if abs(a - b) > TOLERANCE:
                        return _why(space, recipe.method, kind, f"{kind} of {model}", a, i, part)
    for name, a_param, b_param in (("lambda", recipe.lam, rebuilt.lam), ("t", recipe.t, rebuilt.t)):
        if spec.uses(name):
            for i, d in enumerate(depths):
                a, b = a_param.at(d, "other"), b_param.at(d, "other")
                if abs(a - b) > TOLERANCE:
                    return _why(space, recipe.method, name, name, a, i, "other")
    if recipe.normalize_ != rebuilt.normalize_:
        return f"it sets normalize: {recipe.normalize_}, the space {rebuilt.normalize_}"
    if recipe.rescale_ != rebuilt.rescale_:
        return f"it sets rescale: {recipe.rescale_}, the space merges with {rebuilt.rescale_}"
    if spec.random and recipe.seed != rebuilt.seed:
        return f"its seed is {recipe.seed}, the space's (space.seed) {rebuilt.seed}"
    if spec.family is Family.NUSLERP and recipe.slerp_over != rebuilt.slerp_over:
        return f"it sets slerp_over: {recipe.slerp_over}, space.slerp_over is {rebuilt.slerp_over}"
    return None


def _why(
    space: SearchSpace, method: str, kind: str, what: str, value: float, layer: int, part: str
) -> str:
    cfg = space.config
    setting = _setting(cfg, kind)
    at = f"{what} is {value:g} at layer {layer}" + ("" if part == "other" else f" ({part})")
    if not isinstance(setting, tuple):
        return f"{at}; the space fixes {kind} at {setting:g}"
    lo, hi = setting
    if not lo - TOLERANCE <= value <= hi + TOLERANCE:
        return f"{at}, outside space.{kind} [{lo:g}, {hi:g}]"
    how = {
        "model": "one value per model (space.granularity: model)",
        "group": f"one value per {cfg.group_size} layers (space.granularity: group)",
        "anchors": f"{len(space.slots)} anchors over depth (space.granularity: anchors)",
    }[cfg.granularity]
    if _step(cfg.methods, kind) is not None:
        how += f", on the {RANK_GRID:g} grid the space searches,"
    split = "" if cfg.split_attn_mlp or part == "other" else "; attention and MLP differ"
    return f"{at}, which {how} cannot express{split}"


def place_in_space(recipe: MergeRecipe, space: SearchSpace) -> tuple[dict | None, str | None]:
    """The recipe's params, when it is a point of the space (their recipe merges the same); else
    None and why not."""
    cfg = space.config
    if recipe.method not in cfg.methods:
        known = ", ".join(cfg.methods)
        return None, f"its method '{recipe.method}' is not among space.methods ({known})"
    params = _candidate_params(recipe, space)
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            return None, f"{name} is {value}"
    free = _free(params, space)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rebuilt = recipe_from_params(free, space)
    except (MergeError, ValueError) as exc:
        return None, f"its values are no point of the space: {exc}"
    if (why := _first_difference(recipe, rebuilt, space)) is not None:
        return None, why
    for name, value in free.items():
        if name == "method":
            continue
        kind = name.split(".")[0]
        lo, hi = _setting(cfg, kind)  # drawn: a range
        if not lo - TOLERANCE <= value <= hi + TOLERANCE:
            return None, f"{name} is {value:g}, outside space.{kind} [{lo:g}, {hi:g}]"
        free[name] = min(max(value, lo), hi)  # a hair outside the range is its bound
    return free, None


def _names(paths: list[str], taken: set[str]) -> list[str]:
    """Each file's stem; its file name where stems repeat or a built-in baseline has the stem."""
    stems = [re.sub(r"\.(ya?ml)$", "", Path(p).name) for p in paths]
    return [Path(p).name if stems.count(s) > 1 or s in taken else s for p, s in zip(paths, stems)]


def read_user_recipes(config: StudyConfig, space: SearchSpace) -> list[UserRecipe]:
    """Every file of baselines.recipes, read and placed (ConfigError naming the file otherwise)."""
    paths = list(config.baselines.recipes)
    out = []
    taken = {name for name, _ in baseline_params(space)}
    for i, (path, name) in enumerate(zip(paths, _names(paths, taken))):
        where = _where(i, path)
        try:
            recipe, notes = _read(path)
        except MergeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        notes = [f"{where}: {n}" for n in notes]
        placed, more = _placed(recipe, where, space)
        params, outside = place_in_space(placed, space)
        out.append(UserRecipe(name, path, placed, tuple(notes + more), params, outside))
    return out


def describe(user: UserRecipe) -> str:
    """One line on what the study does with the recipe."""
    if user.params is not None:
        return (
            f"{user.path}: a point of the search space, scored as baseline '{user.name}'; it "
            "seeds the search"
        )
    return (
        f"{user.path}: scored and reported as baseline '{user.name}', but it cannot seed the "
        f"search: {user.outside}"
    )


def enqueue_user_recipes(study: optuna.Study, users: list[UserRecipe]) -> None:
    """Queue each recipe once (by its name: one already queued or run is left as it is)."""
    have = {
        t.user_attrs.get(attrs.BASELINE)
        for t in study.get_trials(deepcopy=False)
        if attrs.RECIPE_FILE in t.user_attrs
    }
    for user in users:
        if user.name in have:
            continue
        named = {attrs.BASELINE: user.name, attrs.RECIPE_FILE: user.path}
        if user.params is not None:
            study.enqueue_trial(user.params, user_attrs=named)
        else:
            study.enqueue_trial(
                {},
                user_attrs={
                    **named,
                    attrs.RECIPE: recipe_to_dict(user.recipe),
                    attrs.OUTSIDE: user.outside,
                },
            )


def fixed_recipe(trial: optuna.trial.FrozenTrial | optuna.trial.Trial) -> dict | None:
    """The recipe a trial merges when it is not rebuilt from params (a recipe outside the space)."""
    return trial.user_attrs.get(attrs.RECIPE)
