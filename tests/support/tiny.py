"""Tiny offline fixtures: random Llama / GPT-2 models with a word-level tokenizer, local lm-eval
tasks."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluators.zoo.tokenizer import save_tokenizer as _save_tokenizer
from evaluators.zoo.tokenizer import word_level_tokenizer

VOCAB: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>", "=") + tuple(f"w{i}" for i in range(59))
WORDS: tuple[str, ...] = VOCAB[5:]
TASKS: tuple[str, ...] = ("toy_next", "toy_pair")
SPLITS: tuple[str, ...] = ("validation", "test")


@dataclass(frozen=True)
class ModelSet:
    base: Path
    finetunes: list[Path]


@dataclass(frozen=True)
class TinyTasks:
    """A local lm-eval task folder and what each task contains."""

    folder: Path
    names: tuple[str, ...]
    data_files: dict[str, dict[str, str]]

    def config(self, name: str, splits: tuple[str, ...] = SPLITS) -> dict[str, Any]:
        """The task's lm-eval config, declaring only `splits` (lm-eval scores test when
        declared)."""
        return task_config(name, {s: self.data_files[name][s] for s in splits})


# --- models ---------------------------------------------------------------------------------------


def save_tokenizer(folder: Path) -> None:
    """Save a real word-level HF tokenizer over VOCAB that AutoTokenizer loads."""
    _save_tokenizer(word_level_tokenizer(VOCAB), folder)


def llama_config(
    *, hidden: int = 32, layers: int = 2, intermediate: int | None = None, positions: int = 128
):
    """A LlamaConfig over VOCAB: 4 heads, 2 key-value heads, untied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        tie_word_embeddings=False,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def gpt2_config():
    """A GPT2Config over VOCAB: hidden 32, 2 layers, 4 heads (tied embeddings, as GPT-2 has)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(VOCAB),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=2,
        eos_token_id=3,
    )


def build_model(folder: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a random LlamaForCausalLM (hidden 32, 2 layers) and its tokenizer into `folder`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(hidden=hidden, layers=layers))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: value + scale * torch.randn(value.shape, generator=gen) * value.std().clamp(min=1e-3)
        for name, value in model.state_dict().items()
    }


def build_model_set(root: Path, config, n_finetunes: int) -> ModelSet:
    """Save a random base and perturbed 'fine-tunes' of it (safetensors HF folders) under `root`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    folders = []
    for i in range(n_finetunes + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        if i:
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(_perturbed(base, seed=100 + i, scale=0.05))
        else:
            model = base
        model.save_pretrained(folder)
        save_tokenizer(folder)
        folders.append(folder)
    return ModelSet(base=folders[0], finetunes=folders[1:])


# --- tasks and text -------------------------------------------------------------------------------


def _items(task: str, n: int, rng: random.Random) -> list[dict[str, Any]]:
    # toy_next: continue a run of consecutive words; toy_pair: repeat the first word of a pair.
    items = []
    for _ in range(n):
        start = rng.randrange(len(WORDS) - 8)
        if task == "toy_next":
            context = " ".join(WORDS[start : start + 4])
            answer = WORDS[start + 4]
        else:
            context = f"{WORDS[start]} {WORDS[start + 3]} = "
            answer = WORDS[start]
        distractors = rng.sample([w for w in WORDS if w != answer], 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [answer] + distractors[label:]
        items.append({"context": context, "choices": choices, "label": label})
    return items


def task_config(name: str, data_files: dict[str, str]) -> dict[str, Any]:
    """An lm-eval multiple-choice config over local jsonl files, prompts written as jinja
    templates."""
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": dict(data_files)},
        "output_type": "multiple_choice",
        "doc_to_text": "{{context.strip()}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if name == "toy_pair":
        config["metric_list"].append(
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
        )
    for split in ("train", "validation", "test"):
        if split in data_files:
            config["training_split" if split == "train" else f"{split}_split"] = split
    return config


def build_tasks(folder: Path, *, n_items: int = 30, seed: int = 0) -> TinyTasks:
    """Write two multiple-choice tasks (validation and test splits of `n_items`) into `folder`."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data_files: dict[str, dict[str, str]] = {}
    for name in TASKS:
        data_files[name] = {}
        for split in SPLITS:
            path = (folder / f"{name}_{split}.jsonl").resolve()
            path.write_text("".join(json.dumps(x) + "\n" for x in _items(name, n_items, rng)))
            data_files[name][split] = str(path)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, data_files[name])))
    return TinyTasks(folder=folder, names=TASKS, data_files=data_files)


def write_text_corpus(path: Path, *, n_words: int = 600, seed: int = 0) -> Path:
    """Write a whitespace-separated corpus over the tiny vocabulary (for perplexity)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n_words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path
