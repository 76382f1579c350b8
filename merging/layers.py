"""Where a tensor sits in the network: its layer, its relative depth and its kind (attn/mlp/other).

Per-layer parameter values are resolved from this place. Embeddings sit at depth 0, the final norm
and the head at depth 1, layer i of L at depth i / (L - 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from merging.errors import MergeError

# `model.layers.3.`, `transformer.h.3.`, `blocks.3.`, `encoder.layer.3.`: the decoder-stack
# families.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = re.compile(
    r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|tok_embeddings|embed_in|position_embeddings)\."
)
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out|output)\.")
_FINAL_NORM = re.compile(r"(?:^|\.)(?:norm|ln_f|final_layer_norm|final_layernorm|final_norm)\.")
# tried before _ATTN: `post_attention_layernorm` is a norm, not attention
_LAYER_NORM = re.compile(r"layernorm|layer_norm|(?:^|\.)ln_\w*\.")
_ATTN = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|feed_forward|ffn")

KINDS = ("attn", "mlp", "other")


@dataclass(frozen=True)
class TensorPlace:
    """A tensor's layer index (None outside the stack), depth in [0, 1] and kind."""

    layer: int | None
    depth: float
    kind: str  # one of KINDS


@dataclass(frozen=True)
class LayerMap:
    """The place of every tensor of one architecture."""

    num_layers: int
    places: dict[str, TensorPlace]

    def __getitem__(self, name: str) -> TensorPlace:
        return self.places[name]


def at_top(name: str) -> bool:
    """Whether a tensor name (or a mergekit filter naming one) is the final norm or the head: the
    tensors basin places at depth 1."""
    probe = name if name.endswith(".") else name + "."
    return bool(_HEAD.search(probe) or _FINAL_NORM.search(probe)) and not _LAYER.search(probe)


def _kind(name: str) -> str:
    if _LAYER_NORM.search(name):
        return "other"
    if _ATTN.search(name):
        return "attn"
    if _MLP.search(name):
        return "mlp"
    return "other"


def build_layer_map(names: Iterable[str]) -> LayerMap:
    """Map tensor names to places; a name that fits no known family is an error, never a guess."""
    names = sorted(names)
    layers: dict[str, int] = {}
    outside: dict[str, float] = {}
    unmapped = []
    for name in names:
        if match := _LAYER.search(name):
            layers[name] = int(match.group(1))
        elif _EMBED.search(name):
            outside[name] = 0.0
        elif _HEAD.search(name) or _FINAL_NORM.search(name):
            outside[name] = 1.0
        else:
            unmapped.append(name)
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (
            f" (+{len(unmapped) - 5} more)" if len(unmapped) > 5 else ""
        )
        raise MergeError(
            f"cannot place {len(unmapped)} tensor(s) in the layer stack: {shown}. basin maps "
            "Llama/Mistral/Qwen2 (`model.layers.N.`), GPT-2 (`transformer.h.N.`) and similar "
            "(`blocks.N.`, `layer.N.`) names plus embeddings, final norm and lm_head; a model "
            "with other names needs a mapping added in merging/layers.py."
        )
    if not layers:
        raise MergeError(
            "found no layer-indexed tensors (`layers.N.`, `h.N.`, ...): "
            "is this a causal LM checkpoint?"
        )
    num_layers = max(layers.values()) + 1
    span = max(num_layers - 1, 1)
    places = {name: TensorPlace(None, depth, "other") for name, depth in outside.items()}
    places.update({name: TensorPlace(i, i / span, _kind(name)) for name, i in layers.items()})
    return LayerMap(num_layers=num_layers, places=places)
