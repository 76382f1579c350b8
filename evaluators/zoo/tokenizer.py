"""A word-level HF tokenizer over a fixed vocabulary, saved so that AutoTokenizer loads it.

The toy zoo and the tests' tiny models use it: tokens are whitespace-separated words, and the
vocabulary holds the special tokens ``<pad>``, ``<unk>``, ``<s>`` and ``</s>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .skills import SPECIAL_TOKENS


def word_level_tokenizer(vocabulary: Sequence[str]):
    """A PreTrainedTokenizerFast mapping each word of ``vocabulary`` to its index.

    No model_max_length: the perplexity evaluator tokenizes a whole held-out text at once, and
    lm-eval reads the context size from the model config.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    missing = [t for t in SPECIAL_TOKENS if t not in vocabulary]
    if missing:
        raise ValueError(f"the vocabulary lacks the special tokens {missing}")
    raw = Tokenizer(
        models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>")
    )
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="right",
    )


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """Save ``tokenizer`` into ``folder`` so that AutoTokenizer loads it in transformers 4 and 5."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    # transformers 5 records its own class name (TokenizersBackend), which 4.x
    # cannot resolve; PreTrainedTokenizerFast loads in both.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
