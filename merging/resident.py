"""The search's merge path: base and task vectors held once per worker (each tensor on the device,
in host memory or memory-mapped from disk: merging/placement.py), candidates written in place.

A worker builds one `ResidentMerger` and one live model, then calls `apply(recipe, model)` for every
candidate. What every candidate reuses (task vectors, the magnitude tables of TIES and breadcrumbs)
is computed once; a candidate costs a few passes over the task vectors and no copy of the whole
model. Random draws (DARE, DELLA) are computed in each chunk from a counter, so none are stored.
A LoRA adapter's task vectors are held factored (merging/lora.py) and expanded one tensor at a time,
while that tensor is merged.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from merging import methods
from merging.catalog import Family, method_spec
from merging.checkpoint import DTYPE_NAMES, Checkpoint, check_compatible
from merging.engine import TensorInputs, merge_tensor, plan_scalars
from merging.errors import MergeError
from merging.fused import resolve_kernels
from merging.layers import build_layer_map
from merging.lora import LoraFactors, expand, task_vector
from merging.placement import (
    BASE,
    TIERS,
    CacheWriter,
    Key,
    MappedFile,
    Mover,
    assign_tiers,
    default_cache_dir,
    held_items,
    hold,
    source_fingerprint,
)
from merging.recipe import MergeRecipe, validate_recipe


class ResidentMerger:
    """Base and task vectors of one model set, each tensor held in its placement tier (on `device`,
    in host memory, or memory-mapped from a cache folder; merging/placement.py), in `dtype`.

    placement: "device" (default), "host", "disk", or "auto": the device up to `device_room` bytes,
    host memory up to `host_room`, the rest on disk (search/memory.py computes both rooms).
    cache_dir: the disk tier's folder (default merging.placement.default_cache_dir()).
    """

    def __init__(
        self,
        base: str,
        models: Sequence[str],
        *,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        allow_pickle: bool = False,
        progress: bool = False,
        kernels: str = "auto",
        placement: str = "device",
        device_room: int | None = None,
        host_room: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        if dtype not in DTYPE_NAMES:
            raise MergeError(f"unknown dtype '{dtype}'. Known: {', '.join(DTYPE_NAMES)}")
        self.base_spec, self.model_specs = base, list(models)
        self.device, self.dtype = torch.device(device), DTYPE_NAMES[dtype]
        resolve_kernels(kernels, self.device, 0)  # an unknown setting fails before anything is read
        ref = Checkpoint(base, allow_pickle=allow_pickle)
        ckpts = [
            Checkpoint(m, allow_pickle=allow_pickle, where=f"models[{i}]")
            for i, m in enumerate(self.model_specs)
        ]
        check_compatible({base: ref, **dict(zip(self.model_specs, ckpts))})
        self.layer_map = build_layer_map(ref.names)
        self.names = [n for n in ref.names if ref.dtype(n).is_floating_point]
        numel = {n: math.prod(ref.shape(n)) for n in self.names}
        # the fine-tunes held as full task vectors (the others are LoRA adapters, held factored)
        self.full = [k for k, ck in enumerate(ckpts) if ck.adapter is None]
        width = torch.empty((), dtype=self.dtype).element_size()
        items = held_items(self.names, numel, self.full, width)
        # the tier of each held tensor, keyed (model, name); the base is model BASE
        self.tiers = assign_tiers(items, placement, device_room, host_room)
        self.placement = placement
        self._mover = Mover(self.device)
        # held where its tier keeps it: the base, and per fine-tune and tensor a full task vector
        # or a LoRA adapter's factors (only for the tensors it changes; `task_vector` gives the
        # others as zeros). Factors stay on the device whatever the placement: they are small.
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: list[dict[str, torch.Tensor | LoraFactors]] = [{} for _ in ckpts]
        self._disk = _DiskCache(
            Path(cache_dir) if cache_dir is not None else default_cache_dir(),
            ref,
            ckpts,
            self.tiers,
            dtype,
        )
        placed = dict(device=self.device, dtype=self.dtype)
        try:
            with torch.no_grad():
                for name in tqdm(self.names, desc="loading task vectors", disable=not progress):
                    # a tensor already in a cache file is not read again
                    b = ref.read(name, **placed) if self._disk.needs_base(name) else None
                    if self._disk.needs((BASE, name)):
                        self.base[name] = self._hold((BASE, name), b)
                    for k, ck in enumerate(ckpts):
                        if ck.adapter is not None:
                            if (factors := ck.adapter.factors(name, **placed)) is not None:
                                self.deltas[k][name] = factors
                        elif self._disk.needs((k, name)):
                            delta = ck.read(name, **placed) - b
                            self.deltas[k][name] = self._hold((k, name), delta)
        except BaseException:
            self._disk.abort()
            raise
        for (k, name), t in self._disk.finish().items():
            (self.base if k == BASE else self.deltas[k])[name] = t
        self.base = {n: self.base[n] for n in self.names}  # the checkpoint's order
        params = sum(numel.values())
        # "eager" or "compiled" (merging.fused)
        self.kernels = resolve_kernels(kernels, self.device, params)
        self._orders: list[dict[str, methods.MagnitudeOrder]] | None = None
        # model_stock's, from the task vectors alone
        self._stock_ratios: dict[str, float] | None = None
        # nuslerp's, per slerp_over
        self._angles: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._progress = progress
        self._targets: dict[int, dict[str, torch.Tensor]] = {}

    def _hold(self, key: Key, t: torch.Tensor) -> torch.Tensor | None:
        """`t` as its tier holds it (None when the disk tier wrote it to its cache file)."""
        if self.tiers[key] == "disk":
            self._disk.write(key, t)
            return None
        return hold(t, self.tiers[key], self.device)

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of base and full task vectors held per tier (LoRA factors: on the device)."""
        out = dict.fromkeys(TIERS, 0)
        for k, name in self.tiers:
            held = self.base[name] if k == BASE else self.deltas[k][name]
            out[self.tiers[(k, name)]] += held.nbytes
        for d in self.deltas:
            out["device"] += sum(h.nbytes for h in d.values() if isinstance(h, LoraFactors))
        return out

    def base_tensor(self, name: str) -> torch.Tensor:
        """The base's tensor `name` on the device."""
        return self._mover.get(self.base[name])

    def prepare(self, methods_used: Iterable[str], seed: int = 0) -> None:
        """Precompute what these methods need (magnitude tables) before the first candidate."""
        if any(method_spec(m).magnitude_ranked for m in methods_used):
            self._magnitude_orders()

    def _magnitude_orders(self) -> list[dict[str, methods.MagnitudeOrder]]:
        if self._orders is None:
            bar = tqdm(
                total=len(self.names) * len(self.deltas),
                desc="magnitude tables",
                disable=not self._progress,
            )
            self._orders = []
            for k in range(len(self.deltas)):
                self._orders.append({name: self._magnitude_order(k, name) for name in self.names})
                bar.update(len(self.names))
            bar.close()
        return self._orders

    def _magnitude_order(self, k: int, name: str) -> methods.MagnitudeOrder:
        held = self.deltas[k].get(name)
        if isinstance(held, LoraFactors):  # the table from the expanded task vector, not kept
            return methods.MagnitudeOrder(
                expand(held, self.dtype), table=True, rebuild=lambda: expand(held, self.dtype)
            )
        if self.tiers.get((k, name), "device") == "device" or self.device.type == "cpu":
            # held where the merge reads it (a CPU reads host memory and mapped files in place)
            return methods.MagnitudeOrder(self.task_vector(k, name), table=True)
        # held off the device: the table from one copy, a bound off the table from another
        return methods.MagnitudeOrder(
            self.task_vector(k, name), table=True, rebuild=lambda: self.task_vector(k, name)
        )

    def task_vector(self, k: int, name: str) -> torch.Tensor:
        """Fine-tune k's task vector at tensor `name` on the device (a LoRA one expanded for the
        caller)."""
        held = self.deltas[k].get(name)
        if isinstance(held, torch.Tensor):
            return self._mover.get(held)
        if held is None:  # an adapter leaves this tensor alone: zeros (a view of one)
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            return zero.expand(self.base[name].shape)
        return expand(held, self.dtype)

    def held_bytes(self, k: int) -> int:
        """Bytes fine-tune k's task vector holds (factors for a LoRA adapter)."""
        return sum(held.nbytes for held in self.deltas[k].values())

    def _model_stock_ratios(self) -> dict[str, float]:
        if self._stock_ratios is None:
            self._stock_ratios = {
                name: methods.model_stock_ratio(
                    [self.task_vector(k, name) for k in range(len(self.deltas))]
                )
                for name in self.names
            }
        return self._stock_ratios

    def _nuslerp_angles(self, over: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if over not in self._angles:  # one scalar per tensor, row or column: small
            self._angles[over] = {
                name: methods.nuslerp_angles(
                    self.task_vector(0, name), self.task_vector(1, name), over=over
                )
                for name in self.names
            }
        return self._angles[over]

    def _target_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        key = id(model)
        if key not in self._targets:
            state = {
                **dict(model.named_buffers()),
                **dict(model.named_parameters(remove_duplicate=False)),
            }
            missing = [n for n in self.names if n not in state]
            if missing:
                raise MergeError(
                    f"the live model has no tensor named {missing[0]!r} (and {len(missing) - 1} "
                    "more); it must be built from the same architecture as the base"
                )
            self._targets = {key: {n: state[n].data for n in self.names}}
        return self._targets[key]

    def check_recipe(self, recipe: MergeRecipe) -> None:
        """Raise MergeError unless the recipe merges exactly this worker's models."""
        validate_recipe(recipe)
        listed = [m.path for m in recipe.models]
        if listed != self.model_specs:
            raise MergeError(
                f"this merger holds models {self.model_specs}; the recipe lists "
                f"{listed} (same order needed)"
            )
        if recipe.reference != self.base_spec:
            # Task vectors are held against this base; another reference would round differently.
            raise MergeError(
                f"this merger's base is '{self.base_spec}'; set the recipe's "
                f"base to it (got {recipe.base!r})"
            )

    def candidate(self, recipe: MergeRecipe) -> MergedWeights:
        """The recipe's merge, computed tensor by tensor as an engine reads it (no tensor is
        merged before it is asked for)."""
        self.check_recipe(recipe)
        spec = method_spec(recipe.method)
        return MergedWeights(
            self,
            recipe,
            plan_scalars(recipe, self.layer_map),
            orders=self._magnitude_orders() if spec.magnitude_ranked else None,
            ratios=self._model_stock_ratios() if spec.family is Family.MODEL_STOCK else None,
            angles=self._nuslerp_angles(recipe.slerp_over)
            if spec.family is Family.NUSLERP
            else None,
        )

    def apply(self, recipe: MergeRecipe, model: nn.Module) -> None:
        """Write the recipe's merge into `model`'s parameters in place."""
        self.candidate(recipe).write_into(model)

    def restore_base(self, model: nn.Module) -> None:
        """Put the base weights back into the live model."""
        targets = self._target_tensors(model)
        with torch.no_grad():
            for name in self.names:
                targets[name].copy_(self.base[name])  # from any tier: copy_ reads it in place


class MergedWeights:
    """One candidate's weights as the merger produces them: tensor by tensor, under the base
    checkpoint's names, in its order. An engine takes them in one of two ways:

    - `write_into(model)`: each tensor merged straight into the tensor of the same name of a
      transformers model (the hf engine's live model: no copy at all);
    - `stream()`: each tensor merged into a new tensor and handed over, for an engine that holds
      its weights in its own layout (vLLM); only the tensor being handed over exists twice.
    """

    def __init__(
        self,
        merger: ResidentMerger,
        recipe: MergeRecipe,
        plan: dict,
        *,
        orders: list[dict[str, methods.MagnitudeOrder]] | None,
        ratios: dict[str, float] | None,
        angles: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        self._merger, self.recipe, self._plan = merger, recipe, plan
        self._orders, self._ratios, self._angles = orders, ratios, angles

    @property
    def names(self) -> list[str]:
        """Every tensor a complete candidate has."""
        return list(self._merger.names)

    def base(self, name: str) -> torch.Tensor:
        """The base's tensor `name` on the device (what an engine restores when a merge fails
        half-way)."""
        return self._merger.base_tensor(name)

    def merge(self, name: str, out: torch.Tensor) -> None:
        """Write the merged tensor `name` into `out` (same shape, any floating dtype)."""
        (moved,) = self._moved([name])
        self._merge(name, moved, out)

    def _moved(self, names: Iterable[str]) -> Iterator[list[torch.Tensor]]:
        """Per tensor name, the base and each full task vector on the device, in that order: on
        CUDA those of the next name are copied while this one merges (merging.placement.Mover)."""
        m = self._merger
        groups = ([m.base[n], *(m.deltas[k][n] for k in m.full)] for n in names)
        return m._mover.stream(groups)

    def _factored(self, k: int) -> bool:
        return k not in self._merger.full

    def _merge(self, name: str, moved: list[torch.Tensor], out: torch.Tensor) -> None:
        m = self._merger
        base, full = moved[0], iter(moved[1:])
        deltas = [
            task_vector(m.deltas[k].get(name), base) if self._factored(k) else next(full)
            for k in range(len(m.deltas))
        ]
        inputs = TensorInputs(
            base=base,
            deltas=deltas,
            orders=[o[name] for o in self._orders] if self._orders else None,
            stock_ratio=self._ratios[name] if self._ratios else None,
            nuslerp_angles=self._angles[name] if self._angles else None,
        )
        merge_tensor(self.recipe, name, self._plan[name], inputs, out, kernels=m.kernels)

    def write_into(self, model: nn.Module) -> None:
        """Merge every tensor in place into `model`'s tensor of the same name (MergeError when the
        model lacks one: it must be built from the base's architecture)."""
        targets = self._merger._target_tensors(model)
        names = self._merger.names
        for name, moved in zip(names, self._moved(names)):
            self._merge(name, moved, targets[name])

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, each merged into a new tensor on the merger's device
        in its dtype as it is asked for."""
        names = self._merger.names
        for name, moved in zip(names, self._moved(names)):
            out = torch.empty_like(moved[0])
            self._merge(name, moved, out)
            yield name, out


def load_live_model(
    path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model every candidate is written into: the base, loaded once with transformers."""
    from transformers import AutoModelForCausalLM

    from merging.checkpoint import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_dir(path)), dtype=DTYPE_NAMES[dtype], trust_remote_code=trust_remote_code
    )
    return model.to(device).eval()


class _DiskCache:
    """The disk tier of one merger: per model (the base, each full fine-tune) one safetensors file
    of the tensors placed on disk, in the merge dtype. A file is keyed by its sources' names, sizes
    and times, the dtype and the tensors it holds, so a later worker of the same set maps it
    without reading the models again."""

    def __init__(
        self, folder: Path, ref: Checkpoint, ckpts: list[Checkpoint], tiers: dict, dtype: str
    ) -> None:
        by_model: dict[int, list[str]] = {}
        for (k, name), tier in tiers.items():
            if tier == "disk":
                by_model.setdefault(k, []).append(name)
        self.paths: dict[int, Path] = {}
        self._writers: dict[int, CacheWriter] = {}
        ref_files = sorted(set(ref.files.values()))
        pending = 0
        for k, names in by_model.items():
            sources = ref_files if k == BASE else ref_files + sorted(set(ckpts[k].files.values()))
            what = "base" if k == BASE else "delta"
            fingerprint = source_fingerprint(sources, json.dumps([what, dtype, names]))
            self.paths[k] = folder / f"{what}-{fingerprint}.safetensors"
            if not self.paths[k].is_file():
                pending += sum(math.prod(ref.shape(n)) for n in names)
        if pending:
            width = torch.empty((), dtype=DTYPE_NAMES[dtype]).element_size()
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
            if pending * width > free:
                raise MergeError(
                    f"the disk tier needs {pending * width / 2**30:.2f} GiB in {folder}, which has "
                    f"{free / 2**30:.2f} GiB free; set models.cache_dir to a larger disk, or "
                    "models.placement: auto with more host memory (models.host_memory_gib)"
                )
        for k, names in by_model.items():
            if not self.paths[k].is_file():
                entries = [(n, ref.shape(n)) for n in names]
                self._writers[k] = CacheWriter(self.paths[k], entries, DTYPE_NAMES[dtype])
        self._tiers = tiers
        self._models = sorted({k for k, _ in tiers})

    def needs(self, key: Key) -> bool:
        """Whether tensor `key` must be computed here (it is not in a finished cache file)."""
        return self._tiers[key] != "disk" or key[0] in self._writers

    def needs_base(self, name: str) -> bool:
        return any(self.needs((k, name)) for k in self._models)

    def write(self, key: Key, t: torch.Tensor) -> None:
        self._writers[key[0]].write(key[1], t)

    def finish(self) -> dict[Key, torch.Tensor]:
        """Every disk tensor, as a view of its mapped file."""
        for writer in self._writers.values():
            writer.finish()
        self._writers = {}
        self.files = {k: MappedFile(p) for k, p in self.paths.items()}
        return {
            (k, name): self.files[k].tensor(name)
            for (k, name), tier in self._tiers.items()
            if tier == "disk"
        }

    def abort(self) -> None:
        for writer in self._writers.values():
            writer.abort()
