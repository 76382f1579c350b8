"""The user's own recipes as baselines (baselines.recipes): placed in the space or not, hidden from
the sampler when not, and scored, reported and exported like any trial (real tiny Llama, real
Optuna storage, real merges)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState, create_trial
from safetensors.torch import load_file

from merging.recipe import LayerParam, MergeRecipe, ModelEntry, recipe_to_dict
from search import attrs
from search.config import ConfigError, SpaceSection, config_from_dict
from search.sampler_view import SearchedOnly
from search.setup import make_sampler
from search.space import SearchSpace, recipe_from_params
from search.user_recipes import place_in_space
from tests.support.runs import BASIN, REPO
from tests.support.tiny import write_text_corpus

MODELS = ("/m/a", "/m/b")


def space(num_layers: int = 4, **cfg) -> SearchSpace:
    section = SpaceSection(**{"methods": ["ties", "task_arithmetic"], **cfg})
    return SearchSpace(section, "/m/base", MODELS, ("a", "b"), num_layers, "float32")


def recipe(method: str = "ties", weights=(0.3, 0.7), **kw) -> MergeRecipe:
    density = kw.pop("density", 0.5)
    entries = tuple(
        ModelEntry(
            path=p,
            weight=w if isinstance(w, LayerParam) else LayerParam.constant(w),
            density=LayerParam.constant(density),
        )
        for p, w in zip(MODELS, weights)
    )
    return MergeRecipe(method=method, models=entries, base="/m/base", **kw)


def same_merge(a: MergeRecipe, b: MergeRecipe, num_layers: int) -> bool:
    """Every value the merge reads, at every layer and part, agrees."""
    depths = [i / (num_layers - 1) for i in range(num_layers)]
    for x, y in zip(a.models, b.models):
        for kind in ("weight", "density"):
            for d in depths:
                for part in ("attn", "mlp", "other"):
                    if abs(getattr(x, kind).at(d, part) - getattr(y, kind).at(d, part)) > 1e-9:
                        return False
    return a.method == b.method and abs(a.lam.at(0, "other") - b.lam.at(0, "other")) < 1e-9


def test_a_recipe_that_is_a_point_of_the_space_gives_params_that_rebuild_it():
    s = space()
    mine = recipe(lam=LayerParam.constant(0.8))
    params, why = place_in_space(mine, s)
    assert why is None
    assert params["method"] == "ties" and params["weight.a"] == pytest.approx(0.3)
    assert same_merge(recipe_from_params(params, s), mine, 4)


def test_values_over_depth_are_placed_on_the_space_anchors_and_groups():
    over = LayerParam(default=(0.0, 0.5, 1.0))
    mine = recipe(weights=(over, 0.4))
    params, why = place_in_space(mine, space(granularity="anchors", anchors=3))
    assert why is None and [params[f"weight.a.a{j}"] for j in range(3)] == [0.0, 0.5, 1.0]
    # one value per layer: four layers, groups of two
    per_layer = LayerParam(default=(0.2, 0.2, 0.6, 0.6))
    params, why = place_in_space(
        recipe(weights=(per_layer, 0.4)), space(granularity="group", group_size=2)
    )
    assert why is None and (params["weight.a.g0"], params["weight.a.g1"]) == (0.2, 0.6)
    # a layer off its group's value is no point of that space
    _, why = place_in_space(
        recipe(weights=(LayerParam(default=(0.2, 0.3, 0.6, 0.6)), 0.4)),
        space(granularity="group", group_size=2),
    )
    assert "weight of a is 0.3 at layer 1" in why and "one value per 2 layers" in why


def test_attention_and_mlp_values_need_a_space_that_splits_them():
    split = LayerParam(default=(0.5,), attn=(0.2,), mlp=(0.9,))
    mine = recipe(weights=(split, 0.5))
    _, why = place_in_space(mine, space())
    assert "cannot express" in why and "attention and MLP differ" in why
    params, why = place_in_space(mine, space(split_attn_mlp=True))
    assert why is None
    assert (params["weight.a.attn"], params["weight.a.mlp"], params["weight.a"]) == (0.2, 0.9, 0.5)


@pytest.mark.parametrize(
    ("mine", "cfg", "expected"),
    [
        (recipe(method="dare_ties"), {}, "its method 'dare_ties' is not among space.methods"),
        (recipe(weights=(1.2, 0.5)), {}, "weight.a is 1.2, outside space.weight [0, 1]"),
        (recipe(), {"weight": 0.5}, "weight of a is 0.3 at layer 0; the space fixes weight at 0.5"),
        (recipe(density=0.3333), {}, "on the 0.001 grid the space searches"),
        (recipe(normalize=False), {}, "it sets normalize: False, the space True"),
        (recipe(weights=(LayerParam(default=(0.1, 0.9)), 0.5)), {}, "one value per model"),
    ],
)
def test_a_recipe_outside_the_space_says_why(mine, cfg, expected):
    params, why = place_in_space(mine, space(**cfg))
    assert params is None and expected in why


class _Recording(optuna.samplers.RandomSampler):
    """A real sampler that keeps what it was shown."""

    def __init__(self):
        super().__init__(seed=0)
        self.shown: list[int] = []

    def sample_independent(self, study, trial, name, distribution):
        self.shown = [t.number for t in study.get_trials(deepcopy=False)]
        return super().sample_independent(study, trial, name, distribution)


def _study_with_a_hidden_trial(sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    dist = {n: optuna.distributions.FloatDistribution(0, 1) for n in ("x", "y")}
    for i in range(12):
        study.add_trial(
            create_trial(
                values=[i / 12], params={"x": i / 12, "y": 0.5 + i / 48}, distributions=dist
            )
        )
    outside = {attrs.BASELINE: "mine", attrs.RECIPE: {"method": "slerp"}}
    study.add_trial(create_trial(values=[2.0], params={}, distributions={}, user_attrs=outside))
    return study


@pytest.mark.parametrize("name", ["tpe", "cmaes", "nsga2", "gp", "random"])
def test_every_sampler_searches_the_space_beside_a_recipe_outside_it(name):
    """Shown a trial without params, samplers that search the params every trial shares find an
    empty space and draw at random; wrapped, each still finds x and y."""
    from search.config import SamplerSection

    section = SamplerSection(name=name, n_startup_trials=2)
    sampler = make_sampler(section)
    assert isinstance(sampler, SearchedOnly)
    study = _study_with_a_hidden_trial(sampler)
    trial = study.ask()
    frozen = study._storage.get_trial(trial._trial_id)
    if name in ("cmaes", "gp"):
        assert set(sampler.infer_relative_search_space(study, frozen)) == {"x", "y"}
        unwrapped = make_sampler(section).inner  # a fresh one: spaces are cached per sampler
        assert unwrapped.infer_relative_search_space(study, frozen) == {}
    assert 0 <= trial.suggest_float("x", 0, 1) <= 1 and 0 <= trial.suggest_float("y", 0, 1) <= 1


def test_the_sampler_is_never_shown_the_recipe_outside_the_space():
    inner = _Recording()
    study = _study_with_a_hidden_trial(SearchedOnly(inner))
    study.ask().suggest_float("x", 0, 1)
    assert inner.shown and 12 not in inner.shown and len(inner.shown) == 13  # 12 + the asked one


# --- in a study -----------------------------------------------------------------------------------


def _config(llama_set, tmp_path: Path, recipes: list[str], **space) -> dict:
    return {
        "study": {"name": "mine", "output_dir": str(tmp_path / "mine")},
        "models": {
            "base": str(llama_set.base),
            "finetunes": [str(p) for p in llama_set.finetunes[:2]],
        },
        "space": {"methods": ["ties", "task_arithmetic"], "weight": [0.0, 1.0], **space},
        "evaluator": {
            "kind": "perplexity",
            "text": str(write_text_corpus(tmp_path / "t.txt")),
            "window": 16,
        },
        "objectives": {"items": [{"task": "perplexity", "metric": "nll"}]},
        "budget": {"n_trials": 4},
        "workers": {"count": 1},
        "baselines": {"builtin": False, "recipes": recipes},
    }


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _basin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BASIN), *args], capture_output=True, text=True, cwd=REPO)


@pytest.mark.slow
def test_a_study_scores_the_users_recipes_by_name_and_learns_from_those_in_its_space(
    llama_set, tmp_path
):
    from search.folder import load_study_folder
    from search.loop import run_study
    from search.pool import in_process_pool

    a, b = (str(p) for p in llama_set.finetunes[:2])
    inside = _write(
        tmp_path / "house-ties.yaml",
        {
            "merge_method": "ties",
            "base_model": str(llama_set.base),
            "parameters": {"density": 0.5},
            "models": [
                {"model": b, "parameters": {"weight": 0.6}},  # order differs from the config's
                {"model": a, "parameters": {"weight": 0.4}},
            ],
            "dtype": "float32",
        },
    )
    outside = _write(
        tmp_path / "halfway.yaml",
        {
            "method": "slerp",
            "models": [{"path": a}, {"path": b}],
            "parameters": {"t": 0.3},
        },
    )
    config = config_from_dict(_config(llama_set, tmp_path, [inside, outside]))
    validate = _basin("validate", "--headers-only", "--quiet", str(_dump_config(config, tmp_path)))
    assert validate.returncode == 0, validate.stderr
    assert "house-ties.yaml: a point of the search space, scored as baseline 'house-ties'" in (
        validate.stdout
    )
    assert (
        "halfway.yaml: scored and reported as baseline 'halfway', but it cannot seed the search: "
        "its method 'slerp' is not among space.methods (ties, task_arithmetic)"
    ) in validate.stdout

    run_study(config, progress=False, pool=in_process_pool)
    _, study = load_study_folder(tmp_path / "mine")
    by_name = {t.user_attrs.get(attrs.BASELINE): t for t in study.trials}
    assert by_name["house-ties"].state == TrialState.COMPLETE
    ties = by_name["house-ties"]
    assert attrs.RECIPE not in ties.user_attrs
    assert ties.params["method"] == "ties"
    assert sorted(v for k, v in ties.params.items() if k.startswith("weight")) == [0.4, 0.6]
    slerp = by_name["halfway"]
    assert slerp.state == TrialState.COMPLETE and slerp.params == {}
    assert slerp.user_attrs[attrs.RECIPE]["method"] == "slerp"
    assert "slerp" in slerp.user_attrs[attrs.OUTSIDE]
    assert slerp.user_attrs[attrs.RECIPE_FILE] == outside
    assert ties.user_attrs[attrs.RECIPE_FILE] == inside
    assert len(study.trials) == 4  # the two recipes, then two searched trials

    # the record, the table and the export all show the recipe the trial merged
    record = json.loads((tmp_path / "mine" / "trials" / f"{slerp.number}.json").read_text())
    assert record["recipe"]["method"] == "slerp" and record["baseline"] == "halfway"
    table = _basin("pareto", str(tmp_path / "mine"))
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if "halfway" in ln)
    assert "slerp" in line
    print(table.stdout)
    header = next(ln for ln in table.stdout.splitlines() if ln.startswith("trial"))
    assert header.split()[3:5] == ["score", "perplexity/nll"]  # the nll as written, beside score
    nll = slerp.user_attrs[attrs.METRICS]["perplexity/nll"]
    assert nll > 0 and slerp.values[0] == pytest.approx(-nll) and f"{nll:.4f}" in line
    report = _basin("report", str(tmp_path / "mine"), "--no-heldout")
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "mine" / "report.html").read_text()
    assert "<td>halfway</td>" in page and "<td>house-ties</td>" in page
    out = tmp_path / "exported"
    exported = _basin(
        "export", str(tmp_path / "mine"), "--trial", str(slerp.number), "--out", str(out)
    )
    assert exported.returncode == 0, exported.stderr
    merged = tmp_path / "merged"
    direct = _basin("merge", outside, "--out", str(merged))
    assert direct.returncode == 0, direct.stderr
    ours, theirs = load_file(out / "model.safetensors"), load_file(merged / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def _dump_config(config, tmp_path: Path) -> Path:
    from search.config import config_to_dict

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def test_a_recipe_over_other_models_stops_the_study_before_anything_is_made(llama_set, tmp_path):
    a = str(llama_set.finetunes[0])
    only_one = _write(
        tmp_path / "one.yaml", {"method": "linear", "models": [{"path": a, "weight": 1.0}]}
    )
    config = config_from_dict(_config(llama_set, tmp_path, [only_one]))
    from search.setup import setup_study

    with pytest.raises(ConfigError) as err:
        setup_study(config, resume=False)
    assert "baselines.recipes[0]" in str(err.value) and "list each of them once" in str(err.value)
    assert not (tmp_path / "mine").exists()


def test_a_recipe_file_that_cannot_be_read_names_the_file(llama_set, tmp_path):
    bad = _write(tmp_path / "bad.yaml", {"merge_method": "ties", "tokenizer_source": "union"})
    config = config_from_dict(_config(llama_set, tmp_path, [bad, str(tmp_path / "missing.yaml")]))
    from search.setup import setup_study

    with pytest.raises(
        ConfigError, match=r"baselines.recipes\[0\] \(.*bad.yaml\): tokenizer_source"
    ):
        setup_study(config, resume=False)
    assert not (tmp_path / "mine").exists()


def test_baselines_true_or_false_still_reads(llama_set, tmp_path):
    data = _config(llama_set, tmp_path, [])
    assert config_from_dict({**data, "baselines": False}).baselines.builtin is False
    assert config_from_dict({**data, "baselines": True}).baselines.recipes == []
    with pytest.raises(ConfigError, match="listed twice"):
        config_from_dict({**data, "baselines": {"recipes": ["x.yaml", "x.yaml"]}})


def test_recipe_dicts_round_trip_for_a_trial_outside_the_space():
    mine = recipe(method="slerp", t=LayerParam.constant(0.3))
    stored = json.loads(json.dumps(recipe_to_dict(mine)))
    from merging.recipe import recipe_from_dict

    assert recipe_from_dict(stored) == mine


def test_a_failed_recipe_outside_the_space_is_queued_again_as_that_recipe():
    from search.recovery import queue_again

    study = optuna.create_study(direction="maximize")
    mine = recipe_to_dict(recipe(method="slerp", t=LayerParam.constant(0.3)))
    named = {attrs.BASELINE: "halfway", attrs.RECIPE_FILE: "r/halfway.yaml"}
    failed = create_trial(
        state=TrialState.FAIL, params={}, distributions={}, user_attrs={**named, attrs.RECIPE: mine}
    )
    study.add_trial(failed)
    queue_again(study, study.trials[0])
    again = study.ask()
    assert again.user_attrs[attrs.RECIPE] == mine and again.user_attrs[attrs.BASELINE] == "halfway"
    assert again.user_attrs[attrs.RECIPE_FILE] == "r/halfway.yaml"


def test_a_recipe_file_named_like_a_builtin_baseline_keeps_its_file_name():
    from search.user_recipes import _names

    paths = ["a/ties.yaml", "b/mine.yml", "c/mine.yaml", "d/other.yaml"]
    assert _names(paths, {"ties", "uniform"}) == ["ties.yaml", "mine.yml", "mine.yaml", "other"]
