"""Streaming export: a recipe's merge written as a loadable HF model folder, tensor by tensor.

Peak memory is a few tensors (the reference, one task vector per model, the result), not the model;
a LoRA adapter's task vector is expanded from its factors one tensor at a time.
The folder is written beside the target and renamed into place at the end, so the target path
holds a complete model or nothing; what a killed export left beside it is swept by the next one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from merging.checkpoint import DTYPE_NAMES, Checkpoint, check_compatible
from merging.engine import TensorInputs, TensorScalars, merge_tensor, plan_scalars
from merging.errors import MergeError
from merging.fused import resolve_kernels
from merging.layers import build_layer_map
from merging.lora import task_vector
from merging.process import pid_alive
from merging.recipe import MergeRecipe, dump_recipe, validate_recipe
from merging.shards import SafetensorsWriter, TensorSpec, plan_shards

# Small files copied from the reference model so the folder loads on its own.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
DEFAULT_SHARD_BYTES = 4 * 2**30
# host and pid of the export writing a partial folder, as exports before the owner was in the
# folder's name recorded it (read by sweep_partials)
OWNER_FILE = ".basin-export-owner"


def export_merge(
    recipe: MergeRecipe,
    out: str | Path,
    *,
    force: bool = False,
    device: str = "cpu",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    allow_pickle: bool = False,
    progress: bool = True,
    kernels: str = "auto",
) -> Path:
    """Merge `recipe` from its source files into the HF model folder `out`; returns `out`.

    kernels: "auto", "eager" or "compiled" (merging.fused); the same setting and device as a
    resident merge give the same bits.
    """
    out = Path(out)
    if out.exists() and not force:
        raise MergeError(
            f"output folder {out} already exists; choose another --out "
            "or pass --force to replace it"
        )
    validate_recipe(recipe)
    ref = Checkpoint(recipe.reference, allow_pickle=allow_pickle)
    models = [
        Checkpoint(m.path, allow_pickle=allow_pickle, where=f"models[{i}]")
        for i, m in enumerate(recipe.models)
    ]
    for i, ck in enumerate(models):
        if ck.adapter is not None and recipe.base is None:
            raise MergeError(
                f"models[{i}]: '{ck.spec}' is a LoRA adapter, and the recipe has no base; set "
                "base: to the model the adapter was trained on"
            )
    check_compatible(
        {recipe.reference: ref, **{m.path: ck for m, ck in zip(recipe.models, models)}}
    )
    plan = plan_scalars(recipe, build_layer_map(ref.names))
    floats = [n for n in ref.names if ref.dtype(n).is_floating_point]
    # as the resident merger
    kernels = resolve_kernels(kernels, device, sum(math.prod(ref.shape(n)) for n in floats))
    dtype = DTYPE_NAMES[recipe.dtype]
    specs = [
        TensorSpec(n, ref.shape(n), dtype if ref.dtype(n).is_floating_point else ref.dtype(n))
        for n in ref.names
    ]
    shards = plan_shards(specs, max_shard_bytes)

    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(out)
    # the owner in the name, so a kill at any moment after mkdtemp leaves a folder known as ours
    owner = f"{os.getpid()}-{socket.gethostname()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{owner}", dir=out.parent))
    try:
        # mkdtemp makes the folder private (0700); the model is for others too, as mkdir makes it
        tmp.chmod(0o777 & ~_umask())
        bar = tqdm(
            total=sum(s.nbytes for s in specs),
            unit="B",
            unit_scale=True,
            desc=f"exporting {out.name}",
            disable=not progress,
        )
        weight_map = {}
        for i, shard in enumerate(shards):
            file = shard_file_name(i, len(shards))
            writer = SafetensorsWriter(tmp / file, shard)
            for spec in shard:
                writer.write(spec.name, _merged(recipe, spec, plan, ref, models, device, kernels))
                weight_map[spec.name] = file
                bar.update(spec.nbytes)
            writer.close()
        bar.close()
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs)},
                "weight_map": weight_map,
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        _write_side_files(tmp, ref, recipe)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sweep_partials(out: Path) -> list[Path]:
    """Remove the unfinished folders that killed exports of `out` left beside it; returns them.

    An export names its folder `.NAME.partial-PID-HOST-*` (older exports: `.NAME.partial-*` with
    their host and pid in OWNER_FILE inside); a folder whose process is gone on this host is
    debris. Others' (a live export, another host, a folder not named so) stay.
    """
    removed = []
    prefix = f".{out.name}.partial-"
    for folder in out.parent.glob(f"{prefix}*"):
        owner = _owner(folder, folder.name[len(prefix) :])
        if owner is None:
            continue  # not ours
        if owner.get("host") == socket.gethostname() and not pid_alive(owner.get("pid")):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _owner(folder: Path, suffix: str) -> dict | None:
    """The host and pid of the export that made a partial folder: from its name (PID-HOST-random),
    else from the OWNER_FILE an older export wrote inside; None when neither says."""
    pid, _, rest = suffix.partition("-")
    host, _, _random = rest.rpartition("-")
    if pid.isdigit() and host:
        return {"host": host, "pid": int(pid)}
    try:
        return json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def shard_file_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _merged(
    recipe: MergeRecipe,
    spec: TensorSpec,
    plan: dict[str, TensorScalars],
    ref: Checkpoint,
    models: list[Checkpoint],
    device: str,
    kernels: str,
) -> torch.Tensor:
    """One output tensor, computed exactly as the resident path computes it."""
    if not spec.dtype.is_floating_point:
        return ref.read(spec.name)
    base = ref.read(spec.name, device=device, dtype=spec.dtype)
    deltas = [
        ck.read(spec.name, device=device, dtype=spec.dtype) - base
        if ck.adapter is None
        else task_vector(ck.adapter.factors(spec.name, device=device, dtype=spec.dtype), base)
        for ck in models
    ]
    inputs = TensorInputs(base=base, deltas=deltas)  # magnitude bounds selected exactly, no tables
    result = torch.empty(spec.shape, dtype=spec.dtype, device=device)
    merge_tensor(recipe, spec.name, plan[spec.name], inputs, result, kernels=kernels)
    return result


def _write_side_files(folder: Path, ref: Checkpoint, recipe: MergeRecipe) -> None:
    config = dict(ref.config)
    config["dtype"] = recipe.dtype
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED_FILES:
        if (ref.path / name).is_file():
            shutil.copy2(ref.path / name, folder / name)
    recipe_yaml = dump_recipe(recipe)
    (folder / "basin_recipe.yaml").write_text(recipe_yaml)
    (folder / "README.md").write_text(model_card(recipe, recipe_yaml))


def model_card(recipe: MergeRecipe, recipe_yaml: str) -> str:
    parents = "\n".join(f"- `{m.path}`" for m in recipe.models)
    base = f"on top of `{recipe.base}` " if recipe.base else ""
    return (
        "---\ntags:\n- merge\n- basin\n---\n\n"
        "# Merged model\n\n"
        f"This model was merged with basin using **{recipe.method}** {base}from:\n\n"
        f"{parents}\n\n## Recipe\n\nRebuild it with `basin merge basin_recipe.yaml --out DIR`:\n\n"
        f"```yaml\n{recipe_yaml}```\n"
    )


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder onto the target; an old target is removed only after that."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
