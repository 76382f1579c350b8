"""Recipes: YAML parsing, dumping, defaults, validation messages, and mergekit conversion."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merging import (
    LayerParam,
    MergeError,
    MergeRecipe,
    ModelEntry,
    dump_recipe,
    from_mergekit,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    to_mergekit,
)

# --- helpers --------------------------------------------------------------------------------------


def parse(text: str) -> MergeRecipe:
    return recipe_from_dict(yaml.safe_load(text))


def write_recipe(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(data) -> str:
    with pytest.raises(MergeError) as err:
        recipe_from_dict(data)
    return str(err.value)


def minimal(**changes) -> dict:
    data = {"method": "ties", "base": "base", "models": [{"path": "a"}, {"path": "b"}]}
    data.update(changes)
    return data


FULL = """
method: ties
base: path/to/base
models:
  - path: path/to/code-ft
    weight: 0.7
    density: [0.3, 0.8]
  - path: path/to/chat-ft
    weight: {attn: 0.2, mlp: [0.4, 0.9], default: 0.5}
parameters:
  lambda: [0.9, 1.1]
  normalize: false
  seed: 4
dtype: bfloat16
"""


# --- parsing --------------------------------------------------------------------------------------


def test_parse_full_recipe():
    r = parse(FULL)
    assert r.method == "ties"
    assert r.base == "path/to/base"
    assert r.dtype == "bfloat16"
    assert r.seed == 4
    assert r.normalize is False and r.normalize_ is False
    assert r.lam == LayerParam(default=(0.9, 1.1))
    code, chat = r.models
    assert code == ModelEntry(
        path="path/to/code-ft", weight=LayerParam((0.7,)), density=LayerParam((0.3, 0.8))
    )
    assert chat.path == "path/to/chat-ft"
    assert chat.weight == LayerParam(default=(0.5,), attn=(0.2,), mlp=(0.4, 0.9))
    assert chat.density == LayerParam.constant(1.0)


def test_parse_defaults():
    r = recipe_from_dict({"method": "linear", "models": ["a", "b"]})
    assert r.base is None
    assert r.reference == "a"
    assert r.seed == 0 and r.dtype == "float32"
    assert r.lam == LayerParam.constant(1.0)
    assert r.t == LayerParam.constant(0.5)
    assert all(
        m.weight == LayerParam.constant(1.0) and m.density == LayerParam.constant(1.0)
        for m in r.models
    )


def test_integers_become_floats():
    r = recipe_from_dict(minimal(models=[{"path": "a", "weight": 2, "density": 1}]))
    assert r.models[0].weight.default == (2.0,)
    assert isinstance(r.models[0].weight.default[0], float)


def test_density_mapping_without_default_keeps_everything_else():
    r = recipe_from_dict(minimal(models=[{"path": "a", "density": {"attn": 0.5}}]))
    assert r.models[0].density == LayerParam(default=(1.0,), attn=(0.5,))


def test_load_recipe_from_file(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", FULL)
    assert load_recipe(path) == parse(FULL)


# --- dumping and round trips ----------------------------------------------------------------------

ROUND_TRIP = [
    FULL,
    "method: linear\nmodels: [a, b, c]\n",
    "method: linear\nmodels: [{path: a, weight: [0, 1]}, {path: b, weight: 2}]\n"
    "parameters: {normalize: false}\n",
    "method: task_arithmetic\nbase: B\nmodels: [{path: a, weight: -0.5}]\n"
    "parameters: {lambda: 0.3}\ndtype: float16\n",
    "method: dare_ties\nbase: B\nmodels: [{path: a, density: {mlp: [0.2, 0.6], default: 0.9}}, b]\n"
    "parameters: {seed: 123, rescale: false, normalize: true}\n",
    "method: dare_linear\nbase: B\nmodels: [{path: a, density: 0.25}]\n"
    "parameters: {rescale: true}\n",
    "method: slerp\nmodels: [a, b]\n"
    "parameters: {t: {attn: [0, 0.5, 1], mlp: 0.25, default: 0.5}}\n",
    "method: slerp\nbase: B\nmodels: [a, b]\nparameters: {t: [0.1, 0.9]}\n",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_through_dict(text):
    r = parse(text)
    assert recipe_from_dict(recipe_to_dict(r)) == r


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_through_yaml_text(text, tmp_path):
    r = parse(text)
    dumped = dump_recipe(r)
    assert parse(dumped) == r
    assert load_recipe(write_recipe(tmp_path / "r.yaml", dumped)) == r


def test_dump_is_readable_yaml():
    data = yaml.safe_load(dump_recipe(parse(FULL)))
    assert list(data) == ["method", "base", "models", "parameters", "dtype"]
    assert data["models"][0] == {"path": "path/to/code-ft", "weight": 0.7, "density": [0.3, 0.8]}
    assert data["models"][1]["weight"] == {"attn": 0.2, "mlp": [0.4, 0.9], "default": 0.5}
    assert data["parameters"]["lambda"] == [0.9, 1.1]
    assert data["parameters"]["normalize"] is False
    assert "t" not in data["parameters"]  # only slerp has t


def test_recipe_built_in_code_round_trips():
    r = MergeRecipe(
        method="dare_ties",
        base="B",
        models=(
            ModelEntry("a", LayerParam((0.5, 1.0), mlp=(0.25,)), LayerParam((0.7,))),
            ModelEntry("b"),
        ),
        lam=LayerParam((1.2,)),
        seed=9,
        rescale=False,
    )
    assert recipe_from_dict(recipe_to_dict(r)) == r


# --- defaults per method --------------------------------------------------------------------------

# mergekit 0.1.5's defaults
NORMALIZE = {
    "linear": True,
    "task_arithmetic": False,
    "ties": True,
    "dare_linear": False,
    "dare_ties": False,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": False,
}
RESCALE = {
    "linear": False,
    "task_arithmetic": False,
    "ties": False,
    "dare_linear": True,
    "dare_ties": True,
    "breadcrumbs": False,
    "breadcrumbs_ties": False,
    "della": True,
    "della_linear": True,
}
HAS_RESCALE = {"dare_linear", "dare_ties", "della", "della_linear"}


@pytest.mark.parametrize("method", sorted(NORMALIZE))
def test_method_defaults(method):
    r = recipe_from_dict(minimal(method=method))
    assert r.normalize is None and r.rescale is None
    assert r.normalize_ is NORMALIZE[method]
    assert r.rescale_ is RESCALE[method]


@pytest.mark.parametrize("method", sorted(NORMALIZE))
def test_explicit_flags_override_defaults(method):
    r = (
        recipe_from_dict(
            minimal(
                method=method,
                parameters={"normalize": not NORMALIZE[method], "rescale": not RESCALE[method]},
            )
        )
        if method in HAS_RESCALE
        else recipe_from_dict(
            minimal(method=method, parameters={"normalize": not NORMALIZE[method]})
        )
    )
    assert r.normalize_ is (not NORMALIZE[method])
    assert r.rescale_ is (not RESCALE[method]) if method in HAS_RESCALE else not r.rescale_


@pytest.mark.parametrize("method", sorted(set(NORMALIZE) - HAS_RESCALE))
def test_rescale_is_refused_where_a_method_has_none(method):
    with pytest.raises(MergeError, match=f"parameters.rescale: {method} has no rescale"):
        recipe_from_dict(minimal(method=method, parameters={"rescale": True}))
    assert recipe_from_dict(minimal(method=method, parameters={"rescale": False})).rescale_ is False


def test_slerp_defaults():
    r = recipe_from_dict({"method": "slerp", "models": ["a", "b"]})
    assert r.t == LayerParam.constant(0.5)
    assert r.reference == "a"


# --- validation messages --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,words",
    [
        ("ties", ["YAML mapping", "method", "models"]),
        ({"models": ["a"]}, ["'method' is missing", "linear", "ties"]),
        (minimal(models=[]), ["'models' must be a non-empty list"]),
        (minimal(models="a"), ["'models' must be a non-empty list"]),
        (minimal(models=[{"weight": 1}]), ["models[0]", "needs a 'path'"]),
        (
            minimal(models=[{"path": "a", "weigth": 1}]),
            ["models[0]", "unknown key 'weigth'", "did you mean 'weight'"],
        ),
        (
            minimal(models=[{"path": "a", "weight": "high"}]),
            ["models[0].weight", "expected a number", "'high'"],
        ),
        (
            minimal(models=[{"path": "a", "weight": True}]),
            ["models[0].weight", "expected a number", "True"],
        ),
        (
            minimal(models=[{"path": "a", "weight": [0.5, "x"]}]),
            ["models[0].weight", "expected numbers", "'x'"],
        ),
        (minimal(models=[{"path": "a", "weight": []}]), ["models[0].weight", "empty"]),
        (
            minimal(models=[{"path": "a", "weight": {"atn": 1, "default": 1}}]),
            ["unknown tensor kind 'atn'", "did you mean 'attn'"],
        ),
        (
            minimal(models=[{"path": "a", "weight": {"attn": 1}}]),
            ["models[0].weight", "needs a 'default'"],
        ),
        (
            minimal(models=[{"path": "a", "weight": {"mlp": "x", "default": 1}}]),
            ["models[0].weight.mlp", "'x'"],
        ),
        (
            minimal(models=[{"path": "a", "weight": float("nan")}]),
            ["models[0].weight", "not a finite number"],
        ),
        (
            minimal(models=[{"path": "a", "weight": float("inf")}]),
            ["models[0].weight", "not a finite number"],
        ),
        (minimal(models=[{"path": "a", "density": 0}]), ["models[0].density", "outside (0, 1]"]),
        (minimal(models=[{"path": "a", "density": 1.5}]), ["models[0].density", "outside (0, 1]"]),
        (
            minimal(models=[{"path": "a", "density": float("nan")}]),
            ["models[0].density", "not a finite number"],
        ),
        (minimal(models=["a", "a"]), ["same model is listed twice"]),
        (minimal(parameters=[1]), ["'parameters' must be a mapping"]),
        (
            minimal(parameters={"normalize": "yes"}),
            ["parameters.normalize", "true or false", "'yes'"],
        ),
        (minimal(parameters={"rescale": 1}), ["parameters.rescale", "true or false"]),
        (minimal(parameters={"seed": 1.5}), ["parameters.seed", "integer", "1.5"]),
        (minimal(parameters={"seed": True}), ["parameters.seed", "integer"]),
        (minimal(parameters={"lambda": "big"}), ["parameters.lambda", "expected a number"]),
        (
            minimal(parameters={"lambda": float("nan")}),
            ["parameters.lambda", "not a finite number"],
        ),
        (minimal(parameters={"lamda": 1}), ["unknown key 'lamda'", "did you mean 'lambda'"]),
        (minimal(method="tie"), ["unknown method 'tie'", "did you mean 'ties'", "Known:"]),
        (minimal(method="frankenmerge"), ["unknown method 'frankenmerge'", "Known:"]),
        (minimal(dtype="fp16"), ["unknown dtype 'fp16'", "float16"]),
        (minimal(base=None), ["needs 'base'"]),
        (minimal(modles=[]), ["unknown key 'modles'", "did you mean 'models'"]),
        ({"method": "slerp", "models": ["a", "b", "c"]}, ["exactly two models", "3"]),
        ({"method": "slerp", "models": ["a"]}, ["exactly two models", "1"]),
        (
            {"method": "slerp", "models": ["a", "b"], "parameters": {"t": 1.5}},
            ["parameters.t", "outside [0, 1]"],
        ),
        (
            {"method": "slerp", "models": ["a", "b"], "parameters": {"t": [0, -0.1]}},
            ["parameters.t", "outside [0, 1]"],
        ),
        ({"merge_method": "ties", "models": []}, ["mergekit", "basin convert", "--to basin"]),
    ],
)
def test_validation_messages(data, words):
    message = error_of(data)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_load_recipe_errors(tmp_path):
    with pytest.raises(MergeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(MergeError, match="not valid YAML"):
        load_recipe(write_recipe(tmp_path / "bad.yaml", "method: [ties\n"))
    with pytest.raises(MergeError, match="YAML mapping"):
        load_recipe(write_recipe(tmp_path / "empty.yaml", ""))


# --- mergekit conversion --------------------------------------------------------------------------

MERGEKIT_TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: OpenPipe/mistral-ft-optimized-1218
    parameters:
      density: 0.5
      weight:
        - filter: self_attn
          value: [0, 0.5, 0.3, 0.7, 1]
        - filter: mlp
          value: [1, 0.5, 0.7, 0.3, 0]
        - value: 0.5
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
    parameters:
      density:
        - filter: self_attn
          value: 0.6
        - value: 0.4
      weight: 0.3
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def mistral_names(layers: int = 5) -> list[str]:
    """The tensor names of a Mistral (Llama layout) of `layers` layers: what mergekit's filters
    are matched against."""
    per_layer = [
        "input_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        "post_attention_layernorm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    return [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer),
        "model.norm.weight",
        "lm_head.weight",
    ]


MISTRAL = mistral_names()  # the five values of the examples' lists: one per layer

MERGEKIT_SLERP = """
models:
  - model: OpenPipe/mistral-ft-optimized-1218
  - model: mlabonne/NeuralHermes-2.5-Mistral-7B
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_from_mergekit_ties():
    r = from_mergekit(yaml.safe_load(MERGEKIT_TIES), names=MISTRAL)
    expected = MergeRecipe(
        method="ties",
        base="mistralai/Mistral-7B-v0.1",
        models=(
            ModelEntry(
                path="OpenPipe/mistral-ft-optimized-1218",
                weight=LayerParam(
                    default=(0.5,), attn=(0.0, 0.5, 0.3, 0.7, 1.0), mlp=(1.0, 0.5, 0.7, 0.3, 0.0)
                ),
                density=LayerParam.constant(0.5),
            ),
            ModelEntry(
                path="mlabonne/NeuralHermes-2.5-Mistral-7B",
                weight=LayerParam.constant(0.3),
                density=LayerParam(default=(0.4,), attn=(0.6,)),
            ),
        ),
        normalize=True,
        dtype="bfloat16",
    )
    assert r == expected  # the base is not a task vector; int8_mask has no meaning here


def test_from_mergekit_slerp():
    r = from_mergekit(yaml.safe_load(MERGEKIT_SLERP), names=MISTRAL)
    assert r.method == "slerp"
    assert [m.path for m in r.models] == [
        "OpenPipe/mistral-ft-optimized-1218",
        "mlabonne/NeuralHermes-2.5-Mistral-7B",
    ]
    assert r.base is None
    assert r.t == LayerParam(
        default=(0.5,), attn=(0.0, 0.5, 0.3, 0.7, 1.0), mlp=(1.0, 0.5, 0.7, 0.3, 0.0)
    )
    assert r.dtype == "bfloat16"


def test_from_mergekit_slerp_base_listed_second():
    data = yaml.safe_load(MERGEKIT_SLERP)
    data["models"].reverse()
    r = from_mergekit(data, names=MISTRAL)
    assert r.models[0].path == data["base_model"]  # t = 0 is mergekit's base model


@pytest.mark.parametrize("text", [MERGEKIT_TIES, MERGEKIT_SLERP])
def test_mergekit_round_trip_both_ways(text):
    r = from_mergekit(yaml.safe_load(text), names=MISTRAL)
    back = to_mergekit(r)
    assert back.startswith("# converted from a basin recipe")
    assert from_mergekit(yaml.safe_load(back), names=MISTRAL) == r


def test_to_mergekit_ties_structure():
    r = parse(FULL)
    with pytest.raises(
        MergeError, match="mergekit gives the final norm and the head a list's first value"
    ):
        to_mergekit(r)  # density [0.3, 0.8] over depth: lm_head would get 0.3 there, 0.8 here
    data = yaml.safe_load(to_mergekit(r, top_names=["model.norm.weight", "lm_head.weight"]))
    assert data["merge_method"] == "ties"
    assert data["base_model"] == "path/to/base"
    assert data["dtype"] == "bfloat16"
    assert data["models"][0] == {
        "model": "path/to/code-ft",
        "parameters": {
            "weight": 0.7,
            "density": [
                {"filter": "model.norm.weight", "value": 0.8},
                {"filter": "lm_head.weight", "value": 0.8},
                {"value": [0.3, 0.8]},
            ],
        },
    }
    assert data["models"][1]["parameters"]["weight"] == [
        {"filter": "attn", "value": 0.2},
        {"filter": "mlp", "value": [0.4, 0.9]},
        {"value": 0.5},
    ]
    assert data["parameters"]["lambda"][-1] == {"value": [0.9, 1.1]}
    assert data["parameters"]["normalize"] is False
    assert "seed" not in data["parameters"]
    # the seed is lost on the way; all else comes back
    assert from_mergekit(data, names=MISTRAL) == MergeRecipe(**{**r.__dict__, "seed": 0})


def test_to_mergekit_slerp_structure():
    r = parse("method: slerp\nmodels: [a, b]\nparameters: {t: [0.2, 0.5, 0.2]}\n")
    data = yaml.safe_load(to_mergekit(r))
    assert data["merge_method"] == "slerp"
    assert data["base_model"] == "a"
    assert data["models"] == [{"model": "a"}, {"model": "b"}]
    assert data["parameters"]["t"] == [0.2, 0.5, 0.2]
    assert from_mergekit(data) == r


def test_from_mergekit_refuses_a_list_that_would_change_the_head():
    data = {
        "merge_method": "task_arithmetic",
        "base_model": "b",
        "models": [{"model": "a", "parameters": {"weight": [0.2, 0.8]}}],
    }
    with pytest.raises(MergeError, match="first value of \\[0.2, 0.8\\]"):
        from_mergekit(data)  # without the names: the head's value is all that can be told
    with pytest.raises(MergeError, match=r"lm_head.weight \(mergekit 0.2, basin 0.8\)"):
        from_mergekit(data, names=MISTRAL)
    data["models"][0]["parameters"]["weight"] = [
        {"filter": "lm_head", "value": 0.8},
        {"filter": "model.norm", "value": 0.8},
        {"value": [0.2, 0.8]},
    ]
    assert from_mergekit(data, names=MISTRAL).models[0].weight == LayerParam(default=(0.2, 0.8))
    data["models"][0]["parameters"]["weight"][0]["value"] = 0.5  # a head value basin cannot give
    with pytest.raises(MergeError, match=r"lm_head.weight \(mergekit 0.5, basin 0.8\)"):
        from_mergekit(data, names=MISTRAL)


def test_to_mergekit_linear_has_no_density():
    data = yaml.safe_load(to_mergekit(parse("method: linear\nmodels: [{path: a, weight: 2}, b]\n")))
    assert all("density" not in m["parameters"] for m in data["models"])
    assert "base_model" not in data


def test_to_mergekit_dare_is_refused_unless_approximate():
    recipe = parse(
        "method: dare_ties\nbase: B\nmodels: [{path: a, density: 0.5}]\nparameters: {seed: 7}\n"
    )
    with pytest.raises(
        MergeError, match="dare_ties drops entries at random.*L1 norm.*--approximate"
    ):
        to_mergekit(recipe)
    text = to_mergekit(recipe, approximate=True)
    assert "approximate" in text.splitlines()[0] and "seed 7" in text.splitlines()[0]
    data = yaml.safe_load(text)
    with pytest.raises(MergeError, match="from mergekit anyway"):
        from_mergekit(data)
    assert from_mergekit(data, approximate=True) == MergeRecipe(**{**recipe.__dict__, "seed": 0})


@pytest.mark.parametrize(
    "method,extra",
    [
        ("breadcrumbs", {"gamma": 0.02}),
        ("breadcrumbs_ties", {"gamma": 0.03}),
        ("della", {"epsilon": 0.1}),
        ("della_linear", {"epsilon": 0.05}),
        ("model_stock", {}),
    ],
)
def test_new_methods_convert_both_ways(method, extra):
    models = [{"path": p, "weight": 0.6, "density": 0.4, **extra} for p in ("a", "c")]
    if method == "model_stock":
        models = [{"path": "a"}, {"path": "c"}]
    recipe = recipe_from_dict({"method": method, "base": "B", "models": models})
    approximate = method.startswith("della")
    data = yaml.safe_load(to_mergekit(recipe, approximate=approximate))
    assert data["merge_method"] == method
    if method == "model_stock":
        assert data["models"] == [{"model": "a"}, {"model": "c"}] and data["parameters"] == {}
    else:
        assert data["models"][0]["parameters"] == {"weight": 0.6, "density": 0.4, **extra}
    assert from_mergekit(data, approximate=approximate) == recipe


@pytest.mark.parametrize(
    "base,over,flags",
    [
        ("B", "tensor", {}),  # task vectors, whole tensors: mergekit's defaults
        ("B", "rows", {"nuslerp_flatten": False, "nuslerp_row_wise": False}),
        # the models themselves
        (None, "columns", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ],
)
def test_nuslerp_converts_both_ways(base, over, flags):
    data = {
        "method": "nuslerp",
        "models": [{"path": "a", "weight": 0.7}, {"path": "c", "weight": 0.3}],
        "parameters": {"slerp_over": over},
        **({"base": base} if base else {}),
    }
    recipe = recipe_from_dict(data)
    assert recipe.slerp_over == over
    theirs = yaml.safe_load(to_mergekit(recipe))
    assert theirs["merge_method"] == "nuslerp" and theirs.get("base_model") == base
    assert theirs["parameters"] == flags
    assert [m["parameters"] for m in theirs["models"]] == [{"weight": 0.7}, {"weight": 0.3}]
    assert from_mergekit(theirs) == recipe
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


@pytest.mark.parametrize(
    "data,words",
    [
        (
            {"method": "ties", "base": "B", "models": ["a"], "parameters": {"slerp_over": "rows"}},
            ["slerp_over", "only nuslerp reads"],
        ),
        (
            {"method": "nuslerp", "models": ["a", "c"], "parameters": {"slerp_over": "row"}},
            ["unknown parameters.slerp_over 'row'", "did you mean 'rows'", "tensor, rows, columns"],
        ),
        (
            {"method": "nuslerp", "models": ["a", "c", "d"]},
            ["nuslerp merges exactly two models", "3"],
        ),
    ],
)
def test_slerp_over_is_checked(data, words):
    with pytest.raises(MergeError) as err:
        recipe_from_dict(data)
    for word in words:
        assert word in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "data,words",
    [
        ({"models": []}, ["not a mergekit config", "merge_method"]),
        ({"merge_method": "ties", "slices": [], "base_model": "b"}, ["slices", "not supported"]),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [
                    {
                        "model": "a",
                        "parameters": {
                            "weight": [{"filter": "input_layernorm", "value": 1}, {"value": 1}]
                        },
                    }
                ],
            },
            ["filter 'input_layernorm'", "is a substring of tensor names"],
        ),
        (
            {"merge_method": "tie", "base_model": "b", "models": [{"model": "a"}]},
            ["did you mean 'ties'"],
        ),
        ({"merge_method": "ties", "models": [{"model": "a"}]}, ["needs 'base'"]),
        # parameters basin does not know are refused by name, not dropped
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a"}],
                "parameters": {"epsilon": 0.1},
            },
            ["parameters: epsilon has no basin equivalent"],
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a"}],
                "parameters": {"rescale": True},
            },
            ["parameters.rescale", "L1 norm"],
        ),
        (
            {
                "merge_method": "model_stock",
                "base_model": "b",
                "models": [{"model": "a"}, {"model": "c"}],
                "parameters": {"filter_wise": True},
            },
            ["filter_wise", "per row"],
        ),
        (
            {"merge_method": "nearswap", "base_model": "b", "models": [{"model": "a"}]},
            ["unknown method 'nearswap'"],
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [
                    {"model": "a", "parameters": {"weight": 1, "density": 0.5, "gamma": 0.01}}
                ],
            },
            ["models[0].parameters: gamma has no basin equivalent"],
        ),
        (
            {
                "merge_method": "nuslerp",
                "models": [{"model": "a"}, {"model": "c"}],
                "parameters": {"nuslerp_flatten": "no"},
            },
            ["parameters.nuslerp_flatten", "true or false"],
        ),
        (
            {
                "merge_method": "nuslerp",
                "models": [{"model": "a"}, {"model": "c"}],
                "parameters": {"normalize": True},
            },
            ["parameters: normalize has no basin equivalent for nuslerp"],
        ),
        # a filter narrower than all attention tensors is refused, not widened to all of them
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [
                    {
                        "model": "a",
                        "parameters": {
                            "weight": [{"filter": "q_proj", "value": 1}, {"value": 0.5}]
                        },
                    }
                ],
            },
            ["filter 'q_proj' is a substring of tensor names", "models at hand as local folders"],
        ),
    ],
)
def test_from_mergekit_errors(data, words):
    with pytest.raises(MergeError) as err:
        from_mergekit(data)
    for word in words:
        assert word in str(err.value), str(err.value)


# Malformed mergekit files must give a MergeError (exit 2 with a message), not a crash or a
# recipe with invented model paths.


def test_from_mergekit_slerp_without_base_model_is_an_error():
    data = {"merge_method": "slerp", "models": [{"model": "a"}], "parameters": {"t": 0.5}}
    with pytest.raises(MergeError, match="base_model"):
        recipe = from_mergekit(data)
        assert "None" not in [m.path for m in recipe.models]


@pytest.mark.parametrize(
    "data",
    [
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp"}, {"value": 1}]}}],
        },
        {"merge_method": "ties", "base_model": "b", "models": ["a"]},
    ],
    ids=["filter-without-value", "model-as-string"],
)
def test_from_mergekit_malformed_entries_are_merge_errors(data):
    with pytest.raises(MergeError):
        from_mergekit(data)
