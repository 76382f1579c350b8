"""Converting recipes to mergekit's YAML and back, so recipes move between the two tools.

A conversion is lossless or refused with a message that says what would change. What cannot be
carried over, and is refused:
- methods that drop entries at random (DARE, DELLA): mergekit draws from its own random state and
  rescales survivors to match the L1 norm, so the weights would differ (`approximate=True` writes or
  reads them anyway, saying so);
- values over depth whose first and last values differ, without the names of the tensors outside
  the layer stack: mergekit gives the final norm and the head a list's first value, basin the last
  (they sit at depth 1); given those names, the conversion writes a filter for each;
- filters narrower than all attention / all MLP tensors, and parameters basin does not read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from merging.catalog import METHOD_TABLE, PER_MODEL, Family, method_spec
from merging.errors import MergeError
from merging.layers import at_top
from merging.recipe import MergeRecipe, recipe_from_dict, recipe_to_dict

# mergekit filters are substrings of tensor names; these name every attention (MLP) tensor of the
# supported families, as basin's attn (mlp) do. A narrower one (q_proj, up_proj) has no basin form.
_ATTN_FILTERS = ("self_attn", "attn", "attention")
_MLP_FILTERS = ("mlp", "ffn", "feed_forward")
_SHARED = ("lambda", "normalize", "rescale", "t")
_IGNORED = {"int8_mask": "a memory option of mergekit's that leaves the merged weights as they are"}
_BY_MERGEKIT_NAME = {m.mergekit: m for m in METHOD_TABLE.values() if m.mergekit}


def _varies(values: Any) -> bool:
    return isinstance(values, list) and len(values) > 1 and values[0] != values[-1]


def _param_to_mergekit(value: Any, where: str, top_names: Sequence[str] | None) -> Any:
    """basin's value, values over depth, or {attn, mlp, default} form -> mergekit's setting."""
    default = value.get("default") if isinstance(value, Mapping) else value
    top: list[dict[str, Any]] = []
    if _varies(default):
        if top_names is None:
            raise MergeError(
                f"{where} varies over depth ({default}): mergekit gives the final norm and the "
                f"head a list's first value ({default[0]}), basin its last ({default[-1]}), "
                "so the conversion would change those tensors. Convert with the models at "
                "hand (a local base) so basin can name them in filters, or give a list whose "
                "first and last values are equal"
            )
        top = [{"filter": name, "value": default[-1]} for name in top_names]
    if not isinstance(value, Mapping):
        return top + [{"value": value}] if top else value
    items = [{"filter": key, "value": value[key]} for key in ("attn", "mlp") if key in value]
    return top + items + [{"value": value["default"]}]


def _param_from_mergekit(value: Any, where: str) -> Any:
    if not (isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value)):
        if _varies(value):
            raise _top_refusal(where, value, None)
        return value
    out: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for item in value:
        if "value" not in item:
            raise MergeError(f"{where}: each filtered entry needs a 'value', got {dict(item)}")
        flt = item.get("filter")
        if flt is None or flt == "*":
            out.setdefault("default", item["value"])
        elif flt in _ATTN_FILTERS:
            out.setdefault("attn", item["value"])
        elif flt in _MLP_FILTERS:
            out.setdefault("mlp", item["value"])
        elif at_top(str(flt)):
            top.setdefault(str(flt), item["value"])
        else:
            raise MergeError(
                f"{where}: mergekit filter '{flt}' has no basin equivalent: "
                f"basin gives values to all attention tensors ({' / '.join(_ATTN_FILTERS)}) "
                f"or all MLP tensors ({' / '.join(_MLP_FILTERS)}); converting it would apply "
                "the value to other tensors too"
            )
    default = out.get("default")
    last = default[-1] if isinstance(default, list) else default
    if any(v != last for v in top.values()) or (_varies(default) and not top):
        raise _top_refusal(where, default, top)
    if set(out) == {"default"}:
        return out["default"]
    return out


def _top_refusal(where: str, values: Any, top: Mapping[str, Any] | None) -> MergeError:
    given = f" (its filters give {dict(top)})" if top else ""
    return MergeError(
        f"{where}: mergekit gives the final norm and the head the first value of {values}{given}; "
        "basin gives the tensors outside the layer stack the value at depth 1 (a list's last), so "
        "the conversion would change those tensors. Add filters naming them (e.g. lm_head) with "
        "the list's last value, or give a list whose first and last values are equal"
    )


def _random_refusal(method: str, direction: str) -> MergeError:
    return MergeError(
        f"{method} drops entries at random: mergekit draws from its own random state and rescales "
        "survivors to match their L1 norm (basin divides by the keep probability, with draws fixed "
        "by the recipe's seed), so the converted recipe would merge different weights. Pass "
        f"--approximate to convert {direction} anyway"
    )


def to_mergekit(
    recipe: MergeRecipe, *, approximate: bool = False, top_names: Sequence[str] | None = None
) -> str:
    """mergekit YAML text for this recipe. `top_names`: the names of the tensors outside the layer
    stack at its top (final norm, head), needed for values that vary over depth."""
    spec = method_spec(recipe.method)
    if spec.random and not approximate:
        raise _random_refusal(recipe.method, "to mergekit")
    ours = recipe_to_dict(recipe)
    params = dict(ours["parameters"])
    seed = params.pop("seed")
    per_model = [p for p in spec.params if p in PER_MODEL]
    models = []
    for i, m in enumerate(ours["models"]):
        if spec.family is Family.SLERP or not per_model:
            models.append({"model": m["path"]})
            continue
        p = {key: _param_to_mergekit(m[key], f"models[{i}].{key}", top_names) for key in per_model}
        models.append({"model": m["path"], "parameters": p})
    out: dict[str, Any] = {"merge_method": spec.mergekit}
    if spec.family is Family.SLERP:
        out["base_model"] = recipe.models[0].path
    elif recipe.base is not None:
        out["base_model"] = recipe.base
    out["models"] = models
    shared = {
        k: v
        for k, v in params.items()
        if k in _SHARED and (spec.uses(k) or k in ("normalize", "rescale"))
    }
    if spec.rescale is None:
        shared.pop("rescale", None)
    if spec.family is not Family.TASK_VECTOR:
        shared.pop("lambda", None)
    if spec.family is Family.NUSLERP:
        shared.pop("normalize", None)  # nuslerp reads no normalize, in either tool
        if recipe.slerp_over != "tensor":
            shared.update(nuslerp_flatten=False, nuslerp_row_wise=recipe.slerp_over == "columns")
    out["parameters"] = {
        k: _param_to_mergekit(v, f"parameters.{k}", top_names) for k, v in shared.items()
    }
    out["dtype"] = recipe.dtype
    header = "# converted from a basin recipe"
    if spec.random:
        header += (
            f" (approximate: basin's seed {seed} fixes its draws; mergekit draws its own and "
            "rescales survivors by the L1 norm, so the weights differ)"
        )
    elif spec.magnitude_ranked:
        header += (
            " (entries of equal magnitude at the trim boundary: basin keeps the first by position)"
        )
    return header + "\n" + yaml.safe_dump(out, sort_keys=False)


def from_mergekit(data: Any, *, approximate: bool = False) -> MergeRecipe:
    """A basin recipe from mergekit's YAML (the `models:` form; `slices:` is not supported)."""
    if not isinstance(data, Mapping) or "merge_method" not in data:
        raise MergeError(
            "not a mergekit config: 'merge_method' is missing; add it, or, if the file is a basin "
            "recipe already, use it as it is"
        )
    if "slices" in data:
        raise MergeError(
            "mergekit 'slices' configs are not supported; list the models under 'models:' instead"
        )
    name = str(data["merge_method"])
    # an unknown name gets did-you-mean over basin's names
    spec = _BY_MERGEKIT_NAME.get(name) or method_spec(name)
    if spec.random and not approximate:
        raise _random_refusal(name, "from mergekit")
    params = dict(data.get("parameters") or {})
    models_raw = list(data.get("models") or [])
    for i, m in enumerate(models_raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("model"), str):
            raise MergeError(f"models[{i}]: expected {{model: PATH, parameters: ...}}, got {m!r}")
    base = data.get("base_model")
    per_model = [p for p in spec.params if p in PER_MODEL]
    if spec.family is Family.SLERP:
        if base is None:
            raise MergeError("a mergekit slerp config needs 'base_model': the model at t=0")
        others = [m for m in models_raw if m.get("model") != base]
        ours: dict[str, Any] = {
            "method": spec.name,
            "models": [{"path": base}] + [{"path": m["model"]} for m in others],
        }
    else:
        models = []
        for i, m in enumerate(models_raw):
            # mergekit lists the base among the models at times; it is not a task vector
            if m.get("model") == base:
                continue
            p = m.get("parameters") or {}
            if unknown := sorted(set(p) - set(per_model)):
                raise MergeError(
                    f"models[{i}].parameters: {', '.join(unknown)} has no basin equivalent for "
                    f"{name}; basin reads {', '.join(per_model) or 'none'} per model for it, and "
                    "dropping the rest would merge something else than this file says"
                )
            entry = {"path": m["model"]}
            for key in per_model:
                if key in p:
                    entry[key] = _param_from_mergekit(p[key], f"models[{i}].parameters.{key}")
            models.append(entry)
        ours = {"method": spec.name, "models": models}
        if base is not None:
            ours["base"] = base
    known = [
        k
        for k in _SHARED
        if spec.uses(k) or k == "normalize" or (k == "rescale" and spec.rescale is not None)
    ]
    if spec.rescale is None and "rescale" in params and spec.family is Family.TASK_VECTOR:
        if params["rescale"] is True:
            raise MergeError(
                f"parameters.rescale: mergekit's rescale for {name} scales the kept "
                f"entries to match their L1 norm; basin's {spec.name} keeps them as they "
                "are. Remove it to merge without"
            )
        params.pop("rescale")  # false: mergekit's default, and basin's only way
    if spec.family is Family.NUSLERP:
        flags = {
            key: params.pop(key, default)
            for key, default in (("nuslerp_flatten", True), ("nuslerp_row_wise", False))
        }
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise MergeError(f"parameters.{key}: expected true or false, got {value!r}")
        over = (
            "tensor"
            if flags["nuslerp_flatten"]
            else ("columns" if flags["nuslerp_row_wise"] else "rows")
        )
        known = ["slerp_over"]
        params["slerp_over"] = over
    if spec.family is Family.MODEL_STOCK:
        known = []
        if params.get("filter_wise"):
            raise MergeError(
                "parameters.filter_wise: basin's model_stock takes one ratio per tensor; a ratio "
                "per row has no basin equivalent"
            )
        params.pop("filter_wise", None)
    if unknown := sorted(set(params) - set(known) - set(_IGNORED)):
        raise MergeError(
            f"parameters: {', '.join(unknown)} has no basin equivalent for {name}; "
            f"basin reads {', '.join(known) or 'none'} (and ignores {', '.join(_IGNORED)}: "
            f"{_IGNORED['int8_mask']}), and dropping the rest would merge "
            "something else than this file says"
        )
    ours["parameters"] = {
        k: _param_from_mergekit(v, f"parameters.{k}") for k, v in params.items() if k in known
    }
    if "dtype" in data:
        ours["dtype"] = data["dtype"]
    return recipe_from_dict(ours)
