"""Shared fixtures: tiny real transformers models saved once per session, and the toy zoo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
VOCAB = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]


@dataclass(frozen=True)
class ModelSet:
    base: Path
    finetunes: list[Path]


def save_tokenizer(folder: Path) -> None:
    """A real word-level HF tokenizer over VOCAB that AutoTokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)


def _perturbed(model: torch.nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: value + scale * torch.randn(value.shape, generator=gen) * value.std().clamp(min=1e-3)
        for name, value in model.state_dict().items()
    }


def build_model_set(root: Path, config, n_finetunes: int) -> ModelSet:
    """Save a random base and perturbed 'fine-tunes' of it as safetensors HF folders."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    folders = []
    for i in range(n_finetunes + 1):
        folder = root / ("base" if i == 0 else f"ft{i}")
        if i:
            base_state = base.state_dict()
            model = AutoModelForCausalLM.from_config(config)
            model.load_state_dict(_perturbed(base, seed=100 + i, scale=0.05))
            assert set(model.state_dict()) == set(base_state)
        else:
            model = base
        model.save_pretrained(folder)
        save_tokenizer(folder)
        folders.append(folder)
    return ModelSet(base=folders[0], finetunes=folders[1:])


@pytest.fixture(scope="session")
def llama_set(tmp_path_factory) -> ModelSet:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return build_model_set(tmp_path_factory.mktemp("llama"), config, n_finetunes=3)


@pytest.fixture(scope="session")
def gpt2_set(tmp_path_factory) -> ModelSet:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=2, eos_token_id=3)
    return build_model_set(tmp_path_factory.mktemp("gpt2"), config, n_finetunes=2)
