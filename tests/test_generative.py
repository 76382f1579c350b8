"""Leaderboard-style evaluation on the toy zoo: generative tasks, chat templates and generation
options passed through to lm-eval, and a carved split (real zoo models, real lm-eval, real Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from evaluators import HarnessEvaluator, HarnessSection, build_evaluator
from evaluators.engines import HFEngine
from search.cli import main
from search.config import ConfigError
from search.demo import load_demo_config
from search.folder import load_study_folder
from search.setup import setup_study

GEN = ["zoo_sort_gen", "zoo_add_gen"]
# A chat template that renders every message's text in turn: the system instruction lands in the
# prompt, so a test sees whether it was passed through.
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chat_model(zoo, tmp_path_factory) -> Path:
    """The zoo's sort fine-tune with a chat template saved in its tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "ft_sort"
    shutil.copytree(zoo.finetunes["sort"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


def _simple_evaluate(folder: Path, zoo, **options):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},device=cpu",
        batch_size=32,
        tasks=GEN,
        task_manager=TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        verbosity="ERROR",
        **options,
    )


def _ours(folder: Path, zoo, **options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    section = HarnessSection(
        tasks=GEN, include_path=str(zoo.tasks_dir), batch_size=32, builtin_tasks=False, **options
    )
    ev = HarnessEvaluator(section, split="test")
    return ev.evaluate(HFEngine(model, tok))


def test_a_generative_task_scores_what_simple_evaluate_scores(zoo):
    folder = zoo.finetunes["sort"]
    ours, theirs = _ours(folder, zoo), _simple_evaluate(folder, zoo)
    for task in GEN:
        assert (
            ours.metrics[f"{task}/exact_match,answer"]
            == theirs["results"][task]["exact_match,answer"]
        )
    # the answers were written by the model and filtered: the sort fine-tune writes sorts, not
    # additions
    assert (
        ours.metrics["zoo_sort_gen/exact_match,answer"]
        > ours.metrics["zoo_add_gen/exact_match,answer"]
    )


def test_chat_template_system_instruction_and_gen_kwargs_reach_lm_eval(zoo, chat_model):
    options = {
        "apply_chat_template": True,
        "system_instruction": "sort",
        "gen_kwargs": {"max_gen_toks": 2},
    }
    ours, theirs = _ours(chat_model, zoo, **options), _simple_evaluate(chat_model, zoo, **options)
    for task in GEN:
        assert (
            ours.metrics[f"{task}/exact_match,answer"]
            == theirs["results"][task]["exact_match,answer"]
        )
    prompt, generation = theirs["samples"]["zoo_add_gen"][0]["arguments"][0]
    # the system instruction, then the user turn, through the template
    assert prompt.startswith("sort add ")
    assert generation["max_gen_toks"] == 2 and generation["until"] == ["add", "succ", "rev", "sort"]
    plain = _ours(chat_model, zoo)
    assert plain.metrics != ours.metrics  # the options change what is scored


def test_a_carve_splits_one_split_into_disjoint_search_and_held_out_items(zoo):
    section = HarnessSection(
        tasks=GEN,
        include_path=str(zoo.tasks_dir),
        split="validation",
        holdout=0.4,
        builtin_tasks=False,
    )
    search, report = build_evaluator(section, "search"), build_evaluator(section, "report")
    assert (search.split, report.split) == ("validation", "validation")
    for task in GEN:
        a, b = set(search.item_ids[task]), set(report.item_ids[task])
        n = search.split_sizes[task]
        assert not a & b and a | b == set(range(n)) and len(b) == round(0.4 * n)
    again = build_evaluator(section.model_copy(update={"limit": 10}), "report")
    assert all(
        set(again.item_ids[t]) <= set(report.item_ids[t]) and len(again.item_ids[t]) == 10
        for t in GEN
    )
    other = build_evaluator(section.model_copy(update={"holdout_seed": 1}), "report")
    assert other.item_ids != report.item_ids


def test_a_generative_carved_study_searches_reports_and_keeps_its_carve(zoo, tmp_path):
    folder = tmp_path / "gen"
    config = load_demo_config(
        str(folder),
        [
            "budget.n_trials=6",
            "workers.count=1",
            "evaluator.limit=20",
            "sampler.n_startup_trials=2",
        ],
        zoo=str(zoo.root),
        generative=True,
    )
    study_yaml = tmp_path / "gen.yaml"
    import yaml

    from search.config import config_to_dict

    study_yaml.write_text(yaml.safe_dump(config_to_dict(config)))
    assert main(["run", str(study_yaml), "--quiet"]) == 0
    _, study = load_study_folder(folder)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 6
    carve = json.loads((folder / "carve.json").read_text())
    assert carve["holdout"] == 0.4 and set(carve["tasks"]) == set(zoo.generative_tasks)

    assert main(["report", str(folder), "--quiet"]) == 0
    best = study.best_trial
    held = json.loads(
        (folder / "heldout" / "validation-holdout" / f"{best.number}.json").read_text()
    )["metrics"]
    assert set(held) == {f"{t}/exact_match,answer" for t in zoo.generative_tasks}
    page = (folder / "report.html").read_text()
    assert "validation-holdout" in page and "carved before the search began" in page

    # the data changing under a carved study (here: its recorded cut) refuses to resume
    carve["tasks"]["zoo_add_gen"]["holdout"] = carve["tasks"]["zoo_add_gen"]["holdout"][1:]
    (folder / "carve.json").write_text(json.dumps(carve))
    with pytest.raises(ConfigError, match="the carve of zoo_add_gen differs"):
        setup_study(config, resume=True)


def test_batch_size_auto_lets_lm_eval_pick_the_batch_and_scores_the_same(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo.finetunes["sort"]).eval()
    tok = AutoTokenizer.from_pretrained(zoo.finetunes["sort"])
    section = HarnessSection(
        tasks=["zoo_sort", "zoo_sort_gen"],
        include_path=str(zoo.tasks_dir),
        split="test",
        builtin_tasks=False,
        batch_size="auto",
    )
    auto = build_evaluator(section, "search")
    fixed = build_evaluator(section.model_copy(update={"batch_size": 8}), "search")
    engine = HFEngine(model, tok)
    assert auto.evaluate(engine).metrics == fixed.evaluate(engine).metrics
    assert engine.lm("auto").batch_sizes  # lm-eval measured a batch size for this model
