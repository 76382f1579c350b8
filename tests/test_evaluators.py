"""evaluators/: the lm-eval adapter and perplexity on a tiny real Llama and local tasks (no
mocks)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import FrozenInstanceError, dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from evaluators import (
    EvalResult,
    Evaluator,
    EvaluatorError,
    HarnessEvaluator,
    HarnessSection,
    PerplexityEvaluator,
)
from evaluators.engines import HFEngine
from evaluators.harness import disable_template_cache, enable_template_cache, template_cache_info
from tests.support.tiny import (
    TinyTasks,
    build_model,
    build_tasks,
    task_config,
    write_text_corpus,
)

BATCH = 8


@dataclass(frozen=True)
class Tiny:
    model_dir: Path
    tasks: TinyTasks
    corpus: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("evaluators")
    return Tiny(
        model_dir=build_model(root / "model"),
        tasks=build_tasks(root / "tasks", n_items=30),
        corpus=write_text_corpus(root / "corpus.txt", n_words=1200),
    )


@pytest.fixture(scope="session")
def live(tiny) -> HFEngine:
    """The in-memory model and tokenizer that tests score (and restore after perturbing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return HFEngine(
        AutoModelForCausalLM.from_pretrained(tiny.model_dir),
        AutoTokenizer.from_pretrained(tiny.model_dir),
    )


def tiny_section(tiny: Tiny, **fields: Any) -> HarnessSection:
    """The tiny tasks as an evaluator section, batched as the reference is unless `fields` say."""
    defaults = {
        "tasks": list(tiny.tasks.names),
        "include_path": str(tiny.tasks.folder),
        "batch_size": BATCH,
    }
    return HarnessSection(**{**defaults, **fields})


@pytest.fixture(scope="session")
def evaluator(tiny) -> HarnessEvaluator:
    return HarnessEvaluator(tiny_section(tiny), split="validation")


@pytest.fixture(scope="session")
def reference_lm(tiny) -> Any:
    """lm-eval's own HF model, loaded from the SAVED folder (not our live object)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny.model_dir), device="cpu", batch_size=BATCH)


def simple_evaluate(lm: Any, tiny: Tiny, split: str, **kwargs: Any) -> tuple[dict, dict]:
    """lm-eval's simple_evaluate, flattened to
    ({task/metric: value}, {task/metric: {id: value}})."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tiny.tasks.folder), include_defaults=False)
    disable_template_cache()  # lm-eval exactly as shipped
    # lm-eval scores test_split whenever a task declares one: for validation, declare none.
    tasks = (
        [tiny.tasks.config(n, ("validation",)) for n in tiny.tasks.names]
        if split == "validation"
        else list(tiny.tasks.names)
    )
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=True,
            **kwargs,
        )
    finally:
        enable_template_cache()
    metrics = {
        f"{task}/{field.split(',')[0]}": value
        for task, row in out["results"].items()
        for field, value in row.items()
        if field.endswith(",none") and "_stderr" not in field
    }
    items = {
        f"{task}/{metric}": {row["doc_id"]: row[metric] for row in rows}
        for task, rows in out["samples"].items()
        for metric in rows[0]["metrics"]
    }
    return metrics, items


def by_id(evaluator: HarnessEvaluator, result: EvalResult) -> dict[str, dict[int, float]]:
    assert result.per_item is not None
    return {
        key: dict(zip(evaluator.item_ids[key.split("/")[0]], values))
        for key, values in result.per_item.items()
    }


@contextmanager
def perturbed(model: Any, scale: float = 1.0, seed: int = 0) -> Iterator[None]:
    """Add noise to the LM head in place (as a merge would write weights), then restore exactly."""
    weight = model.lm_head.weight
    saved = weight.detach().clone()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight.add_(scale * torch.randn(weight.shape, generator=gen))
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


# --- the lm-eval adapter ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "shots"), [("validation", None), ("test", None), ("validation", 2)]
)
def test_equals_lm_eval_simple_evaluate_on_saved_folder(tiny, live, reference_lm, split, shots):
    ev = HarnessEvaluator(tiny_section(tiny, num_fewshot=shots), split=split)
    result = ev.evaluate(live, per_item=True)
    assert ev.evaluate(live, per_item=True) == result  # the few-shot draw is re-seeded per call
    ref_metrics, ref_items = simple_evaluate(reference_lm, tiny, split, num_fewshot=shots)

    assert result.metrics == ref_metrics
    assert by_id(ev, result) == ref_items
    assert result.higher_is_better == dict.fromkeys(ref_metrics, True)


def test_validation_and_test_splits_score_different_items(tiny, live, evaluator):
    on_test = HarnessEvaluator(tiny_section(tiny), split="test")
    val, test = evaluator.evaluate(live, per_item=True), on_test.evaluate(live, per_item=True)
    assert val.per_item != test.per_item


def test_is_an_evaluator_and_result_is_frozen(evaluator, live):
    result = evaluator.evaluate(live)
    assert isinstance(evaluator, Evaluator)
    assert set(result.metrics) == {"toy_next/acc", "toy_pair/acc", "toy_pair/acc_norm"}
    assert result.per_item is None
    with pytest.raises(FrozenInstanceError):
        result.metrics = {}  # type: ignore[misc]
    assert result.objective("toy_next/acc") == result.metrics["toy_next/acc"]


def test_in_place_weight_changes_are_scored_and_restoring_restores(evaluator, live):
    before = evaluator.evaluate(live, per_item=True)
    wrapper = live.lm(evaluator.batch_size)
    with perturbed(live.model, scale=1.0):
        during = evaluator.evaluate(live, per_item=True)
    after = evaluator.evaluate(live, per_item=True)

    assert during.metrics != before.metrics
    assert after == before
    assert live.lm(evaluator.batch_size) is wrapper  # wrapped once, no reload or copy


def test_another_engine_is_scored_through_its_own_wrapper(tiny, evaluator, live):
    from transformers import AutoModelForCausalLM

    first = evaluator.evaluate(live)
    twin = HFEngine(AutoModelForCausalLM.from_pretrained(tiny.model_dir), live.tokenizer)
    assert evaluator.evaluate(twin) == first
    assert twin.lm(evaluator.batch_size) is not live.lm(evaluator.batch_size)


def test_limit_takes_the_same_first_items_every_call(tiny, live, reference_lm, evaluator):
    ev = HarnessEvaluator(tiny_section(tiny, limit=10), split="validation")
    one, two = ev.evaluate(live, per_item=True), ev.evaluate(live, per_item=True)
    ref_metrics, ref_items = simple_evaluate(reference_lm, tiny, "validation", limit=10)

    assert ev.item_ids == {name: tuple(range(10)) for name in tiny.tasks.names}
    assert one == two
    assert one.metrics == ref_metrics
    assert by_id(ev, one) == ref_items
    # The per-call limit gives the same subset from an evaluator built for every item.
    assert evaluator.evaluate(live, limit=10, per_item=True) == one


def test_seeded_sample_is_fixed_and_equals_lm_eval_samples(tiny, live, reference_lm):
    def build(seed: int) -> HarnessEvaluator:
        return HarnessEvaluator(tiny_section(tiny, limit=12, sample_seed=seed), split="validation")

    ev = build(7)
    ids = ev.item_ids
    assert ids == build(7).item_ids != build(8).item_ids
    assert all(len(v) == len(set(v)) == 12 for v in ids.values())
    assert ids["toy_next"] != tuple(range(12))

    one, two = ev.evaluate(live, per_item=True), ev.evaluate(live, per_item=True)
    assert one == two
    samples = {name: sorted(v) for name, v in ids.items()}
    ref_metrics, ref_items = simple_evaluate(reference_lm, tiny, "validation", samples=samples)
    assert one.metrics == ref_metrics
    assert by_id(ev, one) == ref_items
    # A per-call limit takes a prefix of the draw.
    prefix = ev.evaluate(live, limit=5, per_item=True)
    assert prefix.per_item == {k: v[:5] for k, v in one.per_item.items()}


def test_per_item_scores_have_one_per_item_and_average_to_the_metric(evaluator, live):
    result = evaluator.evaluate(live, per_item=True)
    assert result.per_item is not None and set(result.per_item) == set(result.metrics)
    for key, values in result.per_item.items():
        assert len(values) == len(evaluator.item_ids[key.split("/")[0]]) == 30
        assert math.isclose(sum(values) / len(values), result.metrics[key], abs_tol=1e-12)


def test_unknown_task_names_the_close_match(tiny):
    with pytest.raises(EvaluatorError, match=r"unknown task 'toy_nxt'; did you mean 'toy_next'\?"):
        HarnessEvaluator(
            tiny_section(tiny, tasks=["toy_nxt"], builtin_tasks=False), split="validation"
        )
    with pytest.raises(EvaluatorError, match=r"Known local tasks: toy_next, toy_pair"):
        HarnessEvaluator(tiny_section(tiny, tasks=["zzz"], builtin_tasks=False), split="validation")


def test_missing_split_names_task_split_and_available_splits(tiny, tmp_path):
    name = "toy_test_only"
    config = task_config(name, {"test": tiny.tasks.data_files["toy_next"]["test"]})
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    section = tiny_section(tiny, tasks=[name], include_path=str(tmp_path))
    HarnessEvaluator(section, split="test")
    with pytest.raises(EvaluatorError, match=r"'toy_test_only' has no validation split.*test"):
        HarnessEvaluator(section, split="validation")


def test_unknown_metric_and_bad_arguments(tiny):
    section = tiny_section(tiny)
    with pytest.raises(EvaluatorError, match=r"unknown metric 'toy_pair/acc_nrom'; did you mean"):
        HarnessEvaluator(section, split="validation", metrics=["toy_pair/acc_nrom"])
    with pytest.raises(EvaluatorError, match="sample_seed"):
        HarnessEvaluator(tiny_section(tiny, sample_seed=3), split="validation")
    with pytest.raises(EvaluatorError, match="split"):
        HarnessEvaluator(section, split="train")  # type: ignore[arg-type]
    with pytest.raises(EvaluatorError, match="limit"):
        HarnessEvaluator(section, split="validation", limit=0)


def test_metric_selection(tiny, live):
    ev = HarnessEvaluator(tiny_section(tiny), split="validation", metrics=["acc"])
    assert set(ev.evaluate(live, per_item=True).metrics) == {"toy_next/acc", "toy_pair/acc"}


def test_template_cache_leaves_scores_identical(evaluator, live):
    from lm_eval import utils

    enable_template_cache()
    patched = utils.env.from_string
    enable_template_cache()  # idempotent
    assert utils.env.from_string is patched
    try:
        cached = evaluator.evaluate(live, per_item=True)
        assert template_cache_info().hits > 0
        disable_template_cache()
        assert template_cache_info() is None and "from_string" not in vars(utils.env)
        uncached = evaluator.evaluate(live, per_item=True)
    finally:
        enable_template_cache()
    assert cached == uncached


def test_token_cache_leaves_scores_identical(tiny, evaluator, live):
    plain = HarnessEvaluator(tiny_section(tiny), split="validation", cache_tokens=False)
    memo = evaluator.evaluate(live, per_item=True)
    assert live.lm(evaluator.batch_size).tok_encode.cache_info().hits > 0
    assert plain.evaluate(live, per_item=True) == memo


def test_calls_are_quiet_unless_verbose(tiny, live, capfd):
    ev = HarnessEvaluator(tiny_section(tiny), split="validation")
    capfd.readouterr()
    ev.evaluate(live)  # wraps the model (lm-eval warns about that) and runs
    ev.evaluate(live)
    assert capfd.readouterr() == ("", "")
    one_task = tiny_section(tiny, tasks=["toy_next"])
    HarnessEvaluator(one_task, split="validation", verbose=True).evaluate(live)
    assert "Running loglikelihood requests" in capfd.readouterr().err


# --- perplexity --------------------------------------------------------------------------------


def test_perplexity_is_finite_deterministic_and_follows_the_weights(tiny, live):
    ev = PerplexityEvaluator(tiny.corpus, window=32)
    first, second = ev.evaluate(live, per_item=True), ev.evaluate(live, per_item=True)
    assert first == second
    assert math.isfinite(first.metrics["perplexity/ppl"]) and first.metrics["perplexity/ppl"] > 1
    assert math.isclose(first.metrics["perplexity/ppl"], math.exp(first.metrics["perplexity/nll"]))
    assert first.higher_is_better == {"perplexity/ppl": False, "perplexity/nll": False}
    nlls = first.per_item["perplexity/nll"]
    assert len(nlls) == 37  # 1200 words, 32-token windows, tail dropped
    assert math.isclose(sum(nlls) / len(nlls), first.metrics["perplexity/nll"], rel_tol=1e-12)
    assert ev.evaluate(live, limit=3, per_item=True).per_item["perplexity/nll"] == nlls[:3]

    with perturbed(live.model, scale=1.0):
        assert ev.evaluate(live).metrics != first.metrics
    assert ev.evaluate(live, per_item=True) == first


def test_perplexity_file_errors(tmp_path):
    with pytest.raises(EvaluatorError, match="does not exist"):
        PerplexityEvaluator(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(EvaluatorError, match="is empty"):
        PerplexityEvaluator(empty)


# --- packaging ---------------------------------------------------------------------------------


def test_evaluators_import_neither_optuna_nor_ray():
    code = (
        "import sys, evaluators, evaluators.harness, evaluators.perplexity, evaluators.protocol\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'ray'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
