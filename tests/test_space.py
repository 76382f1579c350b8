"""search/space.py: trial -> params -> MergeRecipe, with real Optuna trials and real merges.

Parameter names are documented in search/space.py: `method`, `weight.<model>[.<attn|mlp>][.<slot>]`,
`density.<model>...`, `lambda`, `t`; slots `g<j>` per group of layers, `a<j>` per anchor depth.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FixedTrial, TrialState
from safetensors.torch import load_file

from merging import ResidentMerger, load_live_model, recipe_from_dict, recipe_to_dict
from merging.catalog import METHODS
from search.config import config_from_dict
from search.space import (
    SearchSpace,
    baseline_params,
    build_space,
    num_layers_of,
    recipe_from_params,
    suggest,
)
from tests.support.tiny import build_model

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")

DENSITY_METHODS = {
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
LAMBDA_METHODS = {"task_arithmetic"} | DENSITY_METHODS
GAMMA_METHODS = {"breadcrumbs", "breadcrumbs_ties"}
EPSILON_METHODS = {"della", "della_linear"}
NO_WEIGHT_METHODS = {"slerp", "model_stock"}


def make_space(
    tmp_path: Path,
    space: dict[str, Any],
    *,
    finetunes: tuple[str, ...] = ("ft_a", "ft_b"),
    num_layers: int = 4,
    base: str | None = None,
) -> SearchSpace:
    """A SearchSpace built the way the study builds it: config -> build_space(base folder)."""
    base_dir = Path(base) if base else tmp_path / "base"
    if not (base_dir / "config.json").is_file():
        base_dir.mkdir(parents=True, exist_ok=True)
        (base_dir / "config.json").write_text(json.dumps({"num_hidden_layers": num_layers}))
    config = config_from_dict(
        {
            "study": {"name": "space-test"},
            "models": {"base": str(base_dir), "finetunes": list(finetunes)},
            "space": space,
            "evaluator": {"tasks": ["t"]},
            "objectives": {"items": [{"task": "t"}]},
        }
    )
    return build_space(config, base_dir)


def random_trials(space: SearchSpace, n: int, seed: int = 0, storage: Any = None):
    """Finish n real Optuna trials over the space; returns the study and the recipes built at
    suggest time."""
    study = optuna.create_study(
        storage=storage, study_name="s", sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    built: dict[int, tuple[dict[str, Any], Any]] = {}

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        built[trial.number] = (params, recipe_from_params(params, space))
        return 0.0

    study.optimize(objective, n_trials=n)
    return study, built


# --- method-conditional parameters ----------------------------------------------------------------


def test_suggest_is_method_conditional_in_a_real_study(tmp_path):
    space = make_space(tmp_path, {"methods": list(METHODS), "lambda": [0.5, 1.5]})
    study, built = random_trials(space, 150)
    seen = set()
    for trial in study.trials:
        method = trial.params["method"]
        seen.add(method)
        keys = set(trial.params)
        has_density = any(k.startswith("density.") for k in keys)
        has_weight = any(k.startswith("weight.") for k in keys)
        assert has_density == (method in DENSITY_METHODS), (method, keys)
        assert ("lambda" in keys) == (method in LAMBDA_METHODS), (method, keys)
        assert ("t" in keys) == (method == "slerp"), (method, keys)
        assert has_weight == (method not in NO_WEIGHT_METHODS), (method, keys)
        assert any(k.startswith("gamma.") for k in keys) == (method in GAMMA_METHODS), (
            method,
            keys,
        )
        assert any(k.startswith("epsilon.") for k in keys) == (method in EPSILON_METHODS), (
            method,
            keys,
        )
        if method == "slerp":
            assert keys == {"method", "t"}
        if method == "model_stock":
            assert keys == {"method"}
        # suggest returned exactly what the trial asked for (every value here is free)
        assert built[trial.number][0] == trial.params
    assert seen == set(METHODS)


def test_nuslerp_searches_the_weights_and_takes_slerp_over_from_the_space(tmp_path):
    space = make_space(tmp_path, {"methods": ["nuslerp", "ties"], "slerp_over": "columns"})
    study, built = random_trials(space, 30)
    seen = set()
    for params, recipe in built.values():
        seen.add(recipe.method)
        if recipe.method == "nuslerp":
            assert set(params) == {"method", *(f"weight.{m}" for m in space.model_names)}
            assert recipe.slerp_over == "columns" and recipe.base == space.base
            assert [m.weight.at(0.5, "mlp") for m in recipe.models] == [
                params[f"weight.{m}"] for m in space.model_names
            ]
        else:
            assert recipe.slerp_over == "tensor"  # other methods read no slerp_over
    assert seen == {"nuslerp", "ties"}


@pytest.mark.parametrize("method", METHODS)
def test_fixed_trial_params_per_method(tmp_path, method):
    space = make_space(tmp_path, {"methods": list(METHODS), "lambda": [0.5, 1.5]})
    values = {"method": method, "t": 0.25, "lambda": 1.25}
    for m in space.model_names:
        values[f"weight.{m}"] = 0.5
        values[f"density.{m}"] = 0.75
        values[f"gamma.{m}"] = 0.02
        values[f"epsilon.{m}"] = 0.1
    params = suggest(FixedTrial(values), space)
    expected = {"method"}
    if method == "slerp":
        expected.add("t")
    elif method not in NO_WEIGHT_METHODS:
        expected |= {f"weight.{m}" for m in space.model_names}
    if method in GAMMA_METHODS:
        expected |= {f"gamma.{m}" for m in space.model_names}
    if method in EPSILON_METHODS:
        expected |= {f"epsilon.{m}" for m in space.model_names}
    if method in DENSITY_METHODS:
        expected |= {f"density.{m}" for m in space.model_names}
    if method in LAMBDA_METHODS:
        expected.add("lambda")
    assert set(params) == expected
    recipe = recipe_from_params(params, space)
    assert recipe.method == method
    if method in LAMBDA_METHODS:
        assert recipe.lam.default == (1.25,)
    if method == "slerp":
        assert recipe.t.default == (0.25,)
    if method in DENSITY_METHODS:
        assert all(e.density.default == (0.75,) for e in recipe.models)
    else:  # a method without density keeps every entry
        assert all(e.density.default == (1.0,) for e in recipe.models)
    if method in GAMMA_METHODS:
        assert all(e.gamma.default == (0.02,) for e in recipe.models)
    if method in EPSILON_METHODS:
        assert all(e.epsilon.default == (0.1,) for e in recipe.models)


def test_single_method_is_not_a_parameter_and_fixed_values_are_returned(tmp_path):
    space = make_space(tmp_path, {"methods": ["ties"], "density": 0.3, "lambda": 0.7})
    trial_values = {"weight.ft_a": 0.2, "weight.ft_b": 0.9}
    params = suggest(FixedTrial(trial_values), space)
    assert params == {
        "method": "ties",
        **trial_values,
        "density.ft_a": 0.3,
        "density.ft_b": 0.3,
        "lambda": 0.7,
    }
    study, _ = random_trials(space, 3)
    # only free values are asked
    assert set(study.trials[0].params) == {"weight.ft_a", "weight.ft_b"}


# --- granularity: names and LayerParam shapes -----------------------------------------------------


def test_granularity_model(tmp_path):
    space = make_space(
        tmp_path, {"methods": ["ties"], "granularity": "model", "lambda": 1.0}, num_layers=5
    )
    assert space.slots == ("",)
    assert space.names("weight", "ft_a") == ["weight.ft_a"]
    params = suggest(
        FixedTrial(
            {"weight.ft_a": 0.1, "weight.ft_b": 0.2, "density.ft_a": 0.3, "density.ft_b": 0.4}
        ),
        space,
    )
    recipe = recipe_from_params(params, space)
    assert recipe.models[0].weight.default == (0.1,) and recipe.models[0].weight.attn is None
    assert recipe.models[1].density.default == (0.4,)


def test_granularity_group_one_value_per_layer(tmp_path):
    space = make_space(
        tmp_path,
        {"methods": ["ties"], "granularity": "group", "group_size": 2, "lambda": 1.0},
        num_layers=5,
    )
    assert space.slots == ("g0", "g1", "g2")  # ceil(5 / 2)
    assert space.names("weight", "ft_a") == ["weight.ft_a.g0", "weight.ft_a.g1", "weight.ft_a.g2"]
    assert space.names("density", "ft_b") == [
        "density.ft_b.g0",
        "density.ft_b.g1",
        "density.ft_b.g2",
    ]
    values = {
        f"{kind}.{m}.g{j}": round(0.1 * (j + 1) + (0.05 if m == "ft_b" else 0.0), 3)
        for kind in ("weight", "density")
        for m in ("ft_a", "ft_b")
        for j in range(3)
    }
    recipe = recipe_from_params(values, space)
    w = recipe.models[0].weight
    assert len(w.default) == 5  # one value per layer
    assert w.default == (0.1, 0.1, 0.2, 0.2, 0.3)  # each layer its group's value
    assert recipe.models[1].density.default == (0.15, 0.15, 0.25, 0.25, 0.35)


def test_granularity_anchors(tmp_path):
    space = make_space(
        tmp_path,
        {"methods": ["task_arithmetic"], "granularity": "anchors", "anchors": 3, "lambda": 1.0},
        num_layers=6,
    )
    assert space.slots == ("a0", "a1", "a2")
    assert space.names("weight", "ft_b") == ["weight.ft_b.a0", "weight.ft_b.a1", "weight.ft_b.a2"]
    values = {f"weight.{m}.a{j}": 0.1 * (j + 1) for m in ("ft_a", "ft_b") for j in range(3)}
    recipe = recipe_from_params(values, space)
    assert recipe.models[0].weight.default == pytest.approx((0.1, 0.2, 0.3))
    assert len(recipe.models[0].weight.default) == 3  # N anchor values, interpolated over depth
    # more anchors than layers: one per layer at most
    small = make_space(
        tmp_path / "small",
        {"methods": ["ties"], "granularity": "anchors", "anchors": 8},
        num_layers=4,
    )
    assert small.slots == ("a0", "a1", "a2", "a3")


def test_split_attn_mlp_with_groups(tmp_path):
    space = make_space(
        tmp_path,
        {"methods": ["dare_ties"], "granularity": "group", "group_size": 2, "split_attn_mlp": True},
        num_layers=4,
    )
    names = space.names("weight", "ft_a")
    assert names == [
        "weight.ft_a.attn.g0",
        "weight.ft_a.attn.g1",
        "weight.ft_a.mlp.g0",
        "weight.ft_a.mlp.g1",
        "weight.ft_a",
    ]
    study, built = random_trials(space, 2)
    keys = set(study.trials[0].params)
    for m in ("ft_a", "ft_b"):
        for kind in ("weight", "density"):
            assert set(space.names(kind, m)) <= keys
    params, recipe = built[0]
    entry = recipe.models[0]
    assert entry.weight.default == (params["weight.ft_a"],)  # norms, embeddings, head
    assert entry.weight.attn == tuple(params[f"weight.ft_a.attn.g{i // 2}"] for i in range(4))
    assert entry.weight.mlp == tuple(params[f"weight.ft_a.mlp.g{i // 2}"] for i in range(4))
    assert entry.density.mlp == tuple(params[f"density.ft_a.mlp.g{i // 2}"] for i in range(4))


def test_split_attn_mlp_model_granularity_names(tmp_path):
    space = make_space(tmp_path, {"methods": ["ties"], "split_attn_mlp": True})
    assert space.names("density", "ft_b") == [
        "density.ft_b.attn",
        "density.ft_b.mlp",
        "density.ft_b",
    ]
    study, built = random_trials(space, 1)
    params, recipe = built[0]
    # each the sampled value put on the grid of 0.001 (the sampler searches the range unstepped)
    density = recipe.models[1].density
    for got, name in ((density.attn, "attn"), (density.mlp, "mlp"), (density.default, "")):
        (value,) = got
        assert value == round(params[f"density.ft_b.{name}".rstrip(".")], 3)
        assert len(repr(value).split(".")[1]) <= 3


def test_parameter_names_are_safe_and_distinct(tmp_path):
    space = make_space(
        tmp_path,
        {"methods": ["ties"]},
        finetunes=("runs/a/final model", "runs/b/final model", "x/ft.v2"),
    )
    assert space.model_names == ("final_model", "final_model_2", "ft_v2")
    for name in space.model_names:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name)


def test_num_layers_of_reads_the_config_only(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 7}))
    assert num_layers_of(tmp_path) == 7
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 3}}))
    assert num_layers_of(tmp_path) == 3
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="layer count"):
        num_layers_of(tmp_path)


# --- stored params rebuild the exact recipe -------------------------------------------------------


SPACES = [
    {"methods": list(METHODS)},
    {
        "methods": ["ties", "dare_ties"],
        "granularity": "anchors",
        "anchors": 3,
        "split_attn_mlp": True,
        "density": 0.3,
        "lambda": 0.7,
        "seed": 11,
    },
    {
        "methods": ["task_arithmetic", "linear"],
        "granularity": "group",
        "group_size": 3,
        "weight": [-0.5, 1.5],
        "lambda": [0.2, 2.0],
        "normalize": True,
    },
]


@pytest.mark.parametrize("space_cfg", SPACES)
def test_stored_params_rebuild_the_recipe_built_at_suggest_time(tmp_path, space_cfg):
    space = make_space(tmp_path, space_cfg, num_layers=7)
    journal = tmp_path / "journal.log"
    _, built = random_trials(
        space, 25, seed=3, storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    # reload from the file, as `basin export` or `basin resume` would
    stored = optuna.load_study(
        study_name="s", storage=JournalStorage(JournalFileBackend(str(journal)))
    )
    trials = stored.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 25
    for trial in trials:
        rebuilt = recipe_from_params(trial.params, space)
        assert rebuilt == built[trial.number][1]
        assert recipe_from_params(dict(trial.params), space) == rebuilt  # pure
        # what the worker receives (the YAML dict) means the same recipe
        assert recipe_from_dict(recipe_to_dict(rebuilt)) == rebuilt
        assert rebuilt.seed == space_cfg.get("seed", 0)
        assert rebuilt.normalize == space_cfg.get("normalize")
        if (
            "lambda" in space_cfg
            and not isinstance(space_cfg["lambda"], list)
            and rebuilt.method != "slerp"
        ):
            assert rebuilt.lam.default == (space_cfg["lambda"],)  # fixed values come from the space
        if space_cfg.get("density") == 0.3:
            assert all(set(e.density.all_values()) == {0.3} for e in rebuilt.models)


def test_in_memory_trial_params_rebuild_the_recipe(tmp_path):
    space = make_space(tmp_path, {"methods": ["dare_linear", "slerp"], "split_attn_mlp": True})
    study, built = random_trials(space, 20, seed=5)
    for trial in study.trials:
        assert recipe_from_params(trial.params, space) == built[trial.number][1]


# --- baselines ------------------------------------------------------------------------------------


def enqueue_baselines(
    space: SearchSpace,
) -> list[tuple[str, dict[str, Any], optuna.trial.FrozenTrial]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    baselines = baseline_params(space)
    for name, params in baselines:
        study.enqueue_trial(params, user_attrs={"baseline": name})
    out = []
    for name, params in baselines:
        trial = study.ask()
        assert trial.user_attrs["baseline"] == name
        suggest(trial, space)
        study.tell(trial, 0.0)
        out.append((name, params, study.trials[trial.number]))
    return out


@pytest.mark.parametrize(
    "space_cfg",
    [
        {"methods": ["ties"]},
        {"methods": ["linear", "task_arithmetic", "ties"], "lambda": [0.2, 2.0]},
        {
            "methods": ["task_arithmetic"],
            "granularity": "group",
            "group_size": 2,
            "lambda": [0.5, 1.5],
        },
        {
            "methods": ["dare_ties", "ties", "linear"],
            "granularity": "anchors",
            "split_attn_mlp": True,
        },
        {"methods": ["slerp"]},
    ],
)
def test_baseline_params_are_expressible_in_the_space(tmp_path, space_cfg):
    space = make_space(tmp_path, space_cfg, num_layers=4)
    runs = enqueue_baselines(space)
    names = [name for name, _, _ in runs]
    assert len(names) == len(set(names))
    assert names, "every searchable space has some baseline"
    for name, params, trial in runs:
        # the trial took exactly the baseline's values, and each lies inside its distribution
        assert {k: trial.params[k] for k in params} == params, name
        assert set(trial.params) == set(params), name
        for key, value in trial.params.items():
            dist = trial.distributions[key]
            if isinstance(dist, optuna.distributions.FloatDistribution):
                assert dist.low <= value <= dist.high, (name, key, value, dist)
            else:
                assert value in dist.choices, (name, key, value)
        recipe_from_params(trial.params, space)  # a valid recipe


def test_expected_baselines_per_space(tmp_path):
    many = make_space(
        tmp_path / "a",
        {"methods": ["linear", "task_arithmetic", "ties"]},
        finetunes=("x", "y", "z"),
    )
    assert [n for n, _ in baseline_params(many)] == [
        "alone:x",
        "alone:y",
        "alone:z",
        "uniform",
        "task_arithmetic",
        "ties",
    ]
    slerp = make_space(tmp_path / "b", {"methods": ["slerp"]})
    assert [n for n, _ in baseline_params(slerp)] == ["alone:ft_a", "alone:ft_b"]


# --- baselines mean what they say: real merges of tiny models -------------------------------------


@dataclass(repr=False)  # a short repr keeps failure reports readable
class Tiny:
    base: Path
    finetunes: list[Path]
    states: list[dict[str, torch.Tensor]]  # base first, then the fine-tunes
    merger: ResidentMerger  # base + the three fine-tunes
    live: Any

    def __repr__(self) -> str:
        return f"Tiny({self.base.parent})"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("space_models")
    base = build_model(root / "base", seed=0)
    finetunes = [build_model(root / f"ft{i}", seed=i) for i in (1, 2, 3)]
    states = [load_file(str(p / "model.safetensors")) for p in (base, *finetunes)]
    merger = ResidentMerger(str(base), [str(p) for p in finetunes])
    return Tiny(base, finetunes, states, merger, load_live_model(str(base)))


def merged_state(merger: ResidentMerger, live, recipe) -> dict[str, torch.Tensor]:
    merger.apply(recipe, live)
    return {name: value.detach().clone() for name, value in live.state_dict().items()}


def assert_state_close(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str
) -> None:
    """Every tensor equal up to float rounding (atol 1e-6); the message lists the tensors that
    differ."""
    assert set(expected) <= set(actual)
    far = {name: float((actual[name] - value).abs().max()) for name, value in expected.items()}
    bad = {name: diff for name, diff in far.items() if diff > 1e-6}
    assert not bad, f"{what}: {len(bad)} of {len(far)} tensors differ, e.g. " + ", ".join(
        f"{n} by {d:.3g}" for n, d in list(bad.items())[:3]
    )


def tiny_space(tmp_path, tiny: Tiny, space_cfg, n_models: int = 3) -> SearchSpace:
    return make_space(
        tmp_path,
        space_cfg,
        finetunes=tuple(str(p) for p in tiny.finetunes[:n_models]),
        base=str(tiny.base),
    )


BASELINE_SPACES = {
    "ties-default": {"methods": ["ties"]},
    "linear+ta+ties": {"methods": ["linear", "task_arithmetic", "ties"], "lambda": [0.2, 2.0]},
    "task_arithmetic-lambda-range": {"methods": ["task_arithmetic"], "lambda": [0.5, 1.5]},
    "dare_linear+ties-groups": {"methods": ["dare_linear", "ties"], "granularity": "group"},
    # the space's fixed values must not change what a baseline means
    "ties-fixed-lambda": {"methods": ["ties"], "lambda": 0.7},
    "ties-fixed-density": {"methods": ["ties"], "density": 0.5},
    "task_arithmetic-fixed-lambda": {"methods": ["task_arithmetic"], "lambda": 0.5},
}


@pytest.mark.parametrize("key", list(BASELINE_SPACES))
def test_alone_and_uniform_baselines_merge_to_what_they_say(tmp_path, tiny, key):
    space = tiny_space(tmp_path, tiny, BASELINE_SPACES[key])
    base_state, ft_states = tiny.states[0], tiny.states[1:]
    baselines = dict(baseline_params(space))
    assert baselines, key
    if key == "ties-fixed-lambda":  # lambda 0.7 on every recipe: no fine-tune alone is expressible
        assert not any(name.startswith(("alone:", "uniform")) for name in baselines)
    for i, model in enumerate(space.model_names):
        if f"alone:{model}" in baselines:
            recipe = recipe_from_params(baselines[f"alone:{model}"], space)
            assert_state_close(
                merged_state(tiny.merger, tiny.live, recipe),
                ft_states[i],
                f"{key} alone:{model} ({recipe.method})",
            )
    if "uniform" in baselines:
        recipe = recipe_from_params(baselines["uniform"], space)
        average = {n: sum(s[n] for s in ft_states) / len(ft_states) for n in base_state}
        assert_state_close(
            merged_state(tiny.merger, tiny.live, recipe),
            average,
            f"{key} uniform ({recipe.method})",
        )


def test_task_arithmetic_baseline_is_plain_task_arithmetic(tmp_path, tiny):
    space = tiny_space(
        tmp_path, tiny, {"methods": ["task_arithmetic", "ties"], "lambda": [0.2, 2.0]}
    )
    base_state, ft_states = tiny.states[0], tiny.states[1:]
    recipe = recipe_from_params(dict(baseline_params(space))["task_arithmetic"], space)
    expected = {
        n: base_state[n] + 0.5 * sum(s[n] - base_state[n] for s in ft_states) for n in base_state
    }
    assert_state_close(
        merged_state(tiny.merger, tiny.live, recipe), expected, "task_arithmetic baseline"
    )
    ties = recipe_from_params(dict(baseline_params(space))["ties"], space)
    assert ties.method == "ties" and ties.lam.default == (1.0,)
    assert all(e.weight.default == (1.0,) and e.density.default == (0.5,) for e in ties.models)


def test_slerp_alone_baselines_are_the_two_models(tmp_path, tiny):
    two = ResidentMerger(str(tiny.base), [str(p) for p in tiny.finetunes[:2]])
    space = tiny_space(tmp_path, tiny, {"methods": ["slerp"]}, n_models=2)
    baselines = dict(baseline_params(space))
    for i, model in enumerate(space.model_names):
        recipe = recipe_from_params(baselines[f"alone:{model}"], space)
        assert_state_close(
            merged_state(two, tiny.live, recipe), tiny.states[1 + i], f"slerp alone:{model}"
        )
