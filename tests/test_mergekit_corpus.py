"""A corpus of mergekit configs (tests/support/mergekit_corpus/) through `from_mergekit_with_notes`:
each is converted exactly (mergekit-yaml's merge and basin's agree tensor by tensor; the notes say
what was dropped because it changes nothing) or refused with its exact message.

The model sets: the tiny Llama (2 layers) and GPT-2 of tests/conftest.py, a 4-layer Llama for
slices, a Qwen2 with tied embeddings, the tensor names of a tiny DeepSeek-V3 (attention layer norms
named `self_attn.*_layernorm`; refusals only), and hub ids that are not local folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from merging.errors import MergeError
from merging.mergekit_yaml import from_mergekit, from_mergekit_with_notes
from merging.recipe import LayerParam
from tests.support.tiny import VOCAB, ModelSet, build_model_set, llama_config

CORPUS = Path(__file__).parent / "support" / "mergekit_corpus"
FILES = sorted(CORPUS.glob("*.yaml"))


def _header(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if m := re.match(r"# (set|expect|message|note): (.*)$", line):
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _substitute(text: str, ms: ModelSet | None) -> str:
    paths = (
        {"$BASE": "org/base", "$FT1": "org/ft1", "$FT2": "org/ft2"}
        if ms is None
        else {"$BASE": str(ms.base), "$FT1": str(ms.finetunes[0]), "$FT2": str(ms.finetunes[-1])}
    )
    for key, path in paths.items():
        text = text.replace(key, path)
    return text


# --- model sets -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama4_set(tmp_path_factory) -> ModelSet:
    return build_model_set(
        tmp_path_factory.mktemp("llama4"), llama_config(layers=4, positions=64), n_finetunes=2
    )


@pytest.fixture(scope="session")
def qwen_tied_set(tmp_path_factory) -> ModelSet:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return build_model_set(tmp_path_factory.mktemp("qwen_tied"), config, n_finetunes=2)


@pytest.fixture(scope="session")
def deepseek_set(tmp_path_factory) -> ModelSet:
    """A tiny DeepSeek-V3 (multi-head latent attention: `self_attn.q_a_layernorm`,
    `self_attn.kv_a_layernorm`); the fine-tune is a copy of the base, only the names are read."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    config = DeepseekV3Config(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=2,
        num_experts_per_tok=1,
        n_shared_experts=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=64,
        n_group=1,
        topk_group=1,
    )
    root = tmp_path_factory.mktemp("deepseek")
    model = AutoModelForCausalLM.from_config(config)
    for name in ("base", "ft1"):
        model.save_pretrained(root / name)
    return ModelSet(base=root / "base", finetunes=[root / "ft1"])


SETS = {
    "llama": "llama_set",
    "gpt2": "gpt2_set",
    "llama4": "llama4_set",
    "qwen_tied": "qwen_tied_set",
    "deepseek": "deepseek_set",
}


def _load(path: Path, request) -> tuple[dict[str, Any], dict[str, list[str]], ModelSet | None]:
    text = path.read_text()
    head = _header(text)
    (which,) = head["set"]
    ms = None if which == "hub" else request.getfixturevalue(SETS[which])
    return yaml.safe_load(_substitute(text, ms)), head, ms


def _kind(path: Path) -> str:
    return _header(path.read_text())["expect"][0]


REFUSED = [pytest.param(p, id=p.stem) for p in FILES if _kind(p) == "refused"]
EXACT = [pytest.param(p, id=p.stem) for p in FILES if _kind(p) == "exact"]


def test_the_corpus_is_labelled():
    assert FILES, CORPUS
    for path in FILES:
        head = _header(path.read_text())
        assert head.get("set", [""])[0] in (*SETS, "hub"), path.name
        assert head.get("expect", [""])[0] in ("exact", "refused"), path.name
        assert ("message" in head) == (head["expect"][0] == "refused"), path.name


@pytest.mark.parametrize("path", REFUSED)
def test_corpus_refusals(path: Path, request):
    data, head, ms = _load(path, request)
    with pytest.raises(MergeError) as err:
        from_mergekit_with_notes(data)
    assert str(err.value) == _substitute(head["message"][0], ms)


# --- agreement with mergekit ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_mergekit(request, tmp_path_factory) -> dict[str, Any]:
    """mergekit's merge of every exact config selected, in two processes that import it once."""
    from tests.support.mergekit_oracle import mergekit_executable, run_mergekit_many

    if mergekit_executable() is None:
        pytest.fail("mergekit-yaml not found: `make venv` (the test extra pins mergekit==0.1.5)")
    selected = {
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and getattr(item, "callspec", None)
        and item.originalname == "test_corpus_matches_mergekit"
    }
    root = tmp_path_factory.mktemp("corpus_mergekit")
    configs = {p.stem: _load(p, request)[0] for p in sorted(selected)}

    # a failed merge is re-raised by the config's own test
    return run_mergekit_many(configs, root, processes=max(1, min(2, os.cpu_count() or 1)))


@pytest.mark.slow
@pytest.mark.parametrize("path", EXACT)
def test_corpus_matches_mergekit(path: Path, request, corpus_mergekit, tmp_path):
    from merging.export import export_merge
    from tests.support.mergekit_oracle import load_safetensors_folder
    from tests.test_mergekit_parity import assert_same_tensors, boundary_ties

    data, head, _ = _load(path, request)
    recipe, notes = from_mergekit_with_notes(data)
    assert notes == head.get("note", [])
    theirs = corpus_mergekit[path.stem]
    if isinstance(theirs, BaseException):
        raise theirs
    out = export_merge(recipe, tmp_path / "basin", force=True, progress=False)
    ours = load_safetensors_folder(out)
    if data["merge_method"] in ("ties", "breadcrumbs"):
        # equal magnitudes at a trim boundary: both keep the same count, chosen apart
        simple = {
            **data,
            "models": [
                {
                    "model": m.path,
                    "parameters": {"density": m.density.default[0], "gamma": m.gamma.default[0]},
                }
                for m in recipe.models
            ],
        }
        ties = boundary_ties(simple)
        ours = {n: t.where(~ties[n], 0.0) for n, t in ours.items()}
        theirs = {n: t.where(~ties[n], 0.0) for n, t in theirs.items()}
    assert_same_tensors(ours, theirs, path.stem)


# --- translations and refusals, message by message (no models needed: names given) ---------------


def _llama_names(layers: int = 2, head: bool = True) -> list[str]:
    per = (
        "input_layernorm",
        "post_attention_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
    names = [f"model.layers.{i}.{p}.weight" for i in range(layers) for p in per]
    return (
        names
        + ["model.embed_tokens.weight", "model.norm.weight"]
        + (["lm_head.weight"] if head else [])
    )


def _gpt2_names(layers: int = 2) -> list[str]:
    per = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    names = [
        f"transformer.h.{i}.{p}.{k}" for i in range(layers) for p in per for k in ("weight", "bias")
    ]
    return names + ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"]


def _ta(models: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": "org/base"}
    out["models"] = models
    out.update(top)
    return out


def test_top_level_parameters_are_every_models_default():
    data = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/base"},
            {"model": "org/ft1", "parameters": {"weight": 0.7}},
            {"model": "org/ft2"},
        ],
        "parameters": {"density": 0.6, "weight": 0.4, "normalize": True},
    }
    recipe, notes = from_mergekit_with_notes(data)
    assert notes == []
    assert [(m.path, m.weight.default, m.density.default) for m in recipe.models] == [
        ("org/ft1", (0.7,), (0.6,)),
        ("org/ft2", (0.4,), (0.6,)),
    ]


def test_top_level_default_falls_behind_a_models_filters():
    # ft1's own filter covers the MLP tensors; everything else falls to the top-level weight
    data = _ta(
        [{"model": "org/ft1", "parameters": {"weight": [{"filter": "mlp", "value": 0.8}]}}],
        parameters={"weight": 0.4},
    )
    recipe, _ = from_mergekit_with_notes(data, names=_llama_names())
    assert recipe.models[0].weight == LayerParam(default=(0.4,), mlp=(0.8,))


def test_epsilon_on_ties_is_still_refused():
    data = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [{"model": "org/ft1"}],
        "parameters": {"epsilon": 0.1},
    }
    with pytest.raises(MergeError) as err:
        from_mergekit_with_notes(data)
    assert str(err.value) == (
        "parameters: epsilon has no basin equivalent for ties; basin reads lambda, normalize "
        "(and ignores int8_mask: a memory option of mergekit's that leaves the merged weights as "
        "they are), and dropping the rest would merge something else than this file says"
    )


@pytest.mark.parametrize(
    "data,notes",
    [
        (
            _ta([{"model": "org/ft1", "parameters": {"weight": 1, "density": 0.5}}]),
            [
                "models[0].parameters.density dropped: mergekit's task_arithmetic does not use "
                "it, so it changes nothing"
            ],
        ),
        (
            _ta([{"model": "org/ft1", "parameters": {"weight": 1}}], parameters={"rescale": True}),
            [
                "parameters.rescale dropped: mergekit's task_arithmetic does not use it, so it "
                "changes nothing"
            ],
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "b"}],
                "parameters": {"density": 0.3, "weight": 0.5},
            },
            [
                "parameters.density dropped: mergekit's linear does not use it, so it changes "
                "nothing"
            ],
        ),
        (
            {
                "merge_method": "model_stock",
                "base_model": "org/base",
                "models": [{"model": "a"}, {"model": "b"}],
                "parameters": {"weight": 0.5},
            },
            [
                "parameters.weight dropped: mergekit's model_stock does not use it, so it "
                "changes nothing"
            ],
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1}}],
                "parameters": {"t": 0.3},
            },
            [
                "models[1].parameters.weight dropped: mergekit's slerp does not use it, so it "
                "changes nothing"
            ],
        ),
        (
            _ta([{"model": "org/ft1", "parameters": {"weight": 1}}], name="merged-7b"),
            ["name ('merged-7b') dropped: it is only a label"],
        ),
    ],
    ids=[
        "density-task_arithmetic",
        "rescale-task_arithmetic",
        "density-linear",
        "weight-model_stock",
        "weight-slerp",
        "name",
    ],
)
def test_what_mergekit_ignores_is_dropped_with_a_note(data, notes):
    assert from_mergekit_with_notes(data)[1] == notes


def test_lambda_on_della_is_read_by_both():
    data = {
        "merge_method": "della",
        "base_model": "org/base",
        "models": [{"model": "org/ft1", "parameters": {"weight": 1, "density": 0.5}}],
        "parameters": {"lambda": 0.7},
    }
    recipe, notes = from_mergekit_with_notes(data, approximate=True)
    assert (recipe.lam, notes) == (LayerParam.constant(0.7), [])


def test_out_dtype():
    one = _ta([{"model": "org/ft1", "parameters": {"weight": 1}}], dtype="bfloat16")
    assert from_mergekit_with_notes({**one, "out_dtype": "bfloat16"})[0].dtype == "bfloat16"
    two = {**one, "dtype": "float32", "out_dtype": "bfloat16"}
    recipe, notes = from_mergekit_with_notes(two, approximate=True)
    assert recipe.dtype == "bfloat16"
    assert notes == [
        "approximate: merged in out_dtype bfloat16; mergekit merges in float32 and rounds once "
        "at the end"
    ]


def test_a_catch_all_ends_the_list():
    # mergekit never reaches an entry after one without a filter
    data = _ta(
        [
            {
                "model": "org/ft1",
                "parameters": {"weight": [{"value": 0.5}, {"filter": "mlp", "value": 2}]},
            }
        ]
    )
    assert from_mergekit(data).models[0].weight == LayerParam.constant(0.5)


@pytest.mark.parametrize(
    "names,flt,cls",
    [
        (_llama_names(), "self_attn", "attn"),
        (_gpt2_names(), "attn", "attn"),
        (_llama_names(), "mlp", "mlp"),
        (_gpt2_names(), "mlp", "mlp"),
    ],
)
def test_filters_that_select_a_whole_class_convert(names, flt, cls):
    data = _ta(
        [
            {
                "model": "org/ft1",
                "parameters": {"weight": [{"filter": flt, "value": 0.2}, {"value": 0.5}]},
            }
        ]
    )
    recipe, _ = from_mergekit_with_notes(data, names=names)
    assert recipe.models[0].weight == LayerParam(default=(0.5,), **{cls: (0.2,)})


def test_a_narrower_filter_is_refused_with_the_tensors_it_changes():
    data = _ta(
        [
            {
                "model": "org/ft1",
                "parameters": {"weight": [{"filter": "q_proj", "value": 0.2}, {"value": 0.5}]},
            }
        ]
    )
    with pytest.raises(MergeError) as err:
        from_mergekit_with_notes(data, names=_llama_names())
    assert str(err.value).startswith(
        "models[0].parameters.weight: converted, 6 tensor(s) of org/base would get other values "
        "than mergekit gives them: model.layers.0.self_attn.k_proj.weight (mergekit 0.5, basin 0.2)"
    )


def test_a_head_filter_over_depth_converts_given_the_names():
    data = _ta(
        [
            {
                "model": "org/ft1",
                "parameters": {
                    "weight": [
                        {"filter": "lm_head", "value": 0.8},
                        {"filter": "model.norm", "value": 0.8},
                        {"value": [0.2, 0.8]},
                    ]
                },
            }
        ]
    )
    recipe, _ = from_mergekit_with_notes(data, names=_llama_names())
    assert recipe.models[0].weight == LayerParam(default=(0.2, 0.8))


def test_tied_embeddings_take_the_first_value():
    # no lm_head: the shared tensor is the embedding, at depth 0 (mergekit: t = 0, its first value)
    from merging.layers import build_layer_map

    lm = build_layer_map(_llama_names(head=False))
    assert lm["model.embed_tokens.weight"].depth == 0.0
    assert LayerParam(default=(0.2, 0.8)).at(lm["model.embed_tokens.weight"].depth, "other") == 0.2
    # converting needs a value only for the final norm
    data = _ta(
        [
            {
                "model": "org/ft1",
                "parameters": {
                    "weight": [{"filter": "model.norm", "value": 0.8}, {"value": [0.2, 0.8]}]
                },
            }
        ]
    )
    recipe, _ = from_mergekit_with_notes(data, names=_llama_names(head=False))
    assert recipe.models[0].weight == LayerParam(default=(0.2, 0.8))


def test_slices_without_local_models_are_refused():
    data = {
        "merge_method": "slerp",
        "base_model": "org/a",
        "slices": [
            {
                "sources": [
                    {"model": "org/a", "layer_range": [0, 32]},
                    {"model": "org/b", "layer_range": [0, 32]},
                ]
            }
        ],
        "parameters": {"t": 0.5},
    }
    with pytest.raises(MergeError) as err:
        from_mergekit_with_notes(data)
    assert str(err.value) == (
        "converting 'slices' needs the models as local folders: basin checks that the slices "
        "cover the model's layers and where each value falls from the base's tensor names. "
        "Convert with the models at hand, or list the models under 'models:'"
    )
    recipe, _ = from_mergekit_with_notes(data, names=_llama_names(layers=32))
    assert [m.path for m in recipe.models] == [
        "org/a",
        "org/b",
    ] and recipe.t == LayerParam.constant(0.5)


def test_slice_values_become_values_over_depth():
    # t restarts in each slice: [0, 1] per slice of 2 layers is 0, 1, 0, 1 over the 4 layers
    def src(a: int, b: int) -> list[dict[str, Any]]:
        return [{"model": m, "layer_range": [a, b]} for m in ("org/a", "org/b")]

    data = {
        "merge_method": "slerp",
        "base_model": "org/a",
        "slices": [{"sources": src(0, 2)}, {"sources": src(2, 4)}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]},
    }
    recipe, _ = from_mergekit_with_notes(data, names=_llama_names(layers=4))
    assert recipe.t == LayerParam(default=(0.5,), attn=(0.0, 1.0, 0.0, 1.0))


def test_cli_convert_prints_the_notes(tmp_path, capsys):
    from search.cli import main

    src = tmp_path / "mk.yaml"
    src.write_text(
        yaml.safe_dump(_ta([{"model": "org/ft1", "parameters": {"weight": 1, "density": 0.5}}]))
    )
    assert main(["convert", str(src), "--to", "basin"]) == 0
    err = capsys.readouterr().err
    assert (
        "note: models[0].parameters.density dropped: mergekit's task_arithmetic does not use it, "
        "so it changes nothing" in err
    )


def test_a_flag_per_slice_is_refused():
    data = {
        "merge_method": "ties",
        "base_model": "org/a",
        "slices": [
            {
                "sources": [{"model": m, "layer_range": [0, 2]} for m in ("org/a", "org/b")],
                "parameters": {"normalize": False},
            }
        ],
    }
    with pytest.raises(MergeError) as err:
        from_mergekit_with_notes(data, names=_llama_names())
    assert str(err.value) == (
        "slices[0].parameters: normalize is set once per merge in basin; give it under the "
        "top-level 'parameters:' instead"
    )
