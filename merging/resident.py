"""The search's merge path: base and task vectors resident on one device, candidates written in
place.

A worker builds one `ResidentMerger` and one live model, then calls `apply(recipe, model)` for every
candidate. What every candidate reuses (task vectors, the magnitude tables of TIES and breadcrumbs)
is computed once; a candidate costs a few passes over the task vectors and no copy of the whole
model. Random draws (DARE, DELLA) are computed in each chunk from a counter, so none are stored.
A LoRA adapter's task vectors are held factored (merging/lora.py) and expanded one tensor at a time,
while that tensor is merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

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
from merging.recipe import MergeRecipe, validate_recipe


class ResidentMerger:
    """Base and task vectors of one model set, held on `device` in `dtype`."""

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
        self.base: dict[str, torch.Tensor] = {}
        # per fine-tune, per tensor: a full task vector, or a LoRA adapter's factors (only for the
        # tensors it changes; `task_vector` gives the others as zeros)
        self.deltas: list[dict[str, torch.Tensor | LoraFactors]] = [{} for _ in ckpts]
        placed = dict(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for name in tqdm(self.names, desc="loading task vectors", disable=not progress):
                b = ref.read(name, **placed)
                self.base[name] = b
                for k, ck in enumerate(ckpts):
                    if ck.adapter is None:
                        self.deltas[k][name] = ck.read(name, **placed) - b
                    elif (factors := ck.adapter.factors(name, **placed)) is not None:
                        self.deltas[k][name] = factors
        params = sum(t.numel() for t in self.base.values())
        # "eager" or "compiled" (merging.fused)
        self.kernels = resolve_kernels(kernels, self.device, params)
        self._orders: list[dict[str, methods.MagnitudeOrder]] | None = None
        # model_stock's, from the task vectors alone
        self._stock_ratios: dict[str, float] | None = None
        # nuslerp's, per slerp_over
        self._angles: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._progress = progress
        self._targets: dict[int, dict[str, torch.Tensor]] = {}

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
        return methods.MagnitudeOrder(self.task_vector(k, name), table=True)

    def task_vector(self, k: int, name: str) -> torch.Tensor:
        """Fine-tune k's task vector at tensor `name` (a LoRA one expanded for the caller)."""
        return task_vector(self.deltas[k].get(name), self.base[name])

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
                targets[name].copy_(self.base[name])


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
        """The base's tensor `name` (what an engine restores when a merge fails half-way)."""
        return self._merger.base[name]

    def merge(self, name: str, out: torch.Tensor) -> None:
        """Write the merged tensor `name` into `out` (same shape, any floating dtype)."""
        m = self._merger
        inputs = TensorInputs(
            base=m.base[name],
            deltas=[m.task_vector(k, name) for k in range(len(m.deltas))],
            orders=[o[name] for o in self._orders] if self._orders else None,
            stock_ratio=self._ratios[name] if self._ratios else None,
            nuslerp_angles=self._angles[name] if self._angles else None,
        )
        merge_tensor(self.recipe, name, self._plan[name], inputs, out, kernels=m.kernels)

    def write_into(self, model: nn.Module) -> None:
        """Merge every tensor in place into `model`'s tensor of the same name (MergeError when the
        model lacks one: it must be built from the base's architecture)."""
        targets = self._merger._target_tensors(model)
        for name in self._merger.names:
            self.merge(name, targets[name])

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor, each merged into a new tensor on the merger's device
        in its dtype as it is asked for."""
        for name in self._merger.names:
            out = torch.empty_like(self._merger.base[name])
            self.merge(name, out)
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
