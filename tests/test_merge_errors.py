"""Bad inputs to `basin merge`: one clear message, exit code 2, and nothing left on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging import MergeError, export_merge, recipe_from_dict
from search.cli import main
from tests.support.tiny import build_model_set, llama_config

# --- helpers --------------------------------------------------------------------------------------


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(folder: Path, edit) -> None:
    """Rewrite a single-file model's tensors through `edit(state_dict)`."""
    file = folder / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


def ties_recipe(base: Path, models: list[Path], **params) -> dict:
    return {
        "method": "ties",
        "base": str(base),
        "models": [{"path": str(m), "weight": 1.0, "density": 0.5} for m in models],
        "parameters": params or {"lambda": 1.0},
    }


def run_merge(tmp_path: Path, capsys, recipe: dict | str, *extra: str, out_name: str = "merged"):
    """`basin merge` on a recipe (a dict, or raw YAML text); returns (exit code, stderr, out
    folder)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "outputs" / out_name
    capsys.readouterr()
    code = main(["merge", str(path), "--out", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err, out


def assert_refused(code: int, err: str, out: Path, *words: str) -> None:
    """Exit 2, one `basin: error:` line naming the problem, no output and no temp folder."""
    assert code == 2, err
    assert err.startswith("basin: error:"), err
    assert err.count("basin: error:") == 1 and "Traceback" not in err, err
    message = err.lower()
    for word in words:
        assert word.lower() in message, f"{word!r} not in {err!r}"
    assert not out.exists()
    leftovers = list(out.parent.glob(f".{out.name}.*")) if out.parent.exists() else []
    assert not leftovers, leftovers


# --- incompatible models --------------------------------------------------------------------------


def test_shape_mismatch(tmp_path, capsys, llama_set):
    config = llama_config(hidden=48, intermediate=64, positions=64)
    wide = build_model_set(tmp_path / "wide", config, n_finetunes=0).base
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], wide])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "shape", "(64, 48) vs (64, 32)", str(wide))


def test_tensor_name_mismatch_deleted_tensor(tmp_path, capsys, llama_set):
    broken = copy_model(llama_set.finetunes[1], tmp_path / "broken")
    edit_tensors(broken, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], broken])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(
        code, err, out, "different tensor names", "missing", "model.layers.1.mlp.up_proj.weight"
    )


def test_tensor_name_mismatch_extra_tensor(tmp_path, capsys, llama_set):
    extra = copy_model(llama_set.finetunes[1], tmp_path / "extra")
    edit_tensors(extra, lambda s: s.update({"model.layers.1.mlp.extra.weight": torch.zeros(3)}))
    recipe = ties_recipe(llama_set.base, [extra])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(
        code, err, out, "different tensor names", "extra", "model.layers.1.mlp.extra.weight"
    )


def test_different_architecture(tmp_path, capsys, llama_set, gpt2_set):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], gpt2_set.finetunes[0]])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "different architectures", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_missing_shard(tmp_path, capsys, llama_set):
    copy_recipe = recipe_from_dict({"method": "linear", "models": [str(llama_set.finetunes[0])]})
    sharded = export_merge(
        copy_recipe, tmp_path / "sharded", max_shard_bytes=20_000, progress=False
    )
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    recipe = ties_recipe(llama_set.base, [sharded, llama_set.finetunes[1]])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "missing shard", shards[1].name)


def test_different_tokenizer_vocabulary(tmp_path, capsys, llama_set):
    other = copy_model(llama_set.finetunes[1], tmp_path / "other-tok")
    tok_file = other / "tokenizer.json"
    data = json.loads(tok_file.read_text())
    vocab = data["model"]["vocab"]
    vocab["w1"], vocab["w2"] = vocab["w2"], vocab["w1"]  # same size, different ids
    tok_file.write_text(json.dumps(data))
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], other])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "different tokenizer vocabularies", "tokenizer.json")


def test_different_vocab_size_in_config(tmp_path, capsys, llama_set):
    other = copy_model(llama_set.finetunes[1], tmp_path / "other-size")
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 80
    (other / "config.json").write_text(json.dumps(config))
    recipe = ties_recipe(llama_set.base, [other])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "different vocabulary sizes", "80", "64")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_tensor(tmp_path, capsys, llama_set, bad):
    damaged = copy_model(llama_set.finetunes[1], tmp_path / "damaged")

    def poison(state):
        state["model.layers.1.self_attn.v_proj.weight"][3, 5] = bad

    edit_tensors(damaged, poison)
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], damaged])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(
        code, err, out, "NaN or inf", "model.layers.1.self_attn.v_proj.weight", str(damaged)
    )


def test_merged_weights_overflowing_to_inf(tmp_path, capsys, llama_set):
    # a huge lambda: the inputs are fine, the merge overflows after the output was started
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]], **{"lambda": 1e42})
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "NaN or inf", "lambda")


def test_merge_coefficients_beyond_float32(tmp_path, capsys, llama_set):
    # weight x lambda = 1e60 cannot even be passed to a float32 op: the same error as an overflow
    recipe = {
        "method": "task_arithmetic",
        "base": str(llama_set.base),
        "models": [{"path": str(llama_set.finetunes[0]), "weight": 1e30}],
        "parameters": {"lambda": 1e30},
    }
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "overflow float32", "lower the weights or lambda")


def test_the_next_export_sweeps_what_killed_exports_left(tmp_path, llama_set):
    """A killed export leaves `.NAME.partial-PID-HOST-*` beside the target; the next export of that
    target removes those of dead processes here (also those older exports marked inside), and
    keeps a live export's and folders that are not its own."""
    import os
    import socket
    import subprocess
    import sys

    from merging.export import OWNER_FILE

    out = tmp_path / "merged"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    debris = {}
    # the owner in the folder's name (killed the moment it was made: nothing written inside yet)
    for label, pid, on in (
        ("dead", gone.pid, host),
        ("live", os.getpid(), host),
        ("elsewhere", gone.pid, "another-host"),
    ):
        folder = tmp_path / f".merged.partial-{pid}-{on}-a1b2c3d4"
        folder.mkdir()
        debris[label] = folder
    # as older exports left them: the owner in a file inside
    for label, owner in (
        ("old dead", {"host": host, "pid": gone.pid}),
        ("old live", {"host": host, "pid": os.getpid()}),
        ("old elsewhere", {"host": "another-host", "pid": gone.pid}),
        ("unowned", None),
    ):
        folder = tmp_path / f".merged.partial-{label.replace(' ', '_')}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
        if owner is not None:
            (folder / OWNER_FILE).write_text(json.dumps(owner))
        debris[label] = folder
    export_merge(
        recipe_from_dict(ties_recipe(llama_set.base, [llama_set.finetunes[0]])), out, progress=False
    )
    assert {k for k, folder in debris.items() if not folder.exists()} == {"dead", "old dead"}
    assert not (out / OWNER_FILE).exists() and (out / "model.safetensors").is_file()


def test_no_model_folder(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, [tmp_path / "does-not-exist"])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "not found", "does-not-exist")


# --- bad recipes ----------------------------------------------------------------------------------


def test_unknown_method_suggests_the_closest(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]]) | {"method": "tie"}
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "unknown method 'tie'", "did you mean 'ties'")


@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_outside_unit_interval(tmp_path, capsys, llama_set, density):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]])
    recipe["models"][0]["density"] = density
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "density", str(float(density)), "outside (0, 1]")


def test_density_outside_in_a_per_layer_list(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]])
    recipe["models"][0]["density"] = {"attn": [0.5, 1.5], "default": 0.5}
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "models[0].density", "1.5", "outside (0, 1]")


def test_slerp_with_three_models(tmp_path, capsys, llama_set):
    recipe = {
        "method": "slerp",
        "models": [str(p) for p in llama_set.finetunes],
        "parameters": {"t": 0.5},
    }
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "slerp", "exactly two models", "3")


@pytest.mark.parametrize(
    "where,value",
    [
        ("weight", [0.1, 0.5, 0.9]),
        ("density", {"mlp": [0.2, 0.4, 0.6, 0.8], "default": 0.5}),
        ("lambda", [1, 1, 1]),
    ],
)
def test_per_layer_list_longer_than_the_stack(tmp_path, capsys, llama_set, where, value):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]])
    if where == "lambda":
        recipe["parameters"]["lambda"] = value
    else:
        recipe["models"][0][where] = value
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, where, "values over depth", "2 layers")


def test_all_weights_zero_under_normalize(tmp_path, capsys, llama_set):
    recipe = {
        "method": "linear",
        "models": [{"path": str(p), "weight": 0.0} for p in llama_set.finetunes[:2]],
    }
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "weight is 0", "normalize")


def test_linear_weights_summing_to_zero_under_normalize(tmp_path, capsys, llama_set):
    """Used to raise a bare ZeroDivisionError from inside the merge."""
    a, b = llama_set.finetunes[:2]
    recipe = {
        "method": "linear",
        "models": [{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": -0.5}],
    }
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "sum to 0", "normalize: false")
    recipe["parameters"] = {"normalize": False}  # the way out the message names works
    code, _, out = run_merge(tmp_path, capsys, recipe)
    assert code == 0 and out.is_dir()


def test_all_weights_zero_at_some_layers_under_normalize(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, llama_set.finetunes[:2])
    for m in recipe["models"]:
        m["weight"] = {"mlp": [0.0, 1.0], "default": 1.0}  # zero in layer 0's MLP
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "weight is 0", "model.layers.0.mlp", "normalize")


def test_unknown_recipe_key(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]])
    recipe["paramters"] = recipe.pop("parameters")
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "unknown key 'paramters'", "did you mean 'parameters'")


def test_unknown_parameter_key(tmp_path, capsys, llama_set):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0]], lamda=0.5)
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "unknown key 'lamda'", "did you mean 'lambda'")


def test_mergekit_file_given_to_merge(tmp_path, capsys, llama_set):
    text = f"""
models:
  - model: {llama_set.finetunes[0]}
    parameters: {{weight: 1.0, density: 0.5}}
merge_method: ties
base_model: {llama_set.base}
dtype: float32
"""
    code, err, out = run_merge(tmp_path, capsys, text)
    assert_refused(code, err, out, "mergekit", "basin convert", "--to basin")


def test_recipe_file_missing(tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "merged"
    code = main(["merge", str(tmp_path / "nope.yaml"), "--out", str(out), "--quiet"])
    assert_refused(code, capsys.readouterr().err, out, "recipe file not found", "nope.yaml")


def test_recipe_not_yaml(tmp_path, capsys):
    code, err, out = run_merge(tmp_path, capsys, "method: [ties\nmodels: {")
    assert_refused(code, err, out, "not valid YAML")


# --- pickle checkpoints ---------------------------------------------------------------------------


@pytest.fixture
def pickle_copy(tmp_path, llama_set) -> Path:
    """A copy of a fine-tune with its weights as pytorch_model.bin only."""
    folder = copy_model(llama_set.finetunes[1], tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_checkpoint_refused_without_flag(tmp_path, capsys, llama_set, pickle_copy):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], pickle_copy])
    code, err, out = run_merge(tmp_path, capsys, recipe)
    assert_refused(code, err, out, "pickle", "pytorch_model.bin", "--allow-pickle")


def test_pickle_checkpoint_accepted_with_flag(tmp_path, capsys, llama_set, pickle_copy):
    recipe = ties_recipe(llama_set.base, [llama_set.finetunes[0], pickle_copy])
    code, err, out = run_merge(tmp_path, capsys, recipe, "--allow-pickle")
    assert code == 0, err
    # the same merge as from the safetensors original
    original = ties_recipe(llama_set.base, [llama_set.finetunes[0], llama_set.finetunes[1]])
    code, err, ref = run_merge(tmp_path, capsys, original, out_name="reference")
    assert code == 0, err
    merged, expected = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert set(merged) == set(expected)
    assert all(torch.equal(merged[n], expected[n]) for n in expected)


# --- the output folder ----------------------------------------------------------------------------


def _existing_output(tmp_path: Path) -> Path:
    out = tmp_path / "outputs" / "merged"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("previous run")
    return out


def test_existing_output_refused_without_force(tmp_path, capsys, llama_set):
    out = _existing_output(tmp_path)
    code, err, _ = run_merge(
        tmp_path, capsys, ties_recipe(llama_set.base, [llama_set.finetunes[0]])
    )
    assert code == 2
    assert err.startswith("basin: error:") and "already exists" in err and "--force" in err
    assert (out / "old.txt").read_text() == "previous run"  # untouched
    assert not (out / "model.safetensors").exists()
    assert not list(out.parent.glob(".merged.*"))


def test_existing_output_replaced_with_force(tmp_path, capsys, llama_set):
    from transformers import AutoModelForCausalLM

    out = _existing_output(tmp_path)
    code, err, _ = run_merge(
        tmp_path, capsys, ties_recipe(llama_set.base, [llama_set.finetunes[0]]), "--force"
    )
    assert code == 0, err
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file()
    AutoModelForCausalLM.from_pretrained(out)
    assert not list(out.parent.glob(".merged.*"))  # no .partial- or .old- folders left


def test_failed_forced_merge_keeps_the_old_output(tmp_path, capsys, llama_set):
    out = _existing_output(tmp_path)
    damaged = copy_model(llama_set.finetunes[1], tmp_path / "damaged")

    def poison(state):
        state["lm_head.weight"][0, 0] = float("nan")

    edit_tensors(damaged, poison)
    code, err, _ = run_merge(tmp_path, capsys, ties_recipe(llama_set.base, [damaged]), "--force")
    assert code == 2 and err.startswith("basin: error:") and "NaN" in err
    assert (out / "old.txt").read_text() == "previous run"
    assert not list(out.parent.glob(".merged.*"))


def test_export_merge_raises_merge_error_directly(tmp_path, llama_set):
    recipe = recipe_from_dict(ties_recipe(llama_set.base, [llama_set.finetunes[0]]))
    (tmp_path / "taken").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        export_merge(recipe, tmp_path / "taken", progress=False)
