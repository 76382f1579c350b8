"""The vllm engine against the hf engine on the same candidates (real zoo models, real vLLM CPU
build, real lm-eval): same scores, swaps that are whole, a prefix cache that never serves the
previous candidate's KV blocks, and a study run end to end with it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from evaluators import HarnessEvaluator, HarnessSection
from evaluators.engines import EngineStart, HFEngine
from merging import ResidentMerger, recipe_from_dict

pytestmark = pytest.mark.slow

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
MC = ["zoo_add", "zoo_sort"]
GEN = ["zoo_sort_gen", "zoo_add_gen"]
# log-probabilities of one continuation: vLLM's float32 kernels against transformers' eager ones
LOGPROB_TOL = 1e-3


def _recipe(zoo, method: str, density: float = 1.0, **parameters) -> dict:
    models = [
        {"path": str(path), "weight": w, "density": density}
        for path, w in zip(zoo.finetunes.values(), (0.9, 0.4, 0.7, 0.2))
    ]
    return {"method": method, "base": str(zoo.base), "models": models, "parameters": parameters}


@pytest.fixture(scope="module")
def base(zoo, tmp_path_factory) -> Path:
    """The zoo's base with a chat template in its tokenizer (chat prompts go through it)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("vllm") / "base"
    shutil.copytree(zoo.base, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def merger(zoo) -> ResidentMerger:
    return ResidentMerger(str(zoo.base), [str(p) for p in zoo.finetunes.values()])


@pytest.fixture(scope="module")
def hf(base) -> HFEngine:
    return HFEngine.start(EngineStart(str(base), "cpu", "float32"))


@pytest.fixture(scope="module")
def vllm(base):
    from evaluators.vllm_engine import VLLMEngine

    section = HarnessSection(tasks=MC, engine="vllm")  # a CPU engine: 32-token KV blocks
    engine = VLLMEngine.start(EngineStart(str(base), "cpu", "float32", threads=1), section)
    yield engine
    engine.close()


def _section(zoo, tasks: list[str], **fields) -> HarnessSection:
    return HarnessSection(
        tasks=tasks,
        include_path=str(zoo.tasks_dir),
        builtin_tasks=False,
        batch_size=32,
        limit=60,
        **fields,
    )


def _both(engines, merger, recipe, evaluator) -> list:
    """Load the candidate into each engine and score it there, per item."""
    out = []
    for engine in engines:
        engine.load(merger.candidate(recipe))
        out.append(evaluator.evaluate(engine, per_item=True))
    return out


def test_vllm_scores_a_candidate_as_the_hf_engine_does(zoo, merger, hf, vllm):
    recipe = recipe_from_dict(_recipe(zoo, "ties", 0.6, **{"lambda": 1.1}))
    evaluator = HarnessEvaluator(_section(zoo, MC + GEN, num_fewshot=2), split="validation")
    ours, theirs = _both((hf, vllm), merger, recipe, evaluator)
    assert ours.metrics.keys() == theirs.metrics.keys()
    for key, values in ours.per_item.items():
        differ = [i for i, (a, b) in enumerate(zip(values, theirs.per_item[key])) if a != b]
        assert len(values) == len(theirs.per_item[key]) >= 40 and not differ, (key, differ)
    # the candidate's answers vary: a real comparison, not two constants
    assert all(0 < ours.metrics[f"{task}/acc"] < 1 for task in MC)
    assert any(0 < ours.metrics[f"{task}/exact_match,answer"] < 1 for task in GEN)


def test_loglikelihoods_agree_within_the_stated_tolerance(zoo, merger, hf, vllm):
    from lm_eval.api.instance import Instance

    recipe = recipe_from_dict(_recipe(zoo, "dare_ties", 0.5))
    lines = (Path(zoo.tasks_dir).parent / "data" / "add_validation.jsonl").read_text().splitlines()
    docs = [json.loads(line) for line in lines[:24]]
    requests = [
        Instance("loglikelihood", doc, (doc["prompt"], " " + choice), i)
        for i, doc in enumerate(docs)
        for choice in doc["choices"][:2]
    ]
    scores = []
    for engine in (hf, vllm):
        engine.load(merger.candidate(recipe))
        scores.append(engine.lm(32).loglikelihood(requests))
    gaps = [abs(a[0] - b[0]) for a, b in zip(*scores)]
    assert max(gaps) < LOGPROB_TOL, max(gaps)
    assert len({round(s[0], 3) for s in scores[0]}) > 10  # real, varied log-probabilities


def test_chat_template_prompts_score_the_same(zoo, merger, hf, vllm):
    recipe = recipe_from_dict(_recipe(zoo, "task_arithmetic", **{"lambda": 0.8}))
    section = _section(zoo, GEN, apply_chat_template=True, system_instruction="sort add")
    evaluator = HarnessEvaluator(section, split="test")
    ours, theirs = _both((hf, vllm), merger, recipe, evaluator)
    assert ours.per_item == theirs.per_item


def _generations(engine, prompts: list[str]) -> list[str]:
    from lm_eval.api.instance import Instance

    until = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance("generate_until", {}, (p, until), i) for i, p in enumerate(prompts)]
    return engine.lm(32).generate_until(requests)


def _long_prompts(zoo) -> list[str]:
    """Prompts of ~50 tokens sharing their first 40: a full KV block of 32 tokens in common."""
    lines = Path(zoo.heldout_text).read_text().split()
    shared = " ".join(lines[:40])
    return [f"{shared} {' '.join(lines[40 + 3 * i : 43 + 3 * i])}" for i in range(8)]


def test_a_swap_never_serves_the_previous_candidate_s_cached_blocks(zoo, merger, hf, vllm):
    before, after = (
        recipe_from_dict(_recipe(zoo, "task_arithmetic", **{"lambda": 1.4})),
        recipe_from_dict(_recipe(zoo, "ties", 0.3)),
    )
    prompts = _long_prompts(zoo)
    hf.load(merger.candidate(after))
    expected = _generations(hf, prompts)

    def stale_after_swap() -> list[str]:
        vllm.llm.reset_prefix_cache()  # from an empty cache
        vllm.load(merger.candidate(before))
        _generations(vllm, prompts)  # the cache now holds `before`'s blocks of the shared prefix
        vllm.load(merger.candidate(after))
        return _generations(vllm, prompts)

    assert stale_after_swap() == expected
    # Without the reset the same sequence answers from `before`'s blocks: this test would see it.
    reset = vllm._reset_prefix_cache
    vllm._reset_prefix_cache = lambda: None
    try:
        assert stale_after_swap() != expected
    finally:
        vllm._reset_prefix_cache = reset
        vllm.llm.reset_prefix_cache()


def _choice_requests(zoo) -> list:
    """Loglikelihood requests as a few-shot multiple choice makes them: contexts longer than one
    32-token KV block, each shared by continuations of 1, 2 and up to 20 tokens (the zoo's
    models hold 64 positions), two of them the same but for their last token."""
    from lm_eval.api.instance import Instance

    words = Path(zoo.heldout_text).read_text().split()
    out = []
    for k in range(3):
        context = " ".join(words[50 * k : 50 * k + 36])
        tail = words[50 * k + 36 : 50 * k + 56]
        choices = [
            " " + tail[0],  # one token
            " " + " ".join(tail[1:3]),  # two
            " " + " ".join(tail),  # twenty
            " " + " ".join(tail[:19] + [words[7]]),  # the same first 19, another last
            " " + " ".join(reversed(tail[3:9])),
        ]
        out += [Instance("loglikelihood", {}, (context, c), len(out)) for c in choices]
    return out


def test_choices_sharing_a_context_share_its_cached_blocks_and_score_as_hf(
    zoo, merger, hf, vllm, monkeypatch
):
    from lm_eval.models.vllm_causallms import VLLM

    from evaluators import vllm_engine

    recipe = recipe_from_dict(_recipe(zoo, "ties", 0.6))
    requests = _choice_requests(zoo)
    hf.load(merger.candidate(recipe))
    expected = hf.lm(32).loglikelihood(requests)

    cached, stale, generate = [], [], VLLM._model_generate
    tails = vllm_engine._continuation_tails

    def counted_generate(lm, prompts, *args):
        outputs = generate(lm, prompts, *args)
        cached.extend(o.num_cached_tokens or 0 for o in outputs)
        return outputs

    def counted_tails(lm, reqs, indices, reuse):
        found = tails(lm, reqs, indices, reuse)
        stale.extend(i for i, tail in found.items() if tail is None)
        return found

    # a CPU engine started without a block size takes 32-token blocks: these contexts fill one
    assert vllm.llm.llm_engine.vllm_config.cache_config.block_size == vllm_engine.CPU_BLOCK_SIZE
    monkeypatch.setattr(VLLM, "_model_generate", counted_generate)
    monkeypatch.setattr(vllm_engine, "_continuation_tails", counted_tails)
    vllm.load(merger.candidate(recipe))
    ours = vllm.lm(32).loglikelihood(requests)
    gaps = [abs(a[0] - b[0]) for a, b in zip(ours, expected, strict=True)]
    assert max(gaps) < LOGPROB_TOL * 20, max(gaps)  # up to 20 tokens summed
    assert [g for _, g in ours] == [g for _, g in expected]
    assert len({round(x, 2) for x, _ in expected}) == len(expected)  # real, varied scores
    # the contexts' blocks were read from the cache, not computed once per choice
    assert sum(cached) >= 32 * 3 * 3, cached

    # A prompt found cached past its context has no rows for the tokens it needs: it is scored
    # again without the cache. Warm the first block with a 20-token context and a 20-token
    # choice, then ask for the choice that shares its first 19 tokens.
    vllm.llm.reset_prefix_cache()
    choice = [3 + i % 15 for i in range(20)]  # the zoo's vocabulary has 19 tokens
    assert tails(vllm.lm(32), [(None, [5] * 20, choice)], [0], True)[0] is not None
    twin = [(None, [5] * 20, choice[:19] + [choice[19] + 1])]
    assert tails(vllm.lm(32), twin, [0], True)[0] is None
    assert tails(vllm.lm(32), twin, [0], False)[0] is not None


class _FailsHalfWay:
    """A candidate whose merge fails at its `at`-th tensor (as a non-finite merge would)."""

    def __init__(self, weights, at: int) -> None:
        self._weights, self._at = weights, at
        self.names, self.base = weights.names, weights.base

    def stream(self):
        for i, item in enumerate(self._weights.stream()):
            if i == self._at:
                raise FloatingPointError("merged tensor is not finite")
            yield item


def test_a_swap_that_fails_half_way_fails_its_candidate_and_the_next_is_whole(
    zoo, merger, hf, vllm
):
    good = recipe_from_dict(_recipe(zoo, "ties", 0.7))
    evaluator = HarnessEvaluator(_section(zoo, GEN), split="validation")
    half = _FailsHalfWay(merger.candidate(good), at=len(merger.names) // 2)
    with pytest.raises(FloatingPointError, match="not finite"):
        vllm.load(half)
    assert vllm.broken is None  # vLLM's load finished with the base's tensors: still usable
    ours, theirs = _both((hf, vllm), merger, good, evaluator)
    assert ours.per_item == theirs.per_item


def test_vllm_on_a_candidate_equals_a_fresh_engine_on_its_export(zoo, merger, vllm, tmp_path):
    from evaluators.vllm_engine import VLLMEngine
    from merging import export_merge

    recipe = recipe_from_dict(_recipe(zoo, "dare_linear", 0.6))
    evaluator = HarnessEvaluator(_section(zoo, MC + GEN), split="test")
    vllm.load(merger.candidate(recipe))
    swapped = evaluator.evaluate(vllm, per_item=True)
    folder = export_merge(recipe, tmp_path / "merged", progress=False)
    section = HarnessSection(tasks=MC, engine="vllm")  # a CPU engine: 32-token KV blocks
    fresh = VLLMEngine.start(EngineStart(str(folder), "cpu", "float32", threads=1), section)
    try:
        assert evaluator.evaluate(fresh, per_item=True).per_item == swapped.per_item
    finally:
        fresh.close()
    assert torch.get_num_threads() == 1  # vLLM's start left basin's thread setting alone


def test_a_study_runs_promotes_and_reports_with_the_vllm_engine(zoo, tmp_path):
    """The generative demo with `--set evaluator.engine=vllm`: two Ray workers each holding one
    vLLM engine, multi-fidelity rungs promoted on the engine that holds the candidate, held-out
    scores from the report; every score equals the hf engine's on the same recipe."""
    import yaml

    from search.attrs import METRICS, PROMOTED_TO
    from search.cli import main
    from search.config import config_to_dict
    from search.demo import load_demo_config
    from search.folder import load_study_folder, trial_recipe

    folder = tmp_path / "study"
    overrides = [
        "evaluator.engine=vllm",
        "budget.n_trials=6",
        "sampler.n_startup_trials=2",
        "fidelity.rungs=[24]",
        "fidelity.keep=0.5",
    ]
    config = load_demo_config(str(folder), overrides, zoo=str(zoo.root), generative=True)
    study_yaml = tmp_path / "study.yaml"
    study_yaml.write_text(yaml.safe_dump(config_to_dict(config)))
    assert main(["run", str(study_yaml), "--quiet"]) == 0
    config, study = load_study_folder(folder)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 3 and not [t for t in study.trials if t.state.name == "FAIL"]

    # the best trial went past the first rung: it was scored on every search item by the engine
    # that held it, and its metrics equal a full hf evaluation of its recipe
    best = max(done, key=lambda t: t.value)
    assert best.user_attrs[PROMOTED_TO] is None
    section = config.evaluator.model_copy(update={"engine": "hf"})
    evaluator = HarnessEvaluator(section, split="validation", carve=section.carve("search"))
    models = config.models
    hf = HFEngine.start(EngineStart(models.base, "cpu", "float32"))
    hf.load(ResidentMerger(models.base, models.finetunes).candidate(trial_recipe(config, best)))
    expected = evaluator.evaluate(hf).metrics
    assert {k: best.user_attrs[METRICS][k] for k in expected} == pytest.approx(expected, abs=1e-9)

    assert main(["report", str(folder), "--quiet"]) == 0
    held = (folder / "heldout" / "validation-holdout" / f"{best.number}.json").read_text()
    assert set(json.loads(held)["metrics"]) == {
        f"{t}/exact_match,answer" for t in zoo.generative_tasks
    }


def test_a_torchvision_that_breaks_imports_is_named_with_the_fix(tmp_path):
    """vLLM's CPU build pulls a torchvision that fails to import beside this torch; the engine
    says so before vLLM (and transformers through it) trips over it."""
    import subprocess
    import sys

    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    code = (
        "from evaluators.vllm_engine import check_installed\n"
        "try:\n    check_installed()\nexcept Exception as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "torchvision is installed but cannot be imported" in out
    assert "pip uninstall -y torchvision torchaudio torchcodec" in out
