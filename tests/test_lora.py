"""PEFT LoRA adapters as fine-tunes: made with peft on tiny real models, merged by basin, compared
with peft's own merge (merge_and_unload) saved and merged as a full fine-tune."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import Checkpoint, MergeError, ResidentMerger, export_merge, recipe_from_dict
from merging.catalog import METHOD_TABLE
from merging.lora import LoraFactors, expand
from merging.resident import load_live_model
from tests.support.merges import live_merge, method_recipe
from tests.support.runs import BASIN
from tests.support.tiny import build_model, save_tokenizer

LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def make_adapter(
    base: Path, out: Path, merged: Path | None = None, *, seed: int = 0, **config
) -> Path:
    """Save a LoRA adapter of `base` made by peft, its factors all random (a trained adapter's
    B is not zero), and with `merged`, peft's merge of it into the base as a full model folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out)
    if merged is not None:
        peft_model.merge_and_unload().save_pretrained(merged)
        save_tokenizer(merged)
    return out


@pytest.fixture(scope="module")
def llama_lora(llama_set, tmp_path_factory):
    """An adapter of the Llama base (rank and alpha patterns, an embedding) and peft's merge."""
    root = tmp_path_factory.mktemp("llama_lora")
    adapter = make_adapter(
        llama_set.base,
        root / "adapter",
        root / "merged",
        r=4,
        lora_alpha=8,
        target_modules=LLAMA_TARGETS,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    return adapter, root / "merged"


@pytest.fixture(scope="module")
def llama_mergers(llama_set, llama_lora):
    """Resident mergers over (full fine-tune, adapter) and (full fine-tune, peft's merge)."""
    adapter, merged = llama_lora
    ft = str(llama_set.finetunes[0])
    base = str(llama_set.base)
    return (
        ResidentMerger(base, [ft, str(adapter)]),
        ResidentMerger(base, [ft, str(merged)]),
        load_live_model(base),
    )


@pytest.mark.parametrize("method", list(METHOD_TABLE))
def test_every_method_merges_an_adapter_as_peft_s_merge_of_it(
    method, llama_set, llama_lora, llama_mergers, tmp_path
):
    adapter, merged = llama_lora
    with_lora, with_full, live = llama_mergers
    ft = llama_set.finetunes[0]
    lora_recipe = method_recipe(method, llama_set.base, [ft, adapter])
    full_recipe = method_recipe(method, llama_set.base, [ft, merged])
    got = live_merge(with_lora, live, lora_recipe)
    want = live_merge(with_full, live, full_recipe)
    worst = max(float((got[n] - want[n]).abs().max()) for n in got)
    print(f"{method}: max abs difference to peft's merge {worst:.2e}")
    assert worst < 1e-5
    # the export streams the adapter from disk and gives the resident merge's bits
    exported = load_file(
        export_merge(recipe_from_dict(lora_recipe), tmp_path / "m", progress=False)
        / "model.safetensors"
    )
    assert all(torch.equal(exported[n], got[n]) for n in got)


def test_an_adapter_is_held_factored_and_untouched_tensors_hold_nothing(
    llama_set, llama_lora, llama_mergers
):
    adapter, merged = llama_lora
    with_lora, with_full, _ = llama_mergers
    lora_bytes, full_bytes = with_lora.held_bytes(1), with_full.held_bytes(1)
    print(f"task vector held: LoRA {lora_bytes} bytes, full fine-tune {full_bytes} bytes")
    ck = Checkpoint(str(adapter))
    assert lora_bytes == 4 * ck.adapter.held_numel()
    assert full_bytes == with_full.held_bytes(0) > 5 * lora_bytes
    held = with_lora.deltas[1]
    # only the adapted tensors, as factors: 2 layers x (q, v, down) and the embedding
    assert len(held) == 7 and all(isinstance(h, LoraFactors) for h in held.values())
    down = held["model.layers.0.mlp.down_proj.weight"]
    assert down.a.shape == (2, 64) and down.scale == 8 / 2  # rank_pattern
    assert held["model.layers.1.self_attn.v_proj.weight"].scale == 3 / 4  # alpha_pattern
    zero = with_lora.task_vector(1, "model.layers.0.self_attn.k_proj.weight")
    assert zero.stride() == (0, 0) and not zero.any()  # a view of one zero
    # expanded: what peft's merge added to the base
    base = load_file(llama_set.base / "model.safetensors")
    full = load_file(merged / "model.safetensors")
    for name, factors in held.items():
        assert torch.allclose(expand(factors, torch.float32), full[name] - base[name], atol=1e-6)


def test_gpt2_conv1d_adapter_with_rslora_merges_as_peft_s_merge(gpt2_set, tmp_path):
    adapter = make_adapter(
        gpt2_set.base,
        tmp_path / "adapter",
        tmp_path / "merged",
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["c_attn", "c_fc", "c_proj"],
    )
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"]
    held = ResidentMerger(str(gpt2_set.base), [str(adapter)]).deltas[0]
    qkv = held["transformer.h.0.attn.c_attn.weight"]
    assert qkv.transpose and qkv.shape == (32, 96) and qkv.scale == 16 / 2  # alpha / sqrt(r)
    ft = gpt2_set.finetunes[0]
    for method in ("task_arithmetic", "ties", "nuslerp"):
        got = load_file(
            export_merge(
                recipe_from_dict(method_recipe(method, gpt2_set.base, [ft, adapter])),
                tmp_path / f"{method}-lora",
                progress=False,
            )
            / "model.safetensors"
        )
        want = load_file(
            export_merge(
                recipe_from_dict(method_recipe(method, gpt2_set.base, [ft, tmp_path / "merged"])),
                tmp_path / f"{method}-full",
                progress=False,
            )
            / "model.safetensors"
        )
        worst = max(float((got[n] - want[n]).abs().max()) for n in got)
        print(f"gpt2 {method}: max abs difference to peft's merge {worst:.2e}")
        assert worst < 1e-5


def test_basin_merge_takes_an_adapter_and_the_merge_loads(llama_set, llama_lora, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM

    from search.cli import main

    adapter, _ = llama_lora
    recipe = method_recipe("task_arithmetic", llama_set.base, [adapter])
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any(torch.isnan(p).any() for p in model.parameters())
    # a recipe without a base cannot place an adapter's task vector
    recipe = {"method": "linear", "models": [{"path": str(adapter), "weight": 1.0}]}
    with pytest.raises(MergeError, match=r"models\[0\].*LoRA adapter.*set base"):
        export_merge(recipe_from_dict(recipe), tmp_path / "no", progress=False)


def study_data(base: Path, finetunes: list[Path], root: Path, **sections) -> dict:
    """A study config over the tiny tasks, on `base` and `finetunes`."""
    from tests.support.tiny import build_tasks

    tasks = build_tasks(root / "tasks", n_items=12)
    return {
        "study": {"name": "lora", "output_dir": str(root / "study")},
        "models": {"base": str(base), "finetunes": [str(p) for p in finetunes]},
        "space": {"methods": ["ties", "task_arithmetic"], "weight": [0.0, 1.0]},
        "evaluator": {
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
        },
        "objectives": {"items": [{"task": "toy_next", "metric": "acc"}]},
        "workers": {"count": 1},
        **sections,
    }


def test_validate_and_memory_plan_count_an_adapter_factored(llama_set, llama_lora, tmp_path):
    import yaml
    from safetensors import safe_open

    from search.cli import main
    from search.config import load_config
    from search.memory import memory_plan

    adapter, _ = llama_lora
    data = study_data(llama_set.base, [llama_set.finetunes[0], adapter], tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 0
    plan = dict(memory_plan(load_config(str(tmp_path / "c.yaml"))).fixed)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if "lora_" in k]  # noqa: SIM118 - a file handle, not a dict
        factors = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in keys)
    assert plan["LoRA task vectors, factored (1 adapters)"] == 4 * factors
    assert plan["task vectors (1 fine-tunes)"] == plan["base"] > 5 * 4 * factors


# --- refusals -------------------------------------------------------------------------------------


def checked(base: Path, adapter: Path) -> None:
    from merging import check_compatible

    check_compatible({str(base): Checkpoint(str(base)), str(adapter): Checkpoint(str(adapter))})


@pytest.mark.parametrize(
    "config, message",
    [
        ({"use_dora": True}, r"uses DoRA \(use_dora: true\), which basin does not merge; merge it"),
        ({"modules_to_save": ["lm_head"]}, r"holds full copies of other modules \(modules_to_save"),
        ({"bias": "all"}, r"trains biases \(bias: all\)"),
        ({"lora_bias": True}, r"holds trained LoRA biases \(lora_bias: true\)"),
    ],
)
def test_what_a_factored_task_vector_cannot_carry_is_refused_by_name(
    llama_set, tmp_path, config, message
):
    adapter = make_adapter(
        llama_set.base, tmp_path / "a", r=2, target_modules=["q_proj", "o_proj"], **config
    )
    with pytest.raises(MergeError, match=rf"adapter {adapter} {message}"):
        checked(llama_set.base, adapter)


def test_an_adapter_initialised_by_rewriting_the_base_is_refused(llama_set, llama_lora, tmp_path):
    adapter = tmp_path / "pissa"
    shutil.copytree(llama_lora[0], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "pissa"}))
    with pytest.raises(MergeError, match="initialised with pissa.*path_initial_model_for_weight"):
        checked(llama_set.base, adapter)


def test_a_setting_this_peft_does_not_know_is_refused(llama_set, llama_lora, tmp_path):
    adapter = tmp_path / "newer"
    shutil.copytree(llama_lora[0], adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_future_lora": True}))
    with pytest.raises(MergeError, match=r"sets use_future_lora, which this peft \(0\.\d+"):
        checked(llama_set.base, adapter)


def test_an_adapter_of_another_model_is_refused(llama_set, gpt2_set, tmp_path):
    gpt2_adapter = make_adapter(gpt2_set.base, tmp_path / "g", r=2, target_modules=["c_attn"])
    with pytest.raises(
        MergeError, match=r"adapts module 'transformer.h.0.attn.c_attn', but the base"
    ):
        checked(llama_set.base, gpt2_adapter)
    wider = build_model(tmp_path / "wide", hidden=48)
    adapter = make_adapter(wider, tmp_path / "w", r=2, target_modules=["q_proj"])
    with pytest.raises(
        MergeError, match=r"by a 48x48 update, but the base .* has it as \(32, 32\)"
    ):
        checked(llama_set.base, adapter)
    with pytest.raises(MergeError, match="is a LoRA adapter, not a model"):
        checked(adapter, wider)


def test_a_folder_that_is_neither_model_nor_adapter_says_what_is_expected(
    llama_set, tmp_path, capsys
):
    import yaml

    from search.cli import main

    (tmp_path / "empty").mkdir()
    data = study_data(llama_set.base, [tmp_path / "empty"], tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(tmp_path / "c.yaml")]) != 0
    assert "or a PEFT LoRA adapter folder (adapter_config.json and" in capsys.readouterr().err


def test_a_refusal_in_a_recipe_names_the_model_s_place(llama_set, tmp_path):
    dora = make_adapter(
        llama_set.base, tmp_path / "d", r=2, target_modules=["q_proj"], use_dora=True
    )
    recipe = method_recipe("task_arithmetic", llama_set.base, [llama_set.finetunes[0], dora])
    with pytest.raises(MergeError, match=rf"^models\[1\]: adapter {dora} uses DoRA"):
        export_merge(recipe_from_dict(recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def renamed(adapter: Path, out: Path, rename) -> Path:
    """A copy of `adapter` whose tensors are renamed (or dropped: None) by `rename(key, tensor)`."""
    from safetensors.torch import save_file

    shutil.copytree(adapter, out)
    tensors = load_file(adapter / "adapter_model.safetensors")
    new = {}
    for key, t in tensors.items():
        for k, v in rename(key, t):
            new[k] = v
    save_file(new, out / "adapter_model.safetensors")
    return out


def with_name(key: str, name: str) -> str:
    """A key of peft's file with an adapter name after the factor's name, as older tools wrote."""
    return re.sub(
        r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?=\.weight$|$)", rf".\1.{name}", key
    )


def test_keys_with_an_adapter_name_are_read_and_two_adapters_are_refused(
    llama_set, llama_lora, tmp_path
):
    adapter = llama_lora[0]
    named = renamed(adapter, tmp_path / "named", lambda k, t: [(with_name(k, "mine"), t)])
    assert "base_model.model.model.embed_tokens.lora_embedding_A.mine" in load_file(
        named / "adapter_model.safetensors"
    )
    want = Checkpoint(str(adapter)).adapter.targets
    assert Checkpoint(str(named)).adapter.targets.keys() == want.keys()
    checked(llama_set.base, named)
    two = renamed(
        adapter,
        tmp_path / "two",
        lambda k, t: [(with_name(k, "a"), t), (with_name(k, "b"), t.clone())],
    )
    with pytest.raises(MergeError, match=r"holds 2 adapters .*save each adapter to its own folder"):
        Checkpoint(str(two))


def test_an_adapter_whose_embedding_copy_differs_from_the_base_is_refused(
    llama_set, llama_lora, tmp_path
):
    changed = renamed(
        llama_lora[0],
        tmp_path / "c",
        lambda k, t: [(k, t + 1.0 if k.endswith("base_layer.weight") else t)],
    )
    with pytest.raises(MergeError, match=r"own copy of 'model.embed_tokens.weight' that differs"):
        checked(llama_set.base, changed)


def test_an_off_grid_density_rebuilds_the_adapter_s_task_vector_exactly(
    llama_set, llama_lora, llama_mergers, monkeypatch
):
    import merging.resident

    adapter, merged = llama_lora
    with_lora, with_full, live = llama_mergers
    ft = llama_set.finetunes[0]
    rebuilt = []

    def counted(factors, dtype):
        rebuilt.append(factors)
        return expand(factors, dtype)

    monkeypatch.setattr(merging.resident, "expand", counted)
    # int(0.0415 * n) is not on the 0.001 grid of the tables for n = 1024 or 2048: the magnitude
    # bound is selected exactly, from the task vector expanded again
    got, want = (
        live_merge(
            merger,
            live,
            {
                "method": "ties",
                "base": str(llama_set.base),
                "models": [
                    {"path": str(ft), "weight": 0.6, "density": 0.4237},
                    {"path": str(other), "weight": 0.9, "density": 0.0415},
                ],
            },
        )
        for merger, other in ((with_lora, adapter), (with_full, merged))
    )
    assert rebuilt
    assert max(float((got[n] - want[n]).abs().max()) for n in got) < 1e-5


def test_a_study_searches_a_full_fine_tune_and_an_adapter_together(llama_set, llama_lora, tmp_path):
    import optuna

    from search.config import config_from_dict
    from search.loop import run_study
    from search.pool import in_process_pool

    finetunes = [llama_set.finetunes[0], llama_lora[0]]
    data = study_data(llama_set.base, finetunes, tmp_path, budget={"n_trials": 7})
    study = run_study(config_from_dict(data), progress=False, pool=in_process_pool)
    states = [t.state for t in study.trials]
    assert len(states) >= 7 and set(states) == {optuna.trial.TrialState.COMPLETE}


@pytest.mark.slow
def test_an_adapter_goes_to_mergekit_as_base_plus_adapter_and_mergekit_merges_the_same(
    llama_set, llama_lora, tmp_path
):
    """mergekit names an adapter applied to a model `model+adapter`; applied to the base, that is
    the merge basin makes of the adapter as a fine-tune (run both, compare every tensor)."""
    from merging import from_mergekit, load_recipe, to_mergekit
    from tests.support.mergekit_oracle import (
        load_safetensors_folder,
        mismatch_summary,
        run_mergekit,
    )

    adapter, _ = llama_lora
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            method_recipe("task_arithmetic", llama_set.base, [llama_set.finetunes[0], adapter])
        )
    )
    recipe = load_recipe(recipe_file)
    text = to_mergekit(recipe)
    assert "--lora-merge-cache" in text.splitlines()[1]
    data = yaml.safe_load(text)
    assert data["models"][1]["model"] == f"{llama_set.base}+{adapter}"
    assert from_mergekit(data) == recipe  # and back: the adapter as the fine-tune
    theirs = run_mergekit(
        data, tmp_path / "mk", extra_flags=("--lora-merge-cache", str(tmp_path / "cache"))
    )
    merged = tmp_path / "basin"
    done = subprocess.run(
        [str(BASIN), "merge", str(recipe_file), "--out", str(merged)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    ours = load_safetensors_folder(merged)
    assert ours.keys() == theirs.keys()
    assert not mismatch_summary(ours, theirs, atol=1e-6, rtol=1e-5)
    # an adapter applied to another model than the base is not a fine-tune of it
    data["models"][1]["model"] = f"{llama_set.finetunes[0]}+{adapter}"
    with pytest.raises(MergeError, match="which is not the base_model"):
        from_mergekit(data)
