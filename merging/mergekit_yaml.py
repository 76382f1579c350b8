"""Converting recipes to mergekit's YAML and back, so recipes move between the two tools."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from merging.errors import MergeError
from merging.recipe import USES_DENSITY, MergeRecipe, recipe_from_dict, recipe_to_dict

# mergekit filters are substrings of tensor names; these name every attention (MLP) tensor of the
# supported families, as basin's attn (mlp) do. A narrower one (q_proj, up_proj) has no basin form.
_ATTN_FILTERS = ("self_attn", "attn", "attention")
_MLP_FILTERS = ("mlp", "ffn", "feed_forward")
_PARAMETERS = ("lambda", "normalize", "rescale", "t")
_IGNORED = {"int8_mask": "a memory option of mergekit's that leaves the merged weights as they are"}
_MODEL_PARAMETERS = ("weight", "density")


def _param_to_mergekit(value: Any) -> Any:
    """basin's {attn, mlp, default} form -> mergekit's list of {filter, value}."""
    if not isinstance(value, Mapping):
        return value
    items = [{"filter": key, "value": value[key]} for key in ("attn", "mlp") if key in value]
    return items + [{"value": value["default"]}]


def _param_from_mergekit(value: Any, where: str) -> Any:
    if not (isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)):
        return value
    out: dict[str, Any] = {}
    for item in value:
        if "value" not in item:
            raise MergeError(f"{where}: each filtered entry needs a 'value', got {dict(item)}")
        flt = item.get("filter")
        if flt is None:
            out["default"] = item["value"]
        elif flt in _ATTN_FILTERS:
            out["attn"] = item["value"]
        elif flt in _MLP_FILTERS:
            out["mlp"] = item["value"]
        else:
            raise MergeError(f"{where}: mergekit filter '{flt}' has no basin equivalent: basin gives values to all "
                             f"attention tensors ({' / '.join(_ATTN_FILTERS)}) or all MLP tensors "
                             f"({' / '.join(_MLP_FILTERS)}); converting it would apply the value to other tensors too")
    return out


def to_mergekit(recipe: MergeRecipe) -> str:
    """mergekit YAML text for this recipe (DARE draws differ: mergekit has no seed)."""
    ours = recipe_to_dict(recipe)
    params = dict(ours["parameters"])
    seed = params.pop("seed")
    models = []
    for m in ours["models"]:
        p = {"weight": _param_to_mergekit(m["weight"])}
        if recipe.method in USES_DENSITY:
            p["density"] = _param_to_mergekit(m["density"])
        models.append({"model": m["path"], "parameters": p} if recipe.method != "slerp" else {"model": m["path"]})
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.method == "slerp":
        out["base_model"] = recipe.models[0].path
    elif recipe.base is not None:
        out["base_model"] = recipe.base
    out["models"] = models
    out["parameters"] = {k: _param_to_mergekit(v) for k, v in params.items()}
    out["dtype"] = recipe.dtype
    header = "# converted from a basin recipe"
    if recipe.method.startswith("dare"):
        header += f" (seed {seed}: mergekit draws DARE masks from its own random state, so weights differ)"
    return header + "\n" + yaml.safe_dump(out, sort_keys=False)


def from_mergekit(data: Any) -> MergeRecipe:
    """A basin recipe from mergekit's YAML (the `models:` form; `slices:` is not supported)."""
    if not isinstance(data, Mapping) or "merge_method" not in data:
        raise MergeError("not a mergekit config: 'merge_method' is missing; add it, or, if the file is a basin "
                         "recipe already, use it as it is")
    if "slices" in data:
        raise MergeError("mergekit 'slices' configs are not supported; list the models under 'models:' instead")
    method = data["merge_method"]
    params = dict(data.get("parameters") or {})
    models_raw = list(data.get("models") or [])
    for i, m in enumerate(models_raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("model"), str):
            raise MergeError(f"models[{i}]: expected {{model: PATH, parameters: ...}}, got {m!r}")
    base = data.get("base_model")
    if method == "slerp" and base is None:
        raise MergeError("a mergekit slerp config needs 'base_model': the model at t=0")
    if method == "slerp":
        others = [m for m in models_raw if m.get("model") != base]
        models = [{"path": base}] + [{"path": m["model"]} for m in others]
        ours: dict[str, Any] = {"method": method, "models": models}
    else:
        models = []
        for i, m in enumerate(models_raw):
            if m.get("model") == base:
                continue  # mergekit lists the base among the models at times; it is not a task vector
            p = m.get("parameters") or {}
            if unknown := sorted(set(p) - set(_MODEL_PARAMETERS)):
                raise MergeError(f"models[{i}].parameters: {', '.join(unknown)} has no basin equivalent for "
                                 f"{method}; basin reads {', '.join(_MODEL_PARAMETERS)} per model, and dropping the "
                                 "rest would merge something else than this file says")
            entry = {"path": m["model"]}
            for key in ("weight", "density"):
                if key in p:
                    entry[key] = _param_from_mergekit(p[key], f"models[{i}].parameters.{key}")
            models.append(entry)
        ours = {"method": method, "models": models}
        if base is not None:
            ours["base"] = base
    if unknown := sorted(set(params) - set(_PARAMETERS) - set(_IGNORED)):
        raise MergeError(f"parameters: {', '.join(unknown)} has no basin equivalent; basin reads "
                         f"{', '.join(_PARAMETERS)} (and ignores {', '.join(_IGNORED)}: {_IGNORED['int8_mask']}), "
                         "and dropping the rest would merge something else than this file says")
    ours["parameters"] = {k: _param_from_mergekit(v, f"parameters.{k}") for k, v in params.items() if k in _PARAMETERS}
    if "dtype" in data:
        ours["dtype"] = data["dtype"]
    return recipe_from_dict(ours)
