"""search/config.py: study configs read from real YAML files; every problem named at once."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from search.cli import main
from search.config import SAMPLERS, ConfigError, SamplerSection, StudyConfig, load_config

MINIMAL: dict[str, Any] = {
    "study": {"name": "demo"},
    "models": {"base": "models/base", "finetunes": ["models/ft_add", "models/ft_copy"]},
    "evaluator": {"tasks": ["zoo_add", "zoo_copy"]},
    "objectives": {"items": [{"task": "zoo_add"}]},
}


def write(tmp_path: Path, data: Any, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def edited(**sections: Any) -> dict[str, Any]:
    """MINIMAL with whole sections replaced (a value of None deletes the section)."""
    data = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def problems(tmp_path: Path, data: Any, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), overrides)
    return str(info.value)


# --- valid configs --------------------------------------------------------------------------------


def test_minimal_config_passes_with_documented_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert isinstance(config, StudyConfig)
    assert config.study.name == "demo"
    assert config.study.folder == Path("results") / "demo"
    assert config.space.methods == ["task_arithmetic"]
    assert config.space.lam == (0.3, 1.5)  # searched, not fixed at 1
    assert config.space.granularity == "model"
    assert config.objectives.mode == "single"
    assert config.sampler.name == "tpe"
    assert config.budget.n_trials == 50
    assert config.workers.count == 1
    assert config.baselines.builtin is True and config.baselines.recipes == []


def test_full_config_passes(tmp_path):
    data = edited(
        study={"name": "full-1", "output_dir": str(tmp_path / "out")},
        space={
            "methods": ["linear", "ties", "dare_ties"],
            "granularity": "anchors",
            "anchors": 3,
            "split_attn_mlp": True,
            "weight": [0.0, 2.0],
            "density": [0.2, 0.9],
            "lambda": [0.5, 1.5],
        },
        evaluator={
            "tasks": ["zoo_add", "zoo_copy"],
            "include_path": "tasks",
            "limit": 40,
            "batch_size": 32,
        },
        objectives={
            "mode": "pareto",
            "items": [{"task": "zoo_add"}, {"task": "zoo_copy", "metric": "acc_norm"}],
        },
        sampler={"name": "nsga2", "seed": 3},
        budget={"n_trials": 30, "timeout": 600},
        workers={"count": 2, "gpus_per_worker": 1},
    )
    config = load_config(write(tmp_path, data))
    assert config.space.lam == (0.5, 1.5)  # YAML key 'lambda'
    assert config.space.weight == (0.0, 2.0)
    assert config.study.folder == tmp_path / "out"
    assert [o.key for o in config.objectives.items] == ["zoo_add/acc", "zoo_copy/acc_norm"]


# --- every problem at once ------------------------------------------------------------------------


def test_several_wrong_fields_are_reported_in_one_error(tmp_path):
    data = edited(
        space={"methods": ["tie"], "granularity": "layer", "densty": 0.5},
        sampler={"name": "tpee"},
        budget={"n_trials": 0},
        workers={"count": 0},
    )
    message = problems(tmp_path, data)
    assert message.startswith(str(tmp_path / "study.yaml"))
    assert "6 problems" in message
    # each field by name, with the value and the valid choices
    assert "space.methods" in message and "'tie'" in message
    assert (
        "'linear', 'task_arithmetic', 'ties', 'dare_linear', 'dare_ties', 'breadcrumbs'" in message
        and "'slerp' or 'nuslerp'" in message
    )
    assert (
        "space.granularity" in message
        and "'layer'" in message
        and "'model', 'group' or 'anchors'" in message
    )
    assert "space.densty: unknown key; did you mean 'density'?" in message
    assert (
        "sampler.name" in message
        and "'tpee'" in message
        and "'tpe', 'cmaes', 'nsga2', 'gp' or 'random'" in message
    )
    assert (
        "budget.n_trials" in message
        and "greater than or equal to 1" in message
        and "got 0" in message
    )
    assert "workers.count" in message
    assert len([line for line in message.splitlines() if line.startswith("  - ")]) == 6


def test_several_problems_inside_the_space_section_are_all_reported(tmp_path):
    # density out of range, a reversed weight range and t outside [0, 1]: three problems, three
    # lines
    message = problems(tmp_path, edited(space={"density": 0, "weight": [1, 0], "t": [0, 2]}))
    assert "density" in message
    assert "weight: low 1.0 is above high 0.0" in message
    assert "t must lie in [0, 1]" in message


def test_field_errors_and_cross_checks_are_reported_together(tmp_path):
    # a wrong field in one section must not hide the objective that names an unknown task
    data = edited(budget={"n_trials": 0}, objectives={"items": [{"task": "zoo_ad"}]})
    message = problems(tmp_path, data)
    assert "budget.n_trials" in message
    assert "objectives.items[0].task" in message


@pytest.mark.parametrize(
    ("section", "key", "typo", "suggestion"),
    [
        (None, None, "stduy", "study"),
        ("space", None, "methds", "methods"),
        ("evaluator", None, "taks", "tasks"),
        ("budget", None, "n_trails", "n_trials"),
        ("workers", None, "cuont", "count"),
    ],
)
def test_unknown_keys_get_did_you_mean(tmp_path, section, key, typo, suggestion):
    data = copy.deepcopy(MINIMAL)
    if section is None:
        data[typo] = {"name": "x"}
    else:
        data.setdefault(section, {})
        if section == "evaluator":
            data[section] = {"tasks": ["zoo_add", "zoo_copy"], typo: 1}
        else:
            data[section] = {typo: 1}
    message = problems(tmp_path, data)
    assert f"{typo}: unknown key; did you mean '{suggestion}'?" in message
    assert "Known:" in message


def test_unknown_key_inside_a_list_item_gets_did_you_mean(tmp_path):
    message = problems(
        tmp_path, edited(objectives={"items": [{"task": "zoo_add", "metirc": "acc"}]})
    )
    assert "objectives.items.0.metirc: unknown key; did you mean 'metric'?" in message
    assert "Known: task, metric, weight, direction" in message


# --- out-of-range values --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"space": {"density": 0}}, "density must lie in (0, 1]"),
        ({"space": {"density": 1.5}}, "density must lie in (0, 1]"),
        ({"space": {"density": [0.0, 0.5]}}, "density must lie in (0, 1]"),
        ({"space": {"density": [0.5, 1.5]}}, "density must lie in (0, 1]"),
        ({"space": {"weight": [1.0, 0.0]}}, "weight: low 1.0 is above high 0.0"),
        ({"space": {"lambda": [2.0, 0.5]}}, "lambda: low 2.0 is above high 0.5"),
        ({"space": {"methods": ["slerp"], "t": [0.8, 0.2]}}, "t: low 0.8 is above high 0.2"),
        ({"space": {"t": [0.0, 1.5]}}, "t must lie in [0, 1]"),
        ({"space": {"weight": [0.1, 0.5, 0.9]}}, "a range is [low, high]"),
        ({"space": {"group_size": 0}}, "space.group_size"),
        ({"space": {"anchors": 1}}, "space.anchors"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials"),
        ({"budget": {"n_trials": None}}, "give n_trials, timeout or items"),
        ({"budget": {"timeout": 0}}, "budget.timeout"),
        ({"workers": {"count": 0}}, "workers.count"),
        ({"workers": {"gpus_per_worker": -1}}, "workers.gpus_per_worker"),
        ({"evaluator": {"tasks": ["zoo_add"], "limit": 0}}, "evaluator.limit"),
        ({"evaluator": {"tasks": []}}, "evaluator.tasks"),
        ({"models": {"base": "b", "finetunes": []}}, "models.finetunes"),
        ({"models": {"base": "b", "finetunes": ["a", "a"]}}, "a fine-tune is listed twice"),
        ({"study": {"name": "a/b"}}, "study.name"),
        ({"models": None}, "models: required field is missing"),
        (
            {"models": {"base": "b", "finetunes": ["a"], "kernels": "compile"}},
            "models.kernels: 'compile' is not allowed",
        ),
    ],
)
def test_out_of_range_values_are_refused_with_their_field(tmp_path, sections, expected):
    message = problems(tmp_path, edited(**sections))
    assert expected in message, message


def test_objective_task_must_be_an_evaluator_task(tmp_path):
    message = problems(tmp_path, edited(objectives={"items": [{"task": "zoo_ad"}]}))
    assert (
        "objectives.items[0].task: 'zoo_ad' is not among evaluator.tasks; did you mean 'zoo_add'?"
        in message
    )
    assert "Known: zoo_add, zoo_copy" in message


def test_pareto_needs_two_objectives(tmp_path):
    message = problems(
        tmp_path, edited(objectives={"mode": "pareto", "items": [{"task": "zoo_add"}]})
    )
    assert "objectives.mode: pareto needs at least two objectives" in message


def test_slerp_needs_exactly_two_finetunes(tmp_path):
    data = edited(
        models={"base": "b", "finetunes": ["f1", "f2", "f3"]}, space={"methods": ["slerp"]}
    )
    message = problems(tmp_path, data)
    assert "slerp merges exactly two models; this config has 3" in message
    one = edited(
        models={"base": "b", "finetunes": ["f1"]}, space={"methods": ["model_stock", "ties"]}
    )
    assert "model_stock needs at least 2 fine-tunes; this config has 1" in problems(tmp_path, one)
    # with two it is fine
    load_config(write(tmp_path, edited(space={"methods": ["slerp"]}), "two.yaml"))


@pytest.mark.parametrize(
    "space",
    [
        {"methods": ["ties"], "weight": 1.0, "density": 0.5, "lambda": 1.0},
        {"methods": ["task_arithmetic"], "weight": 0.5, "lambda": 1.0},
        {"methods": ["linear"], "weight": 0.5},
        {"methods": ["slerp"], "t": 0.5},
    ],
)
def test_an_empty_search_space_is_refused(tmp_path, space):
    message = problems(tmp_path, edited(space=space))
    assert "space: nothing to search" in message


def test_linear_over_one_finetune_has_nothing_to_search(tmp_path):
    # normalized linear weights of a single model all give the same merge
    data = edited(models={"base": "b", "finetunes": ["f1"]}, space={"methods": ["linear"]})
    assert "nothing to search" in problems(tmp_path, data)


def test_two_methods_are_a_search_even_with_fixed_values(tmp_path):
    data = edited(space={"methods": ["ties", "task_arithmetic"], "weight": 1.0, "density": 0.5})
    assert load_config(write(tmp_path, data)).space.methods == ["ties", "task_arithmetic"]


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, ["a", "list"], "list.yaml"))


# --- --set overrides ------------------------------------------------------------------------------


def test_set_overrides_nested_keys_numbers_and_lists(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "budget.n_trials=20",
            "space.methods=[ties, dare_ties]",
            "space.weight=[0.2, 0.8]",
            "space.lambda=0.7",
            "space.granularity=group",
            "space.group_size=2",
            "study.name=other",
            "evaluator.limit=40",
            "workers.count=4",
            "sampler.seed=null",
            "baselines=false",
        ],
    )
    assert config.budget.n_trials == 20
    assert config.space.methods == ["ties", "dare_ties"]
    assert config.space.weight == (0.2, 0.8)
    assert config.space.lam == 0.7
    assert config.space.granularity == "group" and config.space.group_size == 2
    assert config.study.name == "other"
    assert config.evaluator.limit == 40
    assert config.evaluator.tasks == ["zoo_add", "zoo_copy"]  # siblings kept
    assert config.workers.count == 4
    assert config.sampler.seed is None
    assert config.baselines.builtin is False  # the old boolean form
    # the file itself is untouched
    assert yaml.safe_load(path.read_text()) == MINIMAL


def test_set_overrides_are_validated_like_the_file(tmp_path):
    message = problems(tmp_path, MINIMAL, ["space.densty=0.5", "budget.n_trials=0"])
    assert "space.densty: unknown key; did you mean 'density'?" in message
    assert "budget.n_trials" in message


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("budget.n_trials", "expected key.sub=value"),
        ("=5", "is not a dotted field name"),
        ("budget..n_trials=5", "is not a dotted field name"),
    ],
)
def test_malformed_set_overrides(tmp_path, item, expected):
    assert expected in problems(tmp_path, MINIMAL, [item])


# --- basin validate -------------------------------------------------------------------------------


def test_basin_validate_bad_config(tmp_path, capsys):
    path = write(tmp_path, edited(sampler={"name": "tpee"}, workers={"count": 0}))
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("basin: error:")
    assert "sampler.name" in captured.err and "workers.count" in captured.err
    assert "Traceback" not in captured.err


def test_basin_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "basin: error: config file not found" in capsys.readouterr().err


def test_runners_of_one_study_may_differ_in_their_resources_but_not_in_what_they_search():
    """The first runner stores its config in the study; the next (any machine, any folder) is
    checked against it."""

    from search.config import config_from_dict
    from search.setup import check_same_study

    study = optuna.create_study()
    check_same_study(config_from_dict(MINIMAL), study)
    assert study.user_attrs["config"]["space"]["methods"] == ["task_arithmetic"]
    own = edited(
        models={**MINIMAL["models"], "device": "cuda:1"},
        evaluator={**MINIMAL["evaluator"], "batch_size": 4},
        study={
            "name": "demo",
            "output_dir": "elsewhere",
            "storage": "postgresql://db/x",
            "heartbeat_s": 5,
        },
        budget={"n_trials": 500},
        workers={"count": 8, "gpus_per_worker": 1},
    )
    check_same_study(config_from_dict(own), study)
    for other, differs in (
        (edited(space={"methods": ["ties"]}), "space"),
        (edited(evaluator={**MINIMAL["evaluator"], "limit": 50}), "evaluator"),
        (edited(models={**MINIMAL["models"], "dtype": "bfloat16"}), "models"),
    ):
        with pytest.raises(
            ConfigError, match=rf"created with a different config \(it differs in: {differs}\)"
        ):
            check_same_study(config_from_dict(other), study)


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_name_the_config_accepts_builds_a_sampler(name):
    from search.setup import make_sampler

    sampler = make_sampler(SamplerSection(name=name, seed=3), offset=2)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
