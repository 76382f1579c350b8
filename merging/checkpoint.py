"""Reading HF model folders (and PEFT LoRA adapter folders, merging/lora.py) tensor by tensor, and
checking that models can be merged at all."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from merging.errors import MergeError
from merging.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, is_adapter_folder
from merging.methods import all_finite

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_hub_id(spec: str) -> bool:
    """Whether `spec` reads as a hub repo id (org/name) rather than a local path."""
    return bool(_HUB_ID.match(spec)) and not Path(spec).expanduser().exists()


def resolve_model_dir(spec: str) -> Path:
    """A local model folder, or the hub snapshot of a repo id (safetensors and small files only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise MergeError(
            f"model '{spec}' is a file; give the model's folder (the one holding config.json)"
        )
    if not _HUB_ID.match(spec):
        raise MergeError(
            f"model folder not found: {spec}; check the path (a relative one is read from the "
            "current folder), or give a hub id such as org/name"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=spec,
            allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as exc:  # the hub client raises many types; all mean "not reachable"
        raise MergeError(
            f"model '{spec}' is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}: {exc}); check the path, or download it first"
        ) from None
    return Path(local)


class Checkpoint:
    """One model folder: its config, and its tensors read lazily, one at a time.

    A PEFT LoRA adapter folder is a checkpoint too: `adapter` describes it (which base tensors it
    changes, and how), its tensors are the adapter's own, and its config is empty.
    """

    def __init__(self, spec: str, *, allow_pickle: bool = False, where: str = "") -> None:
        """where: the config or recipe field that names the model (models[1]), for messages."""
        self.spec = spec
        self.path = resolve_model_dir(spec)
        self.pickle = False
        self._handles: dict[Path, object] = {}
        self._pickle_cache: tuple[Path, dict] | None = None
        self.adapter: LoraAdapter | None = None
        if is_adapter_folder(self.path):
            self.adapter = LoraAdapter(spec, self.path, where=where)
            self.config: dict = {}
            self.files = {name: self.adapter.file for name in self.adapter.keys}
            return
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MergeError(
                f"model '{spec}' has no config.json in {self.path}: give the folder that "
                "save_pretrained wrote (config.json and safetensors weights), or a PEFT LoRA "
                f"adapter folder ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            )
        self.config = json.loads(config_file.read_text())
        self.files = self._weight_files(allow_pickle)

    def _weight_files(self, allow_pickle: bool) -> dict[str, Path]:
        """tensor name -> file holding it, from the shard index or the single file."""
        for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (PICKLE_INDEX, PICKLE_SINGLE)):
            index, one = self.path / index_name, self.path / single
            if not index.is_file() and not one.is_file():
                continue
            if single == PICKLE_SINGLE:
                if not allow_pickle:
                    raise MergeError(
                        f"model '{self.spec}' has only pickle weights ({single}), which can run "
                        "code when loaded; convert it to safetensors, or allow pickle "
                        "(--allow-pickle / allow_pickle: true) if you trust its source"
                    )
                self.pickle = True
            if index.is_file():
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
                files = {name: self.path / f for name, f in weight_map.items()}
            else:
                files = None
            shard_paths = sorted(set(files.values())) if files else [one]
            for shard in shard_paths:
                if not shard.is_file():
                    raise MergeError(
                        f"model '{self.spec}' is missing shard {shard.name} named "
                        "in its index; download it again"
                    )
            if files is None:
                files = {name: one for name in self._names_in(one)}
            return files
        raise MergeError(
            f"model '{self.spec}' has no weights ({SAFE_SINGLE} or {SAFE_INDEX}) in {self.path}"
        )

    def _names_in(self, file: Path) -> list[str]:
        if self.pickle:
            return list(self._load_pickle(file))
        return list(self._handle(file).keys())

    def _handle(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:
                raise MergeError(
                    f"cannot read {file}: {exc}; the file may be truncated, download it again"
                ) from None
        return self._handles[file]

    def _load_pickle(self, file: Path) -> dict:
        if self._pickle_cache is None or self._pickle_cache[0] != file:
            self._pickle_cache = (file, torch.load(file, map_location="cpu", weights_only=True))
        return self._pickle_cache[1]

    @property
    def names(self) -> list[str]:
        return sorted(self.files)

    @cached_property
    def _meta(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        meta = {}
        for name, file in self.files.items():
            if self.pickle:
                t = self._load_pickle(file)[name]
                meta[name] = (tuple(t.shape), t.dtype)
            else:
                sl = self._handle(file).get_slice(name)
                meta[name] = (tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype(), torch.float32))
        return meta

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def read(
        self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor, converted to dtype on device; NaN or inf in it is an error."""
        file = self.files[name]
        t = self._load_pickle(file)[name] if self.pickle else self._handle(file).get_tensor(name)
        t = t.to(device=device, dtype=dtype or t.dtype)
        if t.is_floating_point() and not all_finite(t):
            raise MergeError(
                f"model '{self.spec}' tensor '{name}' contains NaN or inf; this checkpoint is "
                "damaged: download or save it again, or leave this model out"
            )
        return t

    @cached_property
    def tokenizer_vocab(self) -> dict | None:
        """The tokenizer's vocabulary and added tokens, or None when the folder has no
        tokenizer.json."""
        file = self.path / "tokenizer.json"
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        model = data.get("model") or {}
        return {
            "vocab": model.get("vocab"),
            "added": [t.get("content") for t in data.get("added_tokens") or []],
        }

    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")


def check_compatible(models: Mapping[str, Checkpoint]) -> None:
    """Raise MergeError unless every model has the reference's architecture, tensors, shapes and
    vocabulary."""
    items = list(models.items())
    ref_label, ref = items[0]
    if ref.adapter is not None:
        raise MergeError(
            f"'{ref_label}' is a LoRA adapter, not a model: task vectors are taken against a "
            "model folder; give the base model the adapter was trained on as the base"
        )
    for label, ck in items[1:]:
        pair = f"'{label}' and '{ref_label}'"
        if ck.adapter is not None:
            _check_adapter(ck, ref, ref_label)
            continue
        if ck.config.get("architectures") != ref.config.get("architectures") or ck.config.get(
            "model_type"
        ) != ref.config.get("model_type"):
            raise MergeError(
                f"{pair} have different architectures ({ck.config.get('architectures')} "
                f"vs {ref.config.get('architectures')}); merging needs "
                "fine-tunes of the same base model"
            )
        missing, extra = (
            sorted(set(ref.files) - set(ck.files)),
            sorted(set(ck.files) - set(ref.files)),
        )
        if missing or extra:
            detail = "; ".join(
                f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                for what, names in (("missing", missing), ("extra", extra))
                if names
            )
            raise MergeError(
                f"{pair} have different tensor names ({detail} in '{label}'); "
                "they are not fine-tunes of one base"
            )
        for name in ref.names:
            if ck.shape(name) != ref.shape(name):
                raise MergeError(
                    f"{pair} differ in the shape of '{name}': {ck.shape(name)} vs "
                    f"{ref.shape(name)}; merging needs identical shapes (a resized "
                    "vocabulary must be aligned first)"
                )
        if ck.vocab_size() != ref.vocab_size():
            raise MergeError(
                f"{pair} have different vocabulary sizes ({ck.vocab_size()} vs "
                f"{ref.vocab_size()}); merge only fine-tunes of one base, or resize the embeddings "
                "to the base's vocabulary first"
            )
        _check_tokenizer(ck, ref, pair)


def _check_tokenizer(ck: Checkpoint, ref: Checkpoint, pair: str) -> None:
    if (
        ck.tokenizer_vocab is not None
        and ref.tokenizer_vocab is not None
        and ck.tokenizer_vocab != ref.tokenizer_vocab
    ):
        raise MergeError(
            f"{pair} have different tokenizer vocabularies (tokenizer.json); the same token "
            "ids would mean different tokens in the merge"
        )


def _check_adapter(ck: Checkpoint, ref: Checkpoint, ref_label: str) -> None:
    """An adapter fits the base: its tensors' names and shapes, the base embeddings it carries, its
    tokenizer when it has one."""
    adapter = ck.adapter
    adapter.check_base({n: ref.shape(n) for n in ref.names}, ref_label)
    for name in adapter.saved_base:  # peft's copy of an adapted embedding (one tensor, rare)
        adapter.check_saved_copy(name, ref.read(name))
    _check_tokenizer(ck, ref, f"adapter '{ck.spec}' and '{ref_label}'")
