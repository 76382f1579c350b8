"""evaluators/zoo: the toy zoo loads as real HF models and lm-eval tasks, and merging matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluators.engines import HFEngine
from evaluators.zoo import Zoo, build_zoo, load_zoo
from evaluators.zoo.build import write_task_data

# The fixed merge documented in evaluators/zoo/build.py: B + 0.5 * sum_k (M_k - B).
MERGE_LAMBDA = 0.5

# the `zoo` fixture (built once into the test cache, then reused) is in conftest.py; its first
# build takes a minute or more, and most of these tests run lm-eval over every zoo model
pytestmark = pytest.mark.slow


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _split_files(zoo: Zoo, skill: str, split: str) -> Path:
    return zoo.root / "data" / f"{skill}_{split}.jsonl"


def test_manifest_and_tokenizer(zoo: Zoo) -> None:
    from transformers import AutoTokenizer

    assert load_zoo(zoo.root) == zoo
    assert list(zoo.finetunes) == ["add", "succ", "rev", "sort"]
    assert zoo.tasks == [f"zoo_{s}" for s in zoo.finetunes]
    assert zoo.heldout_text.read_text().strip()
    tok = AutoTokenizer.from_pretrained(zoo.base)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    ids = tok("add 3 4 = 7", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert tok.decode(ids) == "add 3 4 = 7"


def test_load_zoo_rejects_missing_or_incomplete(tmp_path: Path, zoo: Zoo) -> None:
    with pytest.raises(ValueError, match="missing"):
        load_zoo(tmp_path)
    (tmp_path / "zoo.json").write_text((zoo.root / "zoo.json").read_text())
    with pytest.raises(ValueError, match="incomplete"):
        load_zoo(tmp_path)


def test_every_model_loads_with_finite_logits(zoo: Zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    ids = tok(["sort 3 1 2 = 1 2 3"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    for folder in (zoo.base, *zoo.finetunes.values()):
        assert (folder / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert type(model).__name__ == "LlamaForCausalLM"
        assert not model.config.tie_word_embeddings
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_tasks_load_in_lm_eval_with_distinct_splits(zoo: Zoo) -> None:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)
    loaded = manager.load(list(zoo.tasks))["tasks"]
    assert sorted(loaded) == sorted(zoo.tasks)
    for skill, name in zip(zoo.finetunes, zoo.tasks):
        task = loaded[name]
        assert task.has_validation_docs() and task.has_test_docs()
        val = [d["prompt"] for d in task.validation_docs()]
        test = [d["prompt"] for d in task.test_docs()]
        assert val and test and not set(val) & set(test)
        assert val == [d["prompt"] for d in _jsonl(_split_files(zoo, skill, "validation"))]
        # lm-eval scores the test split when a task declares one ...
        assert [d["prompt"] for d in task.eval_docs] == test
    # ... and the zoo_validation group forwards test_split: null to its members.
    grouped = manager.load(["zoo_validation"])["tasks"]
    for skill, name in zip(zoo.finetunes, zoo.tasks):
        expected = [d["prompt"] for d in _jsonl(_split_files(zoo, skill, "validation"))]
        assert [d["prompt"] for d in grouped[name].eval_docs] == expected


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_second_build_reuses_the_zoo(zoo: Zoo, capsys) -> None:
    """A build of a complete zoo with the same seed and settings trains nothing and writes
    nothing."""
    before, manifest = _stamps(zoo.root), (zoo.root / "zoo.json").read_bytes()
    capsys.readouterr()
    again = build_zoo(zoo.root, seed=0, progress=True)
    assert "[zoo]" not in capsys.readouterr().out  # a build reports each model it trains
    assert again == zoo
    assert _stamps(zoo.root) == before and (zoo.root / "zoo.json").read_bytes() == manifest
    # no build or trash folder beside it
    assert not list(zoo.root.parent.glob(f".{zoo.root.name}.*"))


def test_data_is_deterministic_and_depends_on_the_seed(tmp_path: Path, zoo: Zoo) -> None:
    same = write_task_data(tmp_path / "s0", seed=0)
    other = write_task_data(tmp_path / "s1", seed=1)
    for rel in same:
        assert (tmp_path / "s0" / rel).read_bytes() == (zoo.root / rel).read_bytes()
    assert any(
        (tmp_path / "s1" / rel).read_bytes() != (zoo.root / rel).read_bytes() for rel in other
    )
    assert (tmp_path / "s1" / "heldout.txt").read_text() != zoo.heldout_text.read_text()


# ----------------------------------------------------------------------------- merging matters


def task_arithmetic(
    base: dict[str, torch.Tensor], finetunes: list[dict[str, torch.Tensor]], lam: float
) -> dict[str, torch.Tensor]:
    """Reference merge, per tensor: B + lam * sum_k (M_k - B), equal weights."""
    return {name: b + lam * sum(ft[name] - b for ft in finetunes) for name, b in base.items()}


def _validation_accuracy(model, tok, manager, tasks: list[str]) -> list[float]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval 0.4.13 scores a task's test_split whenever the task declares one
    # (Task.eval_docs prefers test over validation), and a dict spec like
    # {"task": "zoo_add", "test_split": None} builds a new inline task instead of
    # overriding the registered one. The zoo_validation group yaml sets
    # test_split: null, which lm-eval forwards as an override to every member.
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=256),
        tasks=["zoo_validation"],
        task_manager=manager,
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    return [out["results"][name]["acc,none"] for name in tasks]


def test_merging_matters(zoo: Zoo) -> None:
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo.base)
    manager = TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False)
    model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fts = [
        dict(AutoModelForCausalLM.from_pretrained(folder).state_dict())
        for folder in zoo.finetunes.values()
    ]

    def score(state: dict[str, torch.Tensor]) -> list[float]:
        model.load_state_dict(state)
        return _validation_accuracy(model, tok, manager, zoo.tasks)

    base_acc = score(base)
    ft_acc = [score(ft) for ft in fts]
    merged_acc = score(task_arithmetic(base, fts, MERGE_LAMBDA))
    skills = list(zoo.finetunes)
    for i, skill in enumerate(skills):
        others = [ft_acc[j][i] for j in range(len(skills)) if j != i]
        # (1) each fine-tune is the best model on its own skill
        assert ft_acc[i][i] > max(base_acc[i], *others), (skill, base_acc, ft_acc)
        # (2) and worse than the base on at least one other skill
        assert any(ft_acc[i][j] < base_acc[j] for j in range(len(skills)) if j != i), (
            skill,
            base_acc,
            ft_acc[i],
        )
    # (3) the fixed merge beats every single fine-tune on mean accuracy, by a margin
    mean = lambda accs: sum(accs) / len(accs)  # noqa: E731
    best_ft = max(mean(a) for a in ft_acc)
    assert mean(merged_acc) > best_ft + 0.05, (merged_acc, ft_acc)


def test_adapter_equals_simple_evaluate_on_a_zoo_model(zoo: Zoo) -> None:
    """basin's adapter around a live zoo model scores exactly what lm-eval scores on the saved
    folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import HarnessEvaluator, HarnessSection

    folder = next(iter(zoo.finetunes.values()))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    section = HarnessSection(
        tasks=zoo.tasks, include_path=str(zoo.tasks_dir), batch_size=64, builtin_tasks=False
    )
    ours = HarnessEvaluator(section, split="validation").evaluate(HFEngine(model, tok))
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},device=cpu",
        batch_size=64,
        tasks=["zoo_validation"],
        task_manager=TaskManager(include_path=str(zoo.tasks_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
    )
    for name in zoo.tasks:
        assert ours.metrics[f"{name}/acc"] == out["results"][name]["acc,none"], name
