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

From mergekit (`from_mergekit_with_notes`, which also returns notes on what it dropped):
- the top-level `parameters:` are every model's default, as in mergekit (a model's own filters
  first, then the top-level entries);
- weight / density where mergekit's method does not use them (density on linear or
  task_arithmetic, weight on model_stock or slerp) and rescale on task_arithmetic change nothing
  there: dropped with a note; `name` is a label (a note); `out_dtype` is carried when it equals
  `dtype`; `tokenizer_source`, `tokenizer`, `chat_template`, `modules` and unknown keys are refused;
- mergekit's filters are substrings of tensor names: with the reference model's names (read from a
  local folder) every tensor's value in mergekit is compared with the converted recipe's, and any
  difference is refused by tensor name; without them (hub ids, and no `names` given) a filter is
  refused;
- `slices:` taking the same layers of the same models, covering the stack in order, are read as
  the `models:` form (mergekit restarts a list in each slice: values become values over depth
  where basin can express them); other slices (passthrough, frankenmerges) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from merging.catalog import METHOD_TABLE, PARAMS, PER_MODEL, Family, Keep, method_spec
from merging.errors import MergeError
from merging.layers import KINDS, build_layer_map
from merging.recipe import (
    LayerParam,
    MergeRecipe,
    _parse_param,
    recipe_from_dict,
    recipe_to_dict,
)

# mergekit filters are substrings of tensor names; these name every attention (MLP) tensor of the
# supported families, as basin's attn (mlp) do. A narrower one (q_proj, up_proj) has no basin form.
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
    """A setting no filter decides (a number, a list over depth, or entries whose first is a
    catch-all: mergekit reaches no entry after it) in basin's form, read without the models."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        if "value" not in value[0]:
            raise MergeError(f"{where}: each filtered entry needs a 'value', got {dict(value[0])}")
        value = value[0]["value"]
    if _varies(value):
        raise _top_refusal(where, value)
    return value


def _top_refusal(where: str, values: Any) -> MergeError:
    return MergeError(
        f"{where}: mergekit gives the final norm and the head the first value of {values}; "
        "basin gives the tensors outside the layer stack the value at depth 1 (a list's last), so "
        "the conversion would change those tensors. Give a list whose first and last values are "
        "equal, or add filters naming them (e.g. lm_head, model.norm) with the list's last value "
        "and convert with the models at hand as local folders (filters are checked against their "
        "tensor names)"
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
    adapters = False
    for i, m in enumerate(ours["models"]):
        path = m["path"]
        if _is_adapter(path):  # mergekit names a LoRA adapter as base+adapter: the same merge
            path, adapters = f"{recipe.base}+{path}", True
        if spec.family is Family.SLERP or not per_model:
            models.append({"model": path})
            continue
        p = {key: _param_to_mergekit(m[key], f"models[{i}].{key}", top_names) for key in per_model}
        models.append({"model": path, "parameters": p})
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
    if adapters:
        header += "\n# LoRA adapters are written base+adapter: run mergekit-yaml with"
        header += " --lora-merge-cache DIR"
    return header + "\n" + yaml.safe_dump(out, sort_keys=False)


def _is_adapter(path: str) -> bool:
    """Whether a model path is a local LoRA adapter folder (merging/lora.py)."""
    from merging.lora import is_adapter_folder

    folder = Path(path).expanduser()
    return folder.is_dir() and is_adapter_folder(folder)


def _adapter_path(model: str, base: Any, where: str) -> str:
    """mergekit's `model+adapter` (an adapter applied to a model) as basin's fine-tune path: the
    adapter, when it is applied to the base (basin merges an adapter into the base)."""
    if "+" not in model:
        return model
    applied_to, adapter = model.split("+", 1)
    if applied_to != base:
        raise MergeError(
            f"{where}: '{model}' applies the LoRA adapter {adapter} to {applied_to}, which is not "
            f"the base_model ({base}); basin reads an adapter as a fine-tune of the base only: "
            f"merge it into {applied_to} with peft first and give that folder"
        )
    return adapter


# --- from mergekit --------------------------------------------------------------------------------

# mergekit's top-level keys besides the ones converted below, and why each is refused
_REFUSED_KEYS = {
    "tokenizer_source": "basin keeps the base's vocabulary; a tokenizer union is not supported. "
    "Remove it to merge with the base's tokenizer",
    "tokenizer": "basin keeps the base's vocabulary; a tokenizer union is not supported. "
    "Remove it to merge with the base's tokenizer",
    "chat_template": "basin copies the reference model's tokenizer files as they are and a recipe "
    "holds no chat template. Remove it, and set the template in the exported "
    "tokenizer_config.json",
    "modules": "per-module configs (models of several modules) are not supported; list the "
    "models under 'models:'",
}
_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype")
_FRANKEN = (
    "slices that take different layer ranges build a different architecture (a "
    "passthrough/frankenmerge); basin merges models of one shape"
)
_TOL = 1e-9


@dataclass(frozen=True)
class _Tensor:
    name: str
    layer: int | None
    kind: str
    depth: float  # basin's place
    t: float  # mergekit's position in the `models:` form: i / (L - 1) in the stack, 0 outside


@dataclass(frozen=True)
class _Names:
    """The tensors of the reference model, as basin places them and mergekit's filters see them."""

    source: str
    num_layers: int
    tensors: tuple[_Tensor, ...]

    @classmethod
    def of(cls, names: Sequence[str], source: str) -> _Names:
        lm = build_layer_map(names)
        n = lm.num_layers
        tensors = tuple(
            _Tensor(
                name,
                p.layer,
                p.kind,
                p.depth,
                0.0 if p.layer is None else (p.layer / (n - 1) if n > 1 else 1.0),
            )
            for name, p in sorted(lm.places.items())
        )
        return cls(source, n, tensors)


def _local_names(path: Any) -> list[str] | None:
    """The tensor names of a model that is a local folder (its safetensors headers), else None."""
    if not isinstance(path, str) or not Path(path).expanduser().is_dir():
        return None
    from merging.checkpoint import Checkpoint

    return list(Checkpoint(path).names)


def _catch_all(entry: Mapping) -> bool:
    return entry.get("filter") is None or entry.get("filter") == "*"


def _entries(setting: Any) -> list[dict[str, Any]] | None:
    """A mergekit setting as its {filter, value} entries (the first that matches a tensor gives its
    value); None when unset."""
    if setting is None or (isinstance(setting, list) and not setting):
        return None
    if isinstance(setting, Mapping):
        return [dict(setting)]
    if isinstance(setting, list) and all(isinstance(v, Mapping) for v in setting):
        return [dict(v) for v in setting]
    return [{"value": setting}]


def _combined(*settings: Any) -> Any:
    """Settings in mergekit's order of precedence (a model's own, then its slice's, then the
    top-level `parameters:`) as one: mergekit falls to the next scope only where no entry of a
    scope matches, so the scopes' entries one after the other say the same."""
    out: list[dict[str, Any]] = []
    for setting in settings:
        entries = _entries(setting)
        if entries is None:
            continue
        out.extend(entries)
        if any(_catch_all(e) for e in entries):
            break
    if not out:
        return None
    if len(out) == 1 and _catch_all(out[0]) and "value" in out[0]:
        return out[0]["value"]
    return out


def _mk_value(setting: Any, name: str, t: float) -> float | None:
    """What mergekit gives the tensor `name` at position t (filters as substrings, the first
    matching entry wins, lists interpolated linearly); None when no entry matches."""
    for entry in _entries(setting) or []:
        flt = entry.get("filter")
        if _catch_all(entry) or str(flt) in name:
            value = entry.get("value")
            if isinstance(value, list):
                if not value:
                    return None
                pos = t * (len(value) - 1)
                lo = int(pos)
                hi = min(len(value) - 1, lo + 1)
                return (1 - (pos - lo)) * float(value[lo]) + (pos - lo) * float(value[hi])
            return None if value is None else float(value)
    return None


def _has_filter(setting: Any) -> bool:
    """Whether a filter decides some tensor's value: an entry with one before any catch-all."""
    entries = _entries(setting) or []
    return bool(entries) and not _catch_all(entries[0])


def _name_refusal(where: str, flt: Any) -> MergeError:
    return MergeError(
        f"{where}: mergekit filter '{flt}' is a substring of tensor names, so what it selects "
        "depends on the architecture (on GPT-2 'self_attn' selects nothing; on DeepSeek it also "
        "selects layer norms), and the models are not local folders basin can read the names "
        "from. Convert with the models at hand as local folders, so basin can check the filter "
        "against their tensor names"
    )


def _proposal(setting: Any, names: _Names, where: str) -> dict[str, Any]:
    """basin's attn/mlp/default form for a `models:` setting: a filter goes to the class of the
    tensors it selects (checked tensor by tensor afterwards)."""
    out: dict[str, Any] = {}
    for entry in _entries(setting) or []:
        if "value" not in entry:
            raise MergeError(f"{where}: each filtered entry needs a 'value', got {entry}")
        if _catch_all(entry):
            out.setdefault("default", entry["value"])
            break
        flt = str(entry["filter"])
        hit = [x for x in names.tensors if flt in x.name]
        if not hit:
            attn = [x.name for x in names.tensors if x.kind == "attn"][:2]
            raise MergeError(
                f"{where}: mergekit filter '{flt}' selects no tensor of {names.source}, so "
                "mergekit gives its value to nothing (this model's attention tensors are named "
                f"like {', '.join(attn)}). Remove the entry, or write a filter these names contain"
            )
        kinds = {x.kind for x in hit} - {"other"}
        if len(kinds) == 1:
            out.setdefault(kinds.pop(), entry["value"])
    return out


def _anchors(values: list[float]) -> list[float]:
    """The fewest anchors, evenly spread over the layers, that give each layer its value."""
    n = len(values)
    for k in range(1, n + 1):
        if k > 1 and (n - 1) % (k - 1):
            continue
        cand = values[:: (n - 1) // (k - 1)] if k > 1 else values[:1]
        lp = LayerParam(default=tuple(cand))
        if all(
            abs(lp.at(i / (n - 1) if n > 1 else 0.0, "other") - v) <= _TOL * (1 + abs(v))
            for i, v in enumerate(values)
        ):
            return cand
    return values


def _fit(names: _Names, value_of: Any) -> dict[str, Any]:
    """basin's attn/mlp/default form read off mergekit's value of every tensor (checked
    afterwards): one value per layer and class, as few anchors as give them."""
    per: dict[str, list[list[float]]] = {k: [[] for _ in range(names.num_layers)] for k in KINDS}
    outside: dict[float, list[float]] = {0.0: [], 1.0: []}
    for x in names.tensors:
        v = value_of(x)
        if v is None:
            continue
        if x.layer is None:
            outside[x.depth].append(v)
        else:
            per[x.kind][x.layer].append(v)

    def column(kind: str) -> list[float] | None:
        cells = per[kind]
        return [c[0] for c in cells] if all(cells) else None

    default = column("other")
    if default is None:
        ends = [outside[0.0][:1] or outside[1.0][:1], outside[1.0][:1] or outside[0.0][:1]]
        default = [e[0] for e in ends if e] or [0.0]
    out: dict[str, Any] = {"default": _anchors(default)}
    for kind in ("attn", "mlp"):
        col = column(kind)
        if col is not None and col != default:
            out[kind] = _anchors(col)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def _checked(
    where: str, names: _Names, value_of: Any, proposal: dict[str, Any], fallback: float | None
) -> Any:
    """The proposal in basin's form, if it gives every tensor of the model mergekit's value;
    else a refusal naming the tensors that would change."""
    if not proposal:
        proposal = {"default": fallback} if fallback is not None else {}
    value = proposal["default"] if set(proposal) == {"default"} else proposal
    param = _parse_param(value, where, required_default=fallback)
    bad = []
    for x in names.tensors:
        theirs = value_of(x)
        theirs = fallback if theirs is None else theirs
        ours = param.at(x.depth, x.kind)
        if theirs is None or abs(theirs - ours) > _TOL * (1 + abs(theirs)):
            bad.append(f"{x.name} (mergekit {theirs}, basin {ours:g})")
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise MergeError(
            f"{where}: converted, {len(bad)} tensor(s) of {names.source} would get other values "
            f"than mergekit gives them: {shown}. basin gives one value (or values over depth) to "
            "all attention tensors, one to all MLP tensors and one to the rest, the final norm "
            "and head taking a list's last value; change the filters so that each selects a "
            "whole class of this model's tensors"
        )
    return param.to_yaml()


def _check_per_model(
    p: Mapping, where: str, per_model: Sequence[str], spec: Any, name: str, notes: list[str]
) -> dict[str, Any]:
    """A model's (or slice's) parameters that basin reads; what mergekit ignores is dropped with a
    note, anything else basin cannot read is refused."""
    kept = {}
    for key in p:
        if key in per_model:
            kept[key] = p[key]
        elif key in ("weight", "density"):
            notes.append(_ignored_note(f"{where}.{key}", name))
        else:
            raise MergeError(
                f"{where}: {key} has no basin equivalent for {name}; basin reads "
                f"{', '.join(per_model) or 'none'} per model for it, and dropping the rest would "
                "merge something else than this file says"
            )
    return kept


def _ignored_note(where: str, name: str) -> str:
    return f"{where} dropped: mergekit's {name} does not use it, so it changes nothing"


def _slice_layout(data: Mapping, names: _Names | None) -> list[dict[str, Any]]:
    """The slices of a `slices:` config as [{start, end, models: {path: params}, parameters}];
    refused unless every slice takes the same layers of the same models, in order, covering the
    stack."""
    slices = data["slices"]
    if not isinstance(slices, list) or not slices:
        raise MergeError(
            "an empty 'slices' list is not supported; list the models under 'models:' instead"
        )
    out: list[dict[str, Any]] = []
    for i, sl in enumerate(slices):
        where = f"slices[{i}]"
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list):
            raise MergeError(f"{where}: expected {{sources: [{{model, layer_range}}, ...]}}")
        if extra := sorted(set(sl) - {"sources", "parameters", "base_model"}):
            raise MergeError(
                f"{where}: {', '.join(extra)} has no basin equivalent; remove it to merge without"
            )
        if sl.get("base_model") not in (None, data.get("base_model")):
            raise MergeError(
                f"{where}.base_model differs from the top-level base_model: one base per merge "
                "in basin; give each slice the same base"
            )
        ranges, models = set(), {}
        for j, src in enumerate(sl["sources"]):
            lr = src.get("layer_range") if isinstance(src, Mapping) else None
            if not (
                isinstance(src, Mapping)
                and isinstance(src.get("model"), str)
                and isinstance(lr, list)
                and len(lr) == 2
                and all(isinstance(v, int) for v in lr)
            ):
                raise MergeError(
                    f"{where}.sources[{j}]: expected {{model: PATH, layer_range: [START, END]}}, "
                    f"got {src!r}"
                )
            ranges.add(tuple(lr))
            models[src["model"]] = dict(src.get("parameters") or {})
        if len(ranges) != 1:
            raise MergeError(f"{where}: {_FRANKEN}")
        ((start, end),) = ranges
        if out and list(models) != list(out[0]["models"]):
            raise MergeError(f"{where}: its sources differ from the first slice's; {_FRANKEN}")
        if start != (out[-1]["end"] if out else 0) or end <= start:
            raise MergeError(f"{where}: layers [{start}, {end}] do not follow on; {_FRANKEN}")
        params = sl.get("parameters") or {}
        out.append({"start": start, "end": end, "models": models, "parameters": dict(params)})
    if names is None:
        raise MergeError(
            "converting 'slices' needs the models as local folders: basin checks that the slices "
            "cover the model's layers and where each value falls from the base's tensor names. "
            "Convert with the models at hand, or list the models under 'models:'"
        )
    if out[-1]["end"] != names.num_layers:
        raise MergeError(
            f"the slices cover layers 0 to {out[-1]['end']} of the {names.num_layers} of "
            f"{names.source}; {_FRANKEN}"
        )
    return out


def from_mergekit(
    data: Any, *, approximate: bool = False, names: Sequence[str] | None = None
) -> MergeRecipe:
    """A basin recipe from mergekit's YAML, exactly as `basin convert` reads it (see
    `from_mergekit_with_notes`), the notes dropped."""
    return from_mergekit_with_notes(data, approximate=approximate, names=names)[0]


def from_mergekit_with_notes(
    data: Any,
    *,
    approximate: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[MergeRecipe, list[str]]:
    """A basin recipe from mergekit's YAML (`models:` or `slices:` over the whole stack), and notes
    on what was dropped because it changes nothing.

    `names`: the tensor names of the reference model (the base, else the first model); read from
    it when it is a local folder. With them every filter and list is checked tensor by tensor
    against what mergekit gives; without them, filters are refused (their meaning
    depends on the names) and slices."""
    if not isinstance(data, Mapping) or "merge_method" not in data:
        raise MergeError(
            "not a mergekit config: 'merge_method' is missing; add it, or, if the file is a basin "
            "recipe already, use it as it is"
        )
    notes: list[str] = []
    for key in data:
        if key in _REFUSED_KEYS and data[key] is not None:  # null: unset, as in mergekit
            raise MergeError(f"{key}: {_REFUSED_KEYS[key]}")
        if key == "name":
            notes.append(f"name ({data['name']!r}) dropped: it is only a label")
        elif key not in _TOP_KEYS:
            raise MergeError(
                f"'{key}' is not a mergekit key basin converts; remove it, or convert by hand "
                f"(basin converts {', '.join(_TOP_KEYS)} and name)"
            )
    if "slices" in data and data.get("models"):
        raise MergeError("give either 'models' or 'slices', not both (as mergekit requires)")
    base = data.get("base_model")
    ref = base
    if ref is None:  # the first model: its first source, or its first entry
        first: Any = data.get("slices") if "slices" in data else data.get("models")
        if "slices" in data and isinstance(first, list) and first:
            first = first[0].get("sources") if isinstance(first[0], Mapping) else None
        if isinstance(first, list) and first and isinstance(first[0], Mapping):
            ref = first[0].get("model")
    if names is None and (local := _local_names(ref)) is not None:
        names = local
    tensors = _Names.of(names, str(ref)) if names is not None else None
    layout = _slice_layout(data, tensors) if "slices" in data else None
    name = str(data["merge_method"])
    # an unknown name gets did-you-mean over basin's names
    spec = _BY_MERGEKIT_NAME.get(name) or method_spec(name)
    if spec.random and not approximate:
        raise _random_refusal(name, "from mergekit")
    params = dict(data.get("parameters") or {})
    if layout is not None:
        models_raw = [{"model": m} for m in layout[0]["models"]]
    else:
        models_raw = list(data.get("models") or [])
    for i, m in enumerate(models_raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("model"), str):
            raise MergeError(f"models[{i}]: expected {{model: PATH, parameters: ...}}, got {m!r}")
    if layout is None:
        models_raw = [
            {**m, "model": _adapter_path(m["model"], base, f"models[{i}].model")}
            for i, m in enumerate(models_raw)
        ]
    elif any("+" in m["model"] for m in models_raw):
        raise MergeError(
            "slices name a LoRA adapter (model+adapter); write the same merge in the models: form, "
            "which basin converts with adapters"
        )
    per_model = [p for p in spec.params if p in PER_MODEL]
    # the top-level `parameters:` are every model's default in mergekit
    top_defaults = {k: params.pop(k) for k in list(params) if k in per_model}
    for key in [k for k in params if k in ("weight", "density")]:
        params.pop(key)
        notes.append(_ignored_note(f"parameters.{key}", name))
    slice_params: list[dict[str, Any]] = []
    if layout is not None:
        shared_numeric = [k for k in ("lambda", "t") if spec.uses(k)]
        for i, sl in enumerate(layout):
            if once := sorted(set(sl["parameters"]) & {*_SHARED, *_IGNORED} - set(shared_numeric)):
                raise MergeError(
                    f"slices[{i}].parameters: {', '.join(once)} is set once per merge in basin; "
                    "give it under the top-level 'parameters:' instead"
                )
            kept = _check_per_model(
                {k: v for k, v in sl["parameters"].items() if k not in shared_numeric},
                f"slices[{i}].parameters",
                per_model,
                spec,
                name,
                notes,
            )
            kept.update({k: v for k, v in sl["parameters"].items() if k in shared_numeric})
            slice_params.append(kept)
            for path, p in sl["models"].items():
                sl["models"][path] = _check_per_model(
                    p, f"slices[{i}].sources[{path}].parameters", per_model, spec, name, notes
                )

    def where_is(x: _Tensor) -> tuple[int, float]:
        """The slice a tensor is read from, and mergekit's t there."""
        assert layout is not None
        if x.layer is None:  # before the stack: the first slice; after it: the last; t = 0
            return (0 if x.depth == 0.0 else len(layout) - 1), 0.0
        for k, sl in enumerate(layout):
            if sl["start"] <= x.layer < sl["end"]:
                n = sl["end"] - sl["start"]
                return k, (x.layer - sl["start"]) / (n - 1) if n > 1 else 1.0
        raise AssertionError(x)

    def convert(key: str, where: str, own: Any, model: str | None) -> Any:
        """One parameter in basin's form; own: the model's own setting (`models:` form)."""
        fallback = PARAMS[key].default
        if layout is None:
            setting = _combined(own, top_defaults.get(key) if model else params.get(key))
            if setting is None:
                return None
            if tensors is None:
                if _has_filter(setting):
                    first = next(e for e in _entries(setting) or [] if not _catch_all(e))
                    raise _name_refusal(where, first.get("filter"))
                return _param_from_mergekit(setting, where)
            return _checked(
                where,
                tensors,
                lambda x: _mk_value(setting, x.name, x.t),
                _proposal(setting, tensors, where),
                fallback,
            )
        top = top_defaults.get(key) if model else params.get(key)
        per_slice = [
            _combined(
                sl["models"][model].get(key) if model else None, slice_params[k].get(key), top
            )
            for k, sl in enumerate(layout)
        ]
        if all(s is None for s in per_slice):
            return None

        def value_of(x: _Tensor) -> float | None:
            k, t = where_is(x)
            value = _mk_value(per_slice[k], x.name, t)
            return fallback if value is None else value

        assert tensors is not None
        return _checked(where, tensors, value_of, _fit(tensors, value_of), fallback)

    if spec.family is Family.SLERP:
        if base is None:
            raise MergeError("a mergekit slerp config needs 'base_model': the model at t=0")
        for i, m in enumerate(models_raw):
            _check_per_model(
                m.get("parameters") or {}, f"models[{i}].parameters", (), spec, name, notes
            )
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
            p = _check_per_model(
                m.get("parameters") or {}, f"models[{i}].parameters", per_model, spec, name, notes
            )
            entry = {"path": m["model"]}
            for key in per_model:
                value = convert(key, f"models[{i}].parameters.{key}", p.get(key), m["model"])
                if value is not None:
                    entry[key] = value
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
        if spec.keep is Keep.ALL:  # no sparsification in mergekit: nothing to rescale
            params.pop("rescale")
            notes.append(_ignored_note("parameters.rescale", name))
        elif params["rescale"] is True:
            raise MergeError(
                f"parameters.rescale: mergekit's rescale for {name} scales the kept "
                f"entries to match their L1 norm; basin's {spec.name} keeps them as they "
                "are. Remove it to merge without"
            )
        else:
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
    shared = {}
    for k in known:
        if k in ("lambda", "t"):
            value = convert(k, f"parameters.{k}", None, None)
            if value is not None:
                shared[k] = value
        elif k in params:
            shared[k] = params[k]
    ours["parameters"] = shared
    if "dtype" in data:
        ours["dtype"] = data["dtype"]
    if data.get("out_dtype") is not None:
        out_dtype = data["out_dtype"]
        if data.get("dtype", out_dtype) != out_dtype:
            if not approximate:
                raise MergeError(
                    f"out_dtype: mergekit merges in dtype {data['dtype']} and writes "
                    f"{out_dtype}; basin merges and writes one dtype, so the rounding would "
                    f"differ. Set dtype and out_dtype to the same, or pass --approximate to merge "
                    f"in {out_dtype}"
                )
            notes.append(
                f"approximate: merged in out_dtype {out_dtype}; mergekit merges in "
                f"{data['dtype']} and rounds once at the end"
            )
        ours["dtype"] = out_dtype
    return recipe_from_dict(ours), notes
