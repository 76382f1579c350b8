"""PEFT LoRA adapters as fine-tunes: an adapter folder read against its base, each adapted tensor's
task vector held factored and expanded only while a merge reads it.

A LoRA adapter changes a weight W (d_out x d_in) by scale * B @ A, with A (r x d_in), B (d_out x r)
and scale = alpha / r (alpha / sqrt(r) with use_rslora; r and alpha per module with rank_pattern and
alpha_pattern). GPT-2's Conv1D stores W as (d_in, d_out) (fan_in_fan_out), and an embedding's
factors are (r x num_embeddings) and (dim x r): both take the transpose. Held factored, a tensor's
task vector costs r x (d_in + d_out) numbers instead of d_out x d_in; a tensor the adapter does not
touch has a zero task vector, given as a view of one zero (no memory). Expanded, the task vector is
what peft's own merge (merge_and_unload) adds to the base, to float rounding.

The adapter's config is read with peft's LoraConfig; what changes the weights in a way a task vector
of this form cannot carry (DoRA and the other LoRA variants, modules_to_save, trained biases,
initialisations that rewrite the base, trainable tokens, ...) is refused by name. Whether the
adapter was trained on this base is checked from the shapes (base_model_name_or_path is a path or a
hub id that says little here).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from merging.errors import MergeError
from merging.methods import all_finite

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PICKLE = "adapter_model.bin"
_MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_PREFIX = "base_model.model."  # peft's module path of the wrapped transformers model
# "<module>.lora_A.weight", "<module>.lora_A.<adapter>.weight", "<module>.lora_embedding_A", ...
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))??(?:\.weight)?$"
)
# the base embedding that peft saves beside adapted embeddings (save_embedding_layers)
_SAVED_BASE = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
# initialisations that rewrite the base weights: the adapter is relative to a changed base
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_UNSET = (None, False, [], {}, "")  # config values that switch nothing on
EXPAND_CHUNK = 1 << 22  # float32 entries expanded at once (16 MiB)


def is_adapter_folder(path: Path) -> bool:
    """Whether `path` is a PEFT adapter folder (adapter_config.json and no model weights)."""
    return (path / ADAPTER_CONFIG).is_file() and not any(
        (path / name).is_file() for name in _MODEL_WEIGHTS
    )


@dataclass(frozen=True)
class LoraFactors:
    """One tensor's task vector held factored: scale * B @ A, transposed when `transpose`."""

    a: Tensor  # (r, d_in)
    b: Tensor  # (d_out, r)
    scale: float
    transpose: bool  # the base stores the weight as (d_in, d_out): Conv1D, embeddings

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the base tensor it changes."""
        rows, cols = self.b.shape[0], self.a.shape[1]
        return (cols, rows) if self.transpose else (rows, cols)

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


def expand(f: LoraFactors, dtype: torch.dtype) -> Tensor:
    """The full task vector of `f` in `dtype` on its device: scale * B @ A (or its transpose),
    computed in float32 a block of rows at a time, as peft computes its merge."""
    out = torch.empty(f.shape, dtype=dtype, device=f.a.device)
    # a block of output rows: rows of B, or (transposed) columns of A
    left, right = (f.a.t(), f.b.t()) if f.transpose else (f.b, f.a)
    step = max(1, EXPAND_CHUNK // max(1, out.shape[1]))
    with torch.no_grad():
        for start in range(0, out.shape[0], step):
            block = left[start : start + step].float() @ right.float()
            out[start : start + step].copy_(block.mul_(f.scale))
    return out


def task_vector(held: Tensor | LoraFactors | None, base: Tensor) -> Tensor:
    """A fine-tune's task vector at one tensor, shaped as `base`, in its dtype, on its device: a
    full one as held, a factored one expanded, or zeros where an adapter does not touch the tensor
    (a view of one zero: no memory)."""
    if held is None:
        return base.new_zeros(()).expand(base.shape)
    if isinstance(held, LoraFactors):
        return expand(held, base.dtype)
    return held


@dataclass(frozen=True)
class LoraTarget:
    """Where one adapted base tensor's factors are in the adapter file, and their scale."""

    a_key: str
    b_key: str
    scale: float
    transpose: bool


class LoraAdapter:
    """A PEFT LoRA adapter folder: its config, checked for what basin cannot merge, and per base
    tensor it changes ("<module>.weight") the factors that change it. Only headers are read here."""

    def __init__(self, spec: str, path: Path, *, where: str = "") -> None:
        self.spec, self.path = spec, path
        self._label = f"{where}: adapter {spec}" if where else f"adapter {spec}"
        self.config = self._read_config()
        file = path / ADAPTER_WEIGHTS
        if not file.is_file():
            pickle = (
                " (it has only adapter_model.bin, a pickle)"
                if (path / _ADAPTER_PICKLE).is_file()
                else ""
            )
            raise MergeError(
                f"{self._label} has no {ADAPTER_WEIGHTS}{pickle}; save it again with peft's "
                "save_pretrained (safetensors is its default)"
            )
        self.file = file
        try:
            self._handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise MergeError(
                f"cannot read {file}: {exc}; the file may be truncated, download it again"
            ) from None
        self.keys = sorted(self._handle.keys())
        self.targets, self.saved_base = self._read_targets()

    def _refuse(self, what: str, way_out: str) -> MergeError:
        return MergeError(f"{self._label} {what}, which basin does not merge; {way_out}")

    def _read_config(self):
        from peft import LoraConfig

        file = self.path / ADAPTER_CONFIG
        try:
            raw = json.loads(file.read_text())
        except ValueError as exc:
            raise MergeError(f"{self._label}: {file} is not valid JSON ({exc})") from None
        kind = raw.get("peft_type")
        if kind != "LORA":
            raise self._refuse(
                f"is a PEFT {kind} adapter (peft_type: {kind})",
                "only LoRA adapters can be fine-tunes; merge it into the base with peft first "
                "and give the merged folder",
            )
        # peft drops the keys it does not know (a newer peft's): one may change the weights
        known = {f.name for f in fields(LoraConfig)}
        unknown = sorted(k for k, v in raw.items() if k not in known and v not in _UNSET)
        if unknown:
            from peft import __version__

            raise MergeError(
                f"{self._label}: {ADAPTER_CONFIG} sets {', '.join(unknown)}, which this peft "
                f"({__version__}) does not know, so basin cannot tell what it does; upgrade peft, "
                "or merge the adapter into the base with peft and give the merged folder"
            )
        try:
            config = LoraConfig.from_pretrained(str(self.path))
        except Exception as exc:  # peft raises TypeError/ValueError for fields it does not know
            raise MergeError(
                f"{self._label}: peft cannot read {ADAPTER_CONFIG} ({type(exc).__name__}: {exc}); "
                "it may come from a newer peft: upgrade peft, or merge the adapter into the base "
                "and give the merged folder"
            ) from None
        merged_first = "merge it into the base with peft first and give the merged folder"
        # peft marks the fields that select a LoRA variant (DoRA, VeLoRA, aLoRA, ...)
        for f in fields(config):
            value = getattr(config, f.name)
            if f.metadata.get("is_lora_variant") and value:
                name = "DoRA" if f.name == "use_dora" else "a LoRA variant"
                raise self._refuse(f"uses {name} ({f.name}: {_show(value)})", merged_first)
        refused = (
            ("use_qalora", "QA-LoRA"),
            ("lora_bias", "trained LoRA biases"),
            ("modules_to_save", "full copies of other modules"),
            ("trainable_token_indices", "trained token embeddings"),
            ("target_parameters", "LoRA on raw parameters"),
            ("layer_replication", "replicated layers"),
        )
        for key, what in refused:
            value = getattr(config, key, None)
            if value:
                raise self._refuse(f"holds {what} ({key}: {_show(value)})", merged_first)
        if config.bias != "none":
            raise self._refuse(f"trains biases (bias: {config.bias})", merged_first)
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            raise self._refuse(
                f"was initialised with {init} (init_lora_weights: {init}), which rewrites the "
                "base weights",
                "convert it to a plain LoRA with save_pretrained's "
                "path_initial_model_for_weight_conversion, or merge it into the base with peft "
                "and give the merged folder",
            )
        return config

    def _read_targets(self) -> tuple[dict[str, LoraTarget], dict[str, str]]:
        from peft.utils.other import get_pattern_key

        factors: dict[str, dict[str, str]] = {}
        saved_base: dict[str, str] = {}
        adapters, other = set(), []
        for key in self.keys:
            short = key.removeprefix(_PREFIX)
            if m := _FACTOR.match(short):
                factors.setdefault(m["module"], {})[m["part"]] = key
                adapters.add(m["adapter"])
            elif m := _SAVED_BASE.match(short):
                saved_base[m["module"] + ".weight"] = key
            else:
                other.append(key)
        if other:
            shown = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
            raise self._refuse(
                f"holds tensors other than LoRA factors ({shown})",
                "merge it into the base with peft first and give the merged folder",
            )
        if len(adapters) > 1:
            raise self._refuse(
                f"holds {len(adapters)} adapters ({', '.join(sorted(map(str, adapters)))})",
                "save each adapter to its own folder (save_pretrained(selected_adapters=[...]))",
            )
        if not factors:
            raise MergeError(f"{self._label} holds no LoRA factors in {self.file}")
        cfg = self.config
        targets = {}
        for module, parts in sorted(factors.items()):
            embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a_part, b_part = (
                ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
            )
            if a_part not in parts or b_part not in parts:
                missing = a_part if a_part not in parts else b_part
                raise MergeError(
                    f"{self._label} has no {missing} for module '{module}'; the file is "
                    "incomplete: save the adapter again"
                )
            a_shape = self._handle.get_slice(parts[a_part]).get_shape()
            b_shape = self._handle.get_slice(parts[b_part]).get_shape()
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise self._refuse(
                    f"adapts module '{module}' with factors of shapes {a_shape} and {b_shape} "
                    "(a convolution, or a damaged file)",
                    "basin merges LoRA on linear, Conv1D and embedding layers; merge it into the "
                    "base with peft first and give the merged folder",
                )
            rank = a_shape[0]
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
            alpha = cfg.alpha_pattern.get(
                get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha
            )
            if r != rank:
                raise MergeError(
                    f"{self._label}: module '{module}' has rank {rank} in {ADAPTER_WEIGHTS} but "
                    f"{r} in {ADAPTER_CONFIG} (r / rank_pattern); the two files do not belong "
                    "together: save the adapter again"
                )
            scale = alpha / math.sqrt(r) if cfg.use_rslora else alpha / r
            targets[module + ".weight"] = LoraTarget(
                parts[a_part], parts[b_part], scale, embedding or bool(cfg.fan_in_fan_out)
            )
        for name in saved_base:
            if name not in targets:
                raise self._refuse(
                    f"holds a full copy of '{name}' without adapting it",
                    "merge it into the base with peft first and give the merged folder",
                )
        return targets, saved_base

    def check_base(self, base_shapes: dict[str, tuple[int, ...]], base_label: str) -> None:
        """Raise MergeError unless every tensor the adapter changes is in the base, with the shape
        its factors give."""
        for name, target in self.targets.items():
            if name not in base_shapes:
                raise MergeError(
                    f"{self._label} adapts module '{name.removesuffix('.weight')}', but the base "
                    f"'{base_label}' has no tensor '{name}': the adapter was made for another "
                    "model; give the base it was trained on"
                )
            rows = self._handle.get_slice(target.b_key).get_shape()[0]
            cols = self._handle.get_slice(target.a_key).get_shape()[1]
            shape = (cols, rows) if target.transpose else (rows, cols)
            if tuple(base_shapes[name]) != shape:
                hint = (
                    "; fan_in_fan_out in its config looks wrong (the transpose fits)"
                    if tuple(base_shapes[name]) == shape[::-1]
                    else ": the adapter was made for another model; give the base it was trained on"
                )
                raise MergeError(
                    f"{self._label} changes '{name}' by a {shape[0]}x{shape[1]} update, but the "
                    f"base '{base_label}' has it as {tuple(base_shapes[name])}{hint}"
                )
        for name, key in self.saved_base.items():
            saved = tuple(self._handle.get_slice(key).get_shape())
            if saved != tuple(base_shapes[name]):
                raise self._refuse(
                    f"holds its own copy of '{name}' shaped {saved}, not the base's "
                    f"{tuple(base_shapes[name])} (a resized vocabulary)",
                    "merge it into its base with peft first and give the merged folder",
                )

    def check_saved_copy(self, name: str, base: Tensor) -> None:
        """Raise MergeError unless the copy of base tensor `name` the adapter carries (peft saves
        adapted embeddings whole) equals the base's."""
        saved = self._read(self.saved_base[name], "cpu", None)
        if not torch.equal(saved, base.to(device="cpu", dtype=saved.dtype)):
            raise self._refuse(
                f"holds its own copy of '{name}' that differs from the base's (a retrained or "
                "resized embedding)",
                "merge it into its base with peft first and give the merged folder",
            )

    def held_numel(self) -> int:
        """Entries of the factors, all adapted tensors together (what a merger holds)."""
        total = 0
        for target in self.targets.values():
            for key in (target.a_key, target.b_key):
                total += math.prod(self._handle.get_slice(key).get_shape())
        return total

    def factors(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> LoraFactors | None:
        """The factors that change base tensor `name`, on device in dtype; None where the adapter
        does not change it."""
        target = self.targets.get(name)
        if target is None:
            return None
        return LoraFactors(
            a=self._read(target.a_key, device, dtype),
            b=self._read(target.b_key, device, dtype),
            scale=target.scale,
            transpose=target.transpose,
        )

    def _read(self, key: str, device: str | torch.device, dtype: torch.dtype | None) -> Tensor:
        t = self._handle.get_tensor(key)
        t = t.to(device=device, dtype=dtype or t.dtype)
        if not all_finite(t):
            raise MergeError(
                f"{self._label} tensor '{key}' contains NaN or inf; the adapter is damaged: "
                "save it again, or leave it out"
            )
        return t


def _show(value: object) -> str:
    """A config value as adapter_config.json spells it."""
    return json.dumps(value) if isinstance(value, (bool, list, dict, int, float, str)) else "set"
