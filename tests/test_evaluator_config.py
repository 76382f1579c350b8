"""The evaluator seam: one section per evaluator kind in the config, one factory, and a perplexity
study run end to end through it (real tiny Llama, real Ray, real Optuna storage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evaluators import (
    EvaluatorError,
    HarnessEvaluator,
    HarnessSection,
    PerplexityEvaluator,
    PerplexitySection,
)
from evaluators.config import build_evaluator
from evaluators.engines import HFEngine
from search.cli import main
from search.config import ConfigError, config_from_dict
from search.folder import load_study_folder, worker_spec
from tests.support.tiny import build_tasks, write_text_corpus


def study_data(llama_set, folder: Path, evaluator: dict, objective: dict, **extra) -> dict:
    return {
        "study": {"name": "seam", "output_dir": str(folder)},
        "models": {"base": str(llama_set.base), "finetunes": [str(p) for p in llama_set.finetunes]},
        "space": {"methods": ["task_arithmetic"], "weight": [0.0, 1.0], "lambda": [0.2, 1.0]},
        "evaluator": evaluator,
        "objectives": {"items": [objective]},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 5},
        "workers": {"count": 1},
        "baselines": False,
        **extra,
    }


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    return write_text_corpus(root / "search.txt", n_words=600, seed=1), write_text_corpus(
        root / "held.txt", n_words=600, seed=2
    )


def test_a_config_without_kind_builds_the_harness_evaluator_for_both_roles(tmp_path):
    tasks = build_tasks(tmp_path / "tasks", n_items=6)
    section = HarnessSection(
        tasks=list(tasks.names), include_path=str(tasks.folder), builtin_tasks=False
    )
    search, report = build_evaluator(section, "search"), build_evaluator(section, "report")
    assert isinstance(search, HarnessEvaluator) and (search.split, report.split) == (
        "validation",
        "test",
    )
    assert "toy_next/acc" in search.metric_keys and search.higher_is_better("toy_next/acc")
    with pytest.raises(EvaluatorError, match="unknown role 'held'; Known: search, report"):
        build_evaluator(section, "held")  # type: ignore[arg-type]


def test_the_search_split_of_the_config_is_the_split_the_search_scores(tmp_path):
    """`split: test` used to be ignored by the workers, which always scored validation."""
    tasks = build_tasks(tmp_path / "tasks", n_items=6)
    section = HarnessSection(
        tasks=list(tasks.names),
        include_path=str(tasks.folder),
        builtin_tasks=False,
        split="test",
        report_split="validation",
    )
    assert (build_evaluator(section, "search").split, build_evaluator(section, "report").split) == (
        "test",
        "validation",
    )


def test_the_perplexity_section_builds_the_perplexity_evaluator(texts):
    section = PerplexitySection(
        kind="perplexity", text=str(texts[0]), report_text=str(texts[1]), window=16, name="ppl"
    )
    search, report = build_evaluator(section, "search"), build_evaluator(section, "report", limit=3)
    assert (
        isinstance(search, PerplexityEvaluator)
        and search.path == texts[0]
        and report.path == texts[1]
    )
    assert report.limit == 3 and search.metric_keys == ("ppl/nll", "ppl/ppl")
    assert search.higher_is_better("ppl/nll") is False
    with pytest.raises(EvaluatorError, match="did you mean 'ppl/nll'"):
        search.higher_is_better("ppl/nl")
    without = section.model_copy(update={"report_text": None})
    with pytest.raises(EvaluatorError, match="report_text is not set"):
        build_evaluator(without, "report")


def test_config_errors_name_the_kind_and_its_own_fields(llama_set, tmp_path, texts):
    data = study_data(
        llama_set,
        tmp_path / "s",
        {"kind": "perplexty", "text": str(texts[0])},
        {"task": "perplexity", "metric": "nll"},
    )
    with pytest.raises(
        ConfigError,
        match="evaluator.kind: unknown evaluator kind 'perplexty'; did you mean 'perplexity'",
    ):
        config_from_dict(data)
    data["evaluator"] = {"kind": "perplexity", "txt": str(texts[0])}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert "evaluator.text: required field is missing" in str(err.value)
    assert (
        "evaluator.txt: unknown key; did you mean 'text'? Known: kind, name, text, report_text"
        in str(err.value)
    )
    data["evaluator"] = {"kind": "perplexity", "text": str(texts[0])}
    data["objectives"]["items"] = [{"task": "zoo_add", "metric": "acc"}]
    with pytest.raises(
        ConfigError, match="'zoo_add' is not among evaluator.name .* Known: perplexity"
    ):
        config_from_dict(data)


def test_workers_get_the_frozen_sections_with_absolute_paths(
    llama_set, tmp_path, texts, monkeypatch
):
    monkeypatch.chdir(texts[0].parent)
    data = study_data(
        llama_set,
        tmp_path / "s",
        {"kind": "perplexity", "text": texts[0].name, "window": 16},
        {"task": "perplexity", "metric": "nll"},
    )
    config = config_from_dict(data)
    spec = worker_spec(config)
    assert spec.evaluator.text == str(texts[0])
    assert config.evaluator.text == texts[0].name  # the config is kept
    assert spec.models.base == str(llama_set.base.resolve()) and spec.evaluator.window == 16
    assert spec.space == config.space
    with pytest.raises(Exception, match="frozen"):
        spec.evaluator.window = 8  # type: ignore[misc]


@pytest.mark.slow
def test_a_perplexity_study_runs_minimises_nll_and_reports_held_out_scores(
    llama_set, tmp_path, texts
):
    folder = tmp_path / "ppl-study"
    data = study_data(
        llama_set,
        folder,
        {
            "kind": "perplexity",
            "text": str(texts[0]),
            "report_text": str(texts[1]),
            "window": 16,
            "batch_size": 4,
        },
        {"task": "perplexity", "metric": "nll"},
    )
    path = tmp_path / "ppl.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--quiet"]) == 0
    config, study = load_study_folder(folder)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    # minimising nll through a maximised weighted score: the score is -nll, the best trial has the
    # lowest nll
    best = study.best_trial
    assert best.values[0] == pytest.approx(-best.user_attrs["metrics"]["perplexity/nll"])
    assert best.user_attrs["metrics"]["perplexity/nll"] == min(
        t.user_attrs["metrics"]["perplexity/nll"] for t in complete
    )

    # the exported best recipe, loaded fresh, scores what the study recorded for it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "best"
    assert (
        main(["export", str(folder), "--trial", str(best.number), "--out", str(out), "--quiet"])
        == 0
    )
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    engine = HFEngine(model, tok)
    again = build_evaluator(config.evaluator, "search").evaluate(engine).metrics["perplexity/nll"]
    assert again == pytest.approx(best.user_attrs["metrics"]["perplexity/nll"], rel=1e-5)

    assert main(["report", str(folder), "--quiet"]) == 0
    held = json.loads((folder / "heldout" / "held.txt" / f"{best.number}.json").read_text())[
        "metrics"
    ]
    report = build_evaluator(config.evaluator, "report")
    expected = report.evaluate(engine).metrics["perplexity/nll"]
    assert held["perplexity/nll"] == pytest.approx(expected, rel=1e-5)
    assert "held.txt" in (folder / "report.html").read_text()


def test_every_kind_declares_all_that_search_asks_of_its_section_and_evaluator(tmp_path, texts):
    """What search calls without probing: each section's registry methods, and each evaluator's
    protocol members (an evaluator that scores no items refuses the item calls by name)."""
    from evaluators.config import KINDS
    from evaluators.protocol import Evaluator

    tasks = build_tasks(tmp_path / "tasks", n_items=6)
    sections = {
        "harness": HarnessSection(
            tasks=list(tasks.names), include_path=str(tasks.folder), builtin_tasks=False
        ),
        "perplexity": PerplexitySection(
            kind="perplexity", text=str(texts[0]), report_text=str(texts[1])
        ),
    }
    assert set(sections) == set(KINDS)
    shape = {"vocab_size": 100, "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    for kind, section in sections.items():
        assert isinstance(section, KINDS[kind])
        evaluator = build_evaluator(section, "search")
        assert isinstance(evaluator, Evaluator), kind
        info = section.check_tasks([evaluator.metric_keys[0]])
        assert set(info.higher_is_better) == {evaluator.metric_keys[0]}
        estimate = section.memory_estimate(shape, 2)
        assert estimate.bytes > 0 and "evaluation estimate" in estimate.what
        assert section.carve("search") is None and section.has_report
    harness = build_evaluator(sections["harness"], "search")
    assert harness.item_counts == harness.split_sizes and min(harness.item_counts.values()) > 0
    perplexity = build_evaluator(sections["perplexity"], "search")
    assert perplexity.item_counts == {} and perplexity.split_sizes == {}
    for call in (
        lambda: perplexity.check_item_means(["perplexity/nll"]),
        lambda: perplexity.item_metrics({"perplexity/nll": [1.0]}),
        lambda: perplexity.evaluate(None, items=(0, 2)),
    ):
        with pytest.raises(EvaluatorError, match="token windows of a text, not items"):
            call()


def test_an_items_budget_needs_an_evaluator_that_scores_items(llama_set, tmp_path, texts):
    data = study_data(
        llama_set,
        tmp_path / "ppl-items",
        {"kind": "perplexity", "text": str(texts[0])},
        {"task": "perplexity", "metric": "nll"},
        budget={"items": 500},
    )
    with pytest.raises(ConfigError, match="budget.items: the items budget counts scored lm-eval"):
        config_from_dict(data)
