"""mergekit as a test oracle: run its `mergekit-yaml` command on a config, and basin on the same
one.

mergekit (LGPL-3.0) is only *run* here, as a separate process, never imported or copied: the tests
compare the tensors it writes with the ones basin's export writes for the same mergekit config.

The executable is $BASIN_MERGEKIT when set (a path to a `mergekit-yaml`), else the `mergekit-yaml`
beside this interpreter (installed by the `test` extra), else one on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

MERGEKIT_ENV = "BASIN_MERGEKIT"
TIMEOUT_S = 300

# CPU only, eager reads, nothing but the weights: the tokenizer and model card are not compared.
MERGEKIT_FLAGS = (
    "--no-cuda",
    "--no-lazy-unpickle",
    "--no-read-to-gpu",
    "--no-low-cpu-memory",
    "--no-copy-tokenizer",
    "--no-write-model-card",
    "--safe-serialization",
    "--quiet",
)


def mergekit_executable() -> str | None:
    """The `mergekit-yaml` to run, or None when there is none."""
    if env := os.environ.get(MERGEKIT_ENV):
        return env
    beside = Path(sys.executable).parent / "mergekit-yaml"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("mergekit-yaml")


def load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: all shards when there is an index, else every
    *.safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {folder}: {sorted(os.listdir(folder))}")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        tensors = load_file(folder / file)
        if clash := sorted(set(tensors) & set(out)):
            raise ValueError(f"{folder}: tensors {clash[:5]} appear in more than one shard")
        out.update(tensors)
    return out


def run_mergekit(
    config: dict[str, Any],
    out_dir: Path,
    *,
    timeout: float = TIMEOUT_S,
    extra_flags: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """Write `config` as YAML, merge it with mergekit-yaml into `out_dir` (CPU, offline) and return
    the merged tensors. Raises RuntimeError with mergekit's stderr when it fails."""
    exe = mergekit_executable()
    if exe is None:
        raise RuntimeError(
            f"mergekit-yaml not found: install the test extra (pip install -e '.[test]') "
            f"or set {MERGEKIT_ENV} to a mergekit-yaml executable"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_file = out_dir.parent / f"{out_dir.name}.mergekit.yml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [exe, str(config_file), str(out_dir), *MERGEKIT_FLAGS, *extra_flags]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"mergekit-yaml ran past {timeout}s: {' '.join(cmd)}\nstderr:\n{e.stderr}"
        ) from e
    if proc.returncode != 0:
        raise RuntimeError(
            f"mergekit-yaml failed (exit {proc.returncode}): {' '.join(cmd)}\n"
            f"config:\n{config_file.read_text()}\nstderr (tail):\n{proc.stderr[-6000:]}\n"
            f"stdout (tail):\n{proc.stdout[-2000:]}"
        )
    return load_safetensors_folder(out_dir)


# One process merging many configs with mergekit's own entry points, as its mergekit-yaml command
# does for one (mergekit is run, in that process, never imported here): a run of the CLI spends
# ~4 s importing, a tiny merge well under one.
_BATCH = """
import json, sys, traceback, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

options = MergeOptions(
    cuda=False, lazy_unpickle=False, read_to_gpu=False, low_cpu_memory=False,
    copy_tokenizer=False, write_model_card=False, safe_serialization=True, quiet=True,
)
options.apply_global_options()
for job in json.load(open(sys.argv[1])):
    try:
        source = open(job["config"]).read()
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
        run_merge(config, job["out"], options=options, config_source=source)
    except Exception:
        open(job["out"] + ".error", "w").write(traceback.format_exc())
"""


def run_mergekit_many(
    configs: dict[str, dict[str, Any]], root: Path, *, processes: int = 2
) -> dict[str, dict[str, torch.Tensor] | Exception]:
    """mergekit's merge of each config into root/<id>, in `processes` processes that each import
    mergekit once; per id the tensors, or a RuntimeError with mergekit's traceback."""
    exe = mergekit_executable()
    if exe is None:
        raise RuntimeError("mergekit-yaml not found: install the test extra (make venv)")
    python = Path(exe).with_name("python")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = sorted(configs)
    groups = [ids[i::processes] for i in range(processes) if ids[i::processes]]
    procs = []
    for g, group in enumerate(groups):
        jobs = []
        for cid in group:
            config_file = root / f"{cid}.mergekit.yml"
            config_file.write_text(yaml.safe_dump(configs[cid], sort_keys=False))
            jobs.append({"config": str(config_file), "out": str(root / cid)})
        jobs_file = root / f"jobs{g}.json"
        jobs_file.write_text(json.dumps(jobs))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env["CUDA_VISIBLE_DEVICES"] = ""
        procs.append(
            subprocess.Popen(
                [str(python if python.exists() else sys.executable), "-c", _BATCH, str(jobs_file)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        _, err = proc.communicate(timeout=TIMEOUT_S * len(ids))
        if proc.returncode != 0:
            raise RuntimeError(
                f"the mergekit batch failed (exit {proc.returncode}):\n{err[-4000:]}"
            )
    out: dict[str, dict[str, torch.Tensor] | Exception] = {}
    for cid in ids:
        error = root / f"{cid}.error"
        if error.exists():
            out[cid] = RuntimeError(f"mergekit failed on {cid}:\n{error.read_text()[-6000:]}")
        else:
            out[cid] = load_safetensors_folder(root / cid)
    return out


def run_basin(
    config: dict[str, Any],
    out_dir: Path,
    *,
    device: str = "cpu",
    kernels: str = "auto",
    approximate: bool = False,
) -> dict[str, torch.Tensor]:
    """basin's merge of the same mergekit config (merging.mergekit_yaml.from_mergekit, then the
    streaming export), returned as tensors. `approximate`: accept random methods (their draws
    differ)."""
    from merging.export import export_merge
    from merging.mergekit_yaml import from_mergekit

    recipe = from_mergekit(config, approximate=approximate)
    out = export_merge(
        recipe, Path(out_dir), force=True, device=device, progress=False, kernels=kernels
    )
    return load_safetensors_folder(out)


def mismatch_summary(
    ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], *, atol: float, rtol: float
) -> dict[str, tuple[int, int, float]]:
    """{name: (entries outside atol + rtol * |theirs|, entries, max abs difference)} for every
    tensor of both that differs; missing names and shape or dtype differences are reported as
    KeyError / ValueError by the caller's asserts, not here."""
    out = {}
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name].double(), theirs[name].double()
        if a.shape != b.shape:
            continue
        diff = (a - b).abs()
        bad = int((diff > atol + rtol * b.abs()).sum())
        if bad:
            out[name] = (bad, a.numel(), float(diff.max()))
    return out
