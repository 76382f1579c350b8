"""Merges of real tiny Llama and GPT-2 model sets, checked against plain reference code.

The reference (`reference_merge`) is written independently of merging/: it reads the safetensors
files, places tensors in the layer stack with its own rules (norms are neither attention nor MLP,
as with mergekit's `filter: self_attn` / `filter: mlp`), interpolates per-layer values itself and
computes each method with straightforward torch code. Only `methods.uniform` and `methods.draw_keys`
are shared, for the random draws of DARE and DELLA.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import (
    MergeError,
    ResidentMerger,
    export_merge,
    load_live_model,
    load_recipe,
    methods,
    recipe_from_dict,
)
from search.cli import main

# --- helpers --------------------------------------------------------------------------------------


def model_set(request, which: str):
    return request.getfixturevalue(f"{which}_set")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, single file or sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out = {}
        for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / file))
        return out
    return load_file(folder / "model.safetensors")


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def value_at(raw: Any, depth: float, kind: str) -> float:
    """A recipe value (number, list over depth, or {attn, mlp, default}) at one tensor's place."""
    if isinstance(raw, dict):
        raw = raw[kind] if kind in raw else raw.get("default", 1.0)
    if not isinstance(raw, list):
        return float(raw)
    if len(raw) == 1:
        return float(raw[0])
    anchors = torch.linspace(0.0, 1.0, len(raw), dtype=torch.float64)
    for i in range(len(raw) - 1):
        lo, hi = float(anchors[i]), float(anchors[i + 1])
        if lo <= depth <= hi:
            frac = (depth - lo) / (hi - lo)
            return float(raw[i]) * (1 - frac) + float(raw[i + 1]) * frac
    raise AssertionError(depth)


def place(name: str, num_layers: int) -> tuple[float, str]:
    """(depth, kind) of a tensor by the rules stated in the brief."""
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    if m is None:
        if any(k in name for k in ("embed_tokens", "wte", "wpe")):
            return 0.0, "other"
        assert any(k in name for k in ("lm_head", "model.norm", "ln_f")), name
        return 1.0, "other"
    depth = int(m.group(1)) / (num_layers - 1)
    if ".self_attn." in name or ".attn." in name:
        return depth, "attn"
    if ".mlp." in name:
        return depth, "mlp"
    return depth, "other"


def draws(shape, seed: int, k: int, name: str) -> torch.Tensor:
    n = 1
    for size in shape:
        n *= size
    return methods.uniform(torch.arange(n), torch.tensor(methods.draw_keys(seed, k, name))).reshape(
        shape
    )


def top_mask(tv: torch.Tensor, skip: int, count: int) -> torch.Tensor:
    """Keep positions skip .. skip+count-1 of |tv| sorted largest first, equal values by
    position."""
    order = torch.argsort(-tv.abs().reshape(-1), stable=True)
    mask = torch.zeros(tv.numel(), dtype=torch.bool)
    mask[order[skip : skip + count]] = True
    return mask.reshape(tv.shape)


def reference_merge(data: dict) -> dict[str, torch.Tensor]:
    """The recipe `data` (its YAML dict) computed tensor by tensor with plain torch code."""
    method = data["method"]
    params = data.get("parameters", {})
    entries = [m if isinstance(m, dict) else {"path": m} for m in data["models"]]
    models = [load_file(Path(m["path"]) / "model.safetensors") for m in entries]
    base_path = data.get("base") or entries[0]["path"]
    base = load_file(Path(base_path) / "model.safetensors")
    num_layers = 1 + max(
        int(m.group(1)) for n in base if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", n))
    )
    normalize = params.get(
        "normalize", {"linear": True, "ties": True, "della": True}.get(method, False)
    )
    rescale = params.get("rescale", True)
    seed = params.get("seed", 0)
    out = {}
    for name, b in base.items():
        depth, kind = place(name, num_layers)
        if method == "slerp":
            tt = value_at(params.get("t", 0.5), depth, kind)
            a, c = models[0][name].double().reshape(-1), models[1][name].double().reshape(-1)
            cos = float(torch.dot(a / a.norm(), c / c.norm()))
            if abs(cos) > 0.9995:
                res = (1 - tt) * a + tt * c
            else:
                th = torch.acos(torch.tensor(cos, dtype=torch.float64))
                res = (torch.sin((1 - tt) * th) * a + torch.sin(tt * th) * c) / torch.sin(th)
            out[name] = res.float().reshape(b.shape)
            continue
        w = [value_at(m.get("weight", 1.0), depth, kind) for m in entries]
        if method == "nuslerp":
            out[name] = reference_nuslerp(data, params, models, b, name, w)
            continue
        if method == "linear":
            total = sum(wk * m[name] for wk, m in zip(w, models))
            out[name] = total / sum(w) if normalize else total
            continue
        lam = value_at(params.get("lambda", 1.0), depth, kind)
        dens = [value_at(m.get("density", 1.0), depth, kind) for m in entries]
        tvs = [m[name] - b for m in models]
        if method == "model_stock":
            flat = [tv.double().reshape(-1) for tv in tvs]
            # mergekit's: the norms' product floored at 1e-6 (tiny task vectors of norm weights)
            cos = [
                float(flat[i] @ flat[j] / max(float(flat[i].norm() * flat[j].norm()), 1e-6))
                for i in range(len(flat))
                for j in range(i + 1, len(flat))
            ]
            c = sum(cos) / len(cos)
            ratio = len(flat) * c / (1 + (len(flat) - 1) * c)
            out[name] = b + ratio * sum(tvs) / len(tvs)
            continue
        if method == "ties":  # exactly the int(d*n) largest magnitudes, equal ones by position
            tvs = [
                tv if d >= 1 else torch.where(top_mask(tv, 0, max(1, int(d * tv.numel()))), tv, 0.0)
                for tv, d in zip(tvs, dens)
            ]
        elif method.startswith("breadcrumbs"):
            gammas = [value_at(m.get("gamma", 0.01), depth, kind) for m in entries]
            trimmed = []
            for tv, d, g in zip(tvs, dens, gammas):
                n = tv.numel()
                target, top = int(d * n), int(g * n)
                skip = n - max(0, n - target - top) - target
                trimmed.append(tv if d >= 1 else torch.where(top_mask(tv, skip, target), tv, 0.0))
            tvs = trimmed
        elif method.startswith("dare"):
            dropped = []
            for k, (tv, d) in enumerate(zip(tvs, dens)):
                p = float(torch.tensor(min(d, 1.0), dtype=torch.float32))
                keep = draws(tv.shape, seed, k, name) < p
                dropped.append(torch.where(keep, tv / p if rescale else tv, 0.0))
            tvs = dropped
        elif method.startswith("della"):
            epsilons = [value_at(m.get("epsilon", 0.15), depth, kind) for m in entries]
            dropped = []
            for k, (tv, d, e) in enumerate(zip(tvs, dens, epsilons)):
                if d >= 1:
                    dropped.append(tv)
                    continue
                rows = tv.reshape(-1, tv.shape[-1])
                ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).float()
                p = (
                    ((d - e) + 2 * e * ranks / max(rows.shape[1] - 1, 1))
                    .clamp(0, 1)
                    .reshape(tv.shape)
                )
                keep = draws(tv.shape, seed, k, name) < p
                dropped.append(torch.where(keep, tv / p if rescale else tv, 0.0))
            tvs = dropped
        weighted = [wk * tv for wk, tv in zip(w, tvs)]
        if method in ("ties", "dare_ties", "breadcrumbs_ties", "della"):
            sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
            agree = [(wt != 0) & (torch.sign(wt) == sign) for wt in weighted]
            mixed = sum(torch.where(a, wt, 0.0) for a, wt in zip(agree, weighted))
            if normalize:
                div = sum(a.float() * wk for a, wk in zip(agree, w))
                mixed = mixed / torch.where(div == 0, 1.0, div)
        else:
            mixed = sum(weighted)
            if normalize:
                mixed = mixed / sum(w)
        out[name] = b + lam * mixed
    return out


def reference_nuslerp(
    data: dict, params: dict, models: list[dict], b: torch.Tensor, name: str, w: list[float]
) -> torch.Tensor:
    """nuslerp in float64: of the task vectors given a base, else of the models; each vector pair
    (the whole tensor, each row or each column) on its own angle; a zero vector is orthogonal to
    everything (its unit vector is 0) and parallel pairs interpolate linearly."""
    tt = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
    x, y = (
        (models[0][name] - b, models[1][name] - b)
        if data.get("base")
        else (models[0][name], models[1][name])
    )
    x, y = x.double(), y.double()
    over = params.get("slerp_over", "tensor")
    if over == "tensor" or x.dim() == 1:
        vx, vy = x.reshape(1, -1), y.reshape(1, -1)
    elif over == "rows":
        vx, vy = x, y
    else:
        vx, vy = x.T, y.T
    ux = vx / vx.norm(dim=1, keepdim=True).clamp(min=1e-7)
    uy = vy / vy.norm(dim=1, keepdim=True).clamp(min=1e-7)
    cos = (ux * uy).sum(dim=1, keepdim=True).clamp(-1, 1)
    th = torch.acos(cos)
    parallel = (1 - cos * cos) <= 1e-16
    spherical = (torch.sin((1 - tt) * th) * vx + torch.sin(tt * th) * vy) / torch.where(
        parallel, 1.0, torch.sin(th)
    )
    res = torch.where(parallel, (1 - tt) * vx + tt * vy, spherical)
    res = res.T if over == "columns" and x.dim() > 1 else res
    res = res.reshape(x.shape)
    return (res + b.double()).float() if data.get("base") else res.float()


def assert_close_dicts(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], atol=1e-6, rtol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_equal_dicts(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    different = [n for n in expected if not torch.equal(actual[n], expected[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def live_state(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in names}


# --- recipes --------------------------------------------------------------------------------------


def recipe_data(case: str, ms, *, with_base: bool = False) -> dict:
    """A recipe dict for one case on a model set (3 fine-tunes for Llama, 2 for GPT-2)."""
    fts = [str(p) for p in ms.finetunes]
    base = str(ms.base)
    n = len(fts)
    if case == "linear":
        models = [{"path": f, "weight": w} for f, w in zip(fts, [[0.2, 0.8], 0.3, 0.5][:n])]
        data = {"method": "linear", "models": models}
    elif case == "linear_sum":
        models = [{"path": f, "weight": w} for f, w in zip(fts, [0.6, 0.7, 0.2][:n])]
        data = {"method": "linear", "models": models, "parameters": {"normalize": False}}
    elif case == "task_arithmetic":
        weights = [1.0, {"attn": 0.4, "mlp": [0.1, 0.9], "default": 0.6}, -0.3][:n]
        data = {
            "method": "task_arithmetic",
            "base": base,
            "models": [{"path": f, "weight": w} for f, w in zip(fts, weights)],
            "parameters": {"lambda": [0.5, 1.5]},
        }
    elif case == "ties":
        dens = [0.5, {"attn": 0.5, "mlp": [0.3, 0.7], "default": 0.6}, 0.8][:n]
        weights = [1.0, 0.5, 0.8][:n]
        data = {
            "method": "ties",
            "base": base,
            "models": [
                {"path": f, "weight": w, "density": d} for f, w, d in zip(fts, weights, dens)
            ],
            "parameters": {"lambda": 1.2},
        }
    elif case == "ties_full":  # density 1 everywhere, not normalized
        data = {
            "method": "ties",
            "base": base,
            "models": [{"path": f, "weight": 0.7} for f in fts],
            "parameters": {"normalize": False},
        }
    elif case == "dare_linear":
        dens = [0.6, 0.4, 0.9][:n]
        data = {
            "method": "dare_linear",
            "base": base,
            "models": [
                {"path": f, "weight": w, "density": d}
                for f, w, d in zip(fts, [0.5, 1.0, 0.7], dens)
            ],
            "parameters": {"seed": 11},
        }
    elif case == "dare_linear_full":  # density defaults to 1: nothing dropped
        data = {
            "method": "dare_linear",
            "base": base,
            "models": [{"path": f, "weight": 0.5} for f in fts],
        }
    elif case == "dare_ties":
        dens = [{"attn": 0.5, "default": [0.3, 0.8]}, 0.6, 0.5][:n]
        data = {
            "method": "dare_ties",
            "base": base,
            "models": [
                {"path": f, "weight": w, "density": d}
                for f, w, d in zip(fts, [1.0, 0.6, 0.9], dens)
            ],
            "parameters": {"seed": 3, "normalize": True, "lambda": 0.9},
        }
    elif case == "breadcrumbs_ties":
        data = {
            "method": "breadcrumbs_ties",
            "base": base,
            "models": [
                {"path": f, "weight": w, "density": d, "gamma": g}
                for f, w, d, g in zip(
                    fts, [1.0, 0.6, 0.8], [0.6, [0.3, 0.7], 0.5], [0.05, 0.01, 0.1]
                )
            ],
            "parameters": {"lambda": 1.1},
        }
    elif case == "della":
        data = {
            "method": "della",
            "base": base,
            "models": [
                {"path": f, "weight": w, "density": d, "epsilon": e}
                for f, w, d, e in zip(fts, [1.0, 0.7, 0.5], [0.6, 0.5, 0.4], [0.1, 0.2, 0.05])
            ],
            "parameters": {"seed": 5},
        }
    elif case == "model_stock":
        data = {"method": "model_stock", "base": base, "models": fts}
    elif case == "nuslerp":  # task vectors (a base), each row on its own angle, weights over depth
        data = {
            "method": "nuslerp",
            "base": base,
            "models": [
                {"path": fts[0], "weight": {"attn": [0.2, 0.9], "default": 0.5}},
                {"path": fts[1], "weight": 0.6},
            ],
            "parameters": {"slerp_over": "rows"},
        }
    elif case == "nuslerp_models":  # the models themselves (no base), whole tensors
        data = {
            "method": "nuslerp",
            "models": [{"path": fts[0], "weight": 1.0}, {"path": fts[1], "weight": 3.0}],
        }
    elif case == "slerp":
        data = {
            "method": "slerp",
            "models": fts[:2],
            "parameters": {"t": {"attn": [0.1, 0.9], "mlp": 0.7, "default": 0.4}},
        }
    else:
        raise AssertionError(case)
    if with_base:
        data["base"] = base
    return data


CASES = [
    "linear",
    "linear_sum",
    "task_arithmetic",
    "ties",
    "ties_full",
    "dare_linear",
    "dare_linear_full",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "model_stock",
    "slerp",
    "nuslerp",
    "nuslerp_models",
]
SETS = ["llama", "gpt2"]


@pytest.fixture(scope="module")
def live_models(llama_set, gpt2_set):
    """One live model and resident merger per set, as the search holds them."""
    out = {}
    for which, ms in (("llama", llama_set), ("gpt2", gpt2_set)):
        fts = [str(p) for p in ms.finetunes]
        out[which] = (ResidentMerger(str(ms.base), fts), load_live_model(str(ms.base)))
    return out


# --- (a) export equals the reference; (c) the folder loads ----------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", SETS)
def test_export_matches_reference(request, tmp_path, which, case):
    ms = model_set(request, which)
    data = recipe_data(case, ms)
    recipe = recipe_from_dict(data)
    out = export_merge(recipe, tmp_path / "merged", progress=False)
    assert_close_dicts(load_folder(out), reference_merge(data))


@pytest.mark.parametrize("case", ["ties", "dare_ties", "slerp"])
@pytest.mark.parametrize("which", SETS)
def test_exported_folder_loads_and_describes_itself(request, tmp_path, which, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ms = model_set(request, which)
    recipe = recipe_from_dict(recipe_data(case, ms))
    out = export_merge(recipe, tmp_path / "merged", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("w1 w2 w3 w4", return_tensors="pt")["input_ids"]
    assert ids.shape == (1, 4)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, 64)
    assert bool(torch.isfinite(logits).all())
    readme = (out / "README.md").read_text()
    assert case in readme
    assert load_recipe(out / "basin_recipe.yaml") == recipe
    assert not list(tmp_path.glob(".merged.partial-*"))


# --- (b) resident path is bit-identical to the export ---------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("which", SETS)
def test_resident_bit_identical_to_export(request, tmp_path, live_models, which, case):
    ms = model_set(request, which)
    recipe = recipe_from_dict(recipe_data(case, ms, with_base=True))
    if "slerp" in case:  # the merger holds all fine-tunes; slerp and nuslerp take two
        merger = ResidentMerger(str(ms.base), [str(p) for p in ms.finetunes[:2]])
        live = load_live_model(str(ms.base))
    else:
        merger, live = live_models[which]
    exported = load_folder(export_merge(recipe, tmp_path / "merged", progress=False))
    merger.apply(recipe, live)
    assert_equal_dicts(live_state(live, exported), exported)


def test_resident_nuslerp_reuses_its_angles_for_other_weights_and_keeps_them_apart_per_slerp_over(
    tmp_path, gpt2_set
):
    # the merger computes the angles between the two task vectors once per slerp_over; later
    # candidates with other weights, or another slerp_over, must still equal their exports
    merger = ResidentMerger(str(gpt2_set.base), [str(p) for p in gpt2_set.finetunes[:2]])
    live = load_live_model(str(gpt2_set.base))
    data = recipe_data("nuslerp", gpt2_set)
    for i, (w0, over) in enumerate(
        [(0.2, "rows"), (0.9, "rows"), (0.9, "columns"), (0.4, "tensor")]
    ):
        data["models"][0]["weight"] = w0
        data["parameters"]["slerp_over"] = over
        recipe = recipe_from_dict(data)
        merger.apply(recipe, live)
        exported = load_folder(export_merge(recipe, tmp_path / f"merged{i}", progress=False))
        assert_equal_dicts(live_state(live, exported), exported)
        assert_close_dicts(exported, reference_merge(data))
    assert sorted(merger._angles) == ["columns", "rows", "tensor"]


@pytest.mark.parametrize("case", ["linear", "slerp"])
def test_resident_refuses_a_recipe_without_its_base(llama_set, case):
    # linear and slerp recipes need no base (recipe.py), but the merger holds task vectors against
    # its base: another reference would round differently from the export, so it is refused.
    data = recipe_data(case, llama_set)
    assert "base" not in data
    recipe = recipe_from_dict(data)
    merger = ResidentMerger(str(llama_set.base), [m.path for m in recipe.models])
    live = load_live_model(str(llama_set.base))
    with pytest.raises(MergeError, match="set the recipe's base"):
        merger.apply(recipe, live)
    with_base = recipe_from_dict({**data, "base": str(llama_set.base)})
    merger.apply(with_base, live)  # the same recipe with the merger's base is accepted


def test_dare_seed_changes_weights(live_models, llama_set):
    merger, live = live_models["llama"]
    data = recipe_data("dare_ties", llama_set)
    name = "model.layers.0.mlp.up_proj.weight"
    merger.apply(recipe_from_dict(data), live)
    first = live.state_dict()[name].clone()
    merger.apply(recipe_from_dict(data), live)
    assert torch.equal(live.state_dict()[name], first)  # same seed, same weights
    data["parameters"]["seed"] = 12345
    merger.apply(recipe_from_dict(data), live)
    assert not torch.equal(live.state_dict()[name], first)


# --- (d) sharded export ---------------------------------------------------------------------------


def test_sharded_export_writes_index_and_loads(tmp_path, llama_set):
    from transformers import AutoModelForCausalLM

    recipe = recipe_from_dict(recipe_data("ties", llama_set))
    single = export_merge(recipe, tmp_path / "single", progress=False)
    sharded = export_merge(recipe, tmp_path / "sharded", max_shard_bytes=20_000, progress=False)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    assert all((sharded / f).is_file() for f in files)
    assert not (sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(load_file(single / "model.safetensors"))
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 4 for t in load_folder(single).values()
    )
    assert_equal_dicts(load_folder(sharded), load_folder(single))
    model = AutoModelForCausalLM.from_pretrained(sharded)
    state = model.state_dict()
    for name, value in load_folder(single).items():
        assert torch.equal(state[name], value), name


# --- (e) in place, and restore_base ---------------------------------------------------------------


def test_apply_writes_in_place_and_restore_base_is_exact(llama_set):
    fts = [str(p) for p in llama_set.finetunes]
    merger = ResidentMerger(str(llama_set.base), fts)
    live = load_live_model(str(llama_set.base))
    before = {n: (p, p.data_ptr()) for n, p in live.named_parameters()}
    for case in ("ties", "dare_ties", "task_arithmetic", "linear"):
        merger.apply(recipe_from_dict(recipe_data(case, llama_set, with_base=True)), live)
        after = dict(live.named_parameters())
        assert set(after) == set(before)
        for name, (param, ptr) in before.items():
            assert after[name] is param, name
            assert after[name].data_ptr() == ptr, name
    base = load_file(llama_set.base / "model.safetensors")
    assert not torch.equal(
        live.state_dict()["model.layers.0.mlp.up_proj.weight"],
        base["model.layers.0.mlp.up_proj.weight"],
    )
    merger.restore_base(live)
    assert_equal_dicts(live_state(live, base), base)
    assert all(after[n].data_ptr() == ptr for n, (_, ptr) in before.items())


# --- (f) GPT-2 tied embeddings --------------------------------------------------------------------


def test_gpt2_lm_head_stays_tied(tmp_path, gpt2_set):
    fts = [str(p) for p in gpt2_set.finetunes]
    merger = ResidentMerger(str(gpt2_set.base), fts)
    live = load_live_model(str(gpt2_set.base))
    assert live.lm_head.weight is live.transformer.wte.weight
    recipe = recipe_from_dict(recipe_data("ties", gpt2_set))
    merger.apply(recipe, live)
    assert live.lm_head.weight is live.transformer.wte.weight
    assert live.lm_head.weight.data_ptr() == live.transformer.wte.weight.data_ptr()
    exported = load_folder(export_merge(recipe, tmp_path / "merged", progress=False))
    assert "lm_head.weight" not in exported
    assert torch.equal(live.lm_head.weight, exported["transformer.wte.weight"])
    # the live model and the exported folder give the same logits
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(live(ids).logits, loaded(ids).logits)


# --- (g) the command line -------------------------------------------------------------------------


def test_cli_merge_writes_loadable_folder(tmp_path, llama_set):
    from transformers import AutoModelForCausalLM

    data = recipe_data("dare_ties", llama_set)
    path = write_recipe(tmp_path / "recipe.yaml", data)
    out = tmp_path / "out" / "merged"
    assert main(["merge", str(path), "--out", str(out), "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all())
    assert_close_dicts(load_folder(out), reference_merge(data))
    assert load_recipe(out / "basin_recipe.yaml") == load_recipe(path)


def test_cli_convert_round_trip(tmp_path, llama_set, capsys):
    fts = [str(p) for p in llama_set.finetunes]
    data = {
        "method": "ties",
        "base": str(llama_set.base),
        "models": [
            {
                "path": fts[0],
                "weight": [0.2, 0.5, 0.9],
                "density": {"attn": 0.4, "mlp": [0.3, 0.7], "default": 0.6},
            },
            {
                "path": fts[1],
                "weight": {"attn": [1.0, 0.5], "mlp": 0.25, "default": 0.75},
                "density": 0.5,
            },
        ],
        "parameters": {"lambda": [0.8, 1.2], "normalize": False},
        "dtype": "bfloat16",
    }
    src = write_recipe(tmp_path / "recipe.yaml", data)
    mk = tmp_path / "mergekit.yaml"
    back = tmp_path / "back.yaml"
    assert main(["convert", str(src), "--to", "mergekit", "--out", str(mk)]) == 0
    mk_data = yaml.safe_load(mk.read_text())
    assert mk_data["merge_method"] == "ties"
    assert mk_data["base_model"] == str(llama_set.base)
    assert {"filter": "attn", "value": [1.0, 0.5]} in mk_data["models"][1]["parameters"]["weight"]
    assert main(["convert", str(mk), "--to", "basin", "--out", str(back)]) == 0
    assert load_recipe(back) == load_recipe(src)
    # to standard output as well
    capsys.readouterr()
    assert main(["convert", str(mk), "--to", "basin"]) == 0
    assert recipe_from_dict(yaml.safe_load(capsys.readouterr().out)) == load_recipe(src)


def test_cli_merge_of_converted_mergekit_recipe_equals_original(tmp_path, gpt2_set):
    data = recipe_data("ties", gpt2_set)
    src = write_recipe(tmp_path / "recipe.yaml", data)
    assert main(["convert", str(src), "--to", "mergekit", "--out", str(tmp_path / "mk.yaml")]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "mk.yaml"),
                "--to",
                "basin",
                "--out",
                str(tmp_path / "back.yaml"),
            ]
        )
        == 0
    )
    assert (
        main(["merge", str(tmp_path / "back.yaml"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    )
    assert main(["merge", str(src), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert_equal_dicts(load_folder(tmp_path / "a"), load_folder(tmp_path / "b"))
    shutil.rmtree(tmp_path / "a")
