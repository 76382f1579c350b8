"""Merge speed: the resident path and the streaming export against the memory-bandwidth floor.

Builds a synthetic model set (a random Llama of about 70M parameters and 3 "fine-tunes" of it,
saved as safetensors), then prints, from this one run:
- the machine's copy bandwidth: the bytes a large `copy_` writes per second (it reads as many);
- per candidate, for each method, with eager torch ops and with the compiled kernels of
  merging/fused.py: resident merge time / the floor, the time the bytes the merge must move take
  at that bandwidth (read the base and each task vector, write the live model; DARE's and DELLA's
  draws are computed, not read); nuslerp merges the first two fine-tunes, eagerly in both columns;
  "first call s" is the compiled merger's first candidate (the magnitude tables, the compile);
  the plain-torch weighted sum (base + sum w*T with temporaries) is printed against the same floor;
- each worker's resident bytes (base, task vectors, what the methods precompute, live model)
  against (2 + fine-tunes) x model size, and on CUDA the peak allocated;
- export time / the time of copying the same bytes from safetensors to safetensors, both kernels;
- per placement tier (merging/placement.py; each in a fresh process, so its peak memory is its
  own): a task-arithmetic candidate's time against that tier's floor (the bytes it must move at the
  bandwidths measured in the same run: the copy bandwidth for memory, a cold file read for disk),
  the disk tier with a warm and a cold page cache (its files' pages dropped before each candidate),
  and the process's own memory after the candidates (its RSS less the disk tier's mapped files,
  which are page cache the plan leaves out; a base held on a CPU device is a mapping of its
  safetensors, which RSS counts and anonymous RSS does not) against search/memory.py's plan; the
  peak RSS beside it also counts the source models' files mapped while the task vectors are built.

    .venv/bin/python tests/benchmarks/bench_merge.py \
        [--hidden 768 --layers 6 --repeats 5 --device cpu] [--only-tiers]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from merging import ResidentMerger, export_merge, load_live_model, recipe_from_dict

GOALS = {"task_arithmetic": 1.2, "ties": 1.5, "dare_linear": 1.5, "dare_ties": 1.5}  # x the floor
METHODS = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "model_stock",
    "nuslerp",
)
TWO_MODELS = ("nuslerp",)  # merged from the first two fine-tunes (always eager: nothing to compile)
KERNELS = ("eager", "compiled")


def build_models(
    root: Path, hidden: int, layers: int, n_models: int = 3
) -> tuple[str, list[str], int]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    folders = []
    for k in range(n_models):
        gen = torch.Generator().manual_seed(k + 1)
        for name, p in model.state_dict().items():
            p.copy_(state[name] + 0.01 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(root / f"ft{k}")
        folders.append(str(root / f"ft{k}"))
    return str(root / "base"), folders, n_params


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up: lazy tables / draws are built here, as they are once per worker
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(numel: int, device: str, repeats: int) -> float:
    """Bytes per second a float32 `copy_` of `numel` entries writes (reading as many)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return src.numel() * 4 / timed(lambda: dst.copy_(src), repeats, device)


def bytes_moved(method: str, params: int, n_models: int) -> int:
    """What one candidate must read and write at the least: the base and each task vector read, the
    live model written; float32 (DARE's and DELLA's draws are computed in place, not read)."""
    return (2 + n_models) * params * 4


def resident_bytes(merger: ResidentMerger, live: torch.nn.Module) -> int:
    tensors = [*merger.base.values(), *(t for d in merger.deltas for t in d.values())]
    tensors += list(live.parameters())
    tables = sum(o.table_bytes() for d in (merger._orders or []) for o in d.values())
    return sum(t.numel() * t.element_size() for t in tensors) + tables


def recipe(method: str, base: str, models: list[str]):
    weights = [0.5, 0.3, 0.2]
    if method in TWO_MODELS:
        return recipe_from_dict(
            {
                "method": method,
                "base": base,
                "parameters": {"slerp_over": "rows"},
                "models": [{"path": m, "weight": w} for m, w in zip(models[:2], weights)],
            }
        )
    return recipe_from_dict(
        {
            "method": method,
            "base": base,
            "models": [
                {"path": m, "weight": w, **({"density": 0.5} if method != "model_stock" else {})}
                for m, w in zip(models, weights)
            ],
            "parameters": {"lambda": 1.0, "seed": 0},
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only-tiers", action="store_true", help="only the placement tiers' table")
    ap.add_argument("--tier-kernels", default="compiled", choices=KERNELS)
    ap.add_argument("--tier-child", help=argparse.SUPPRESS)  # placement, in a fresh process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tier_child:
        print(json.dumps(tier_child(args)))
        return
    root = Path(tempfile.mkdtemp(prefix="basin-bench-"))
    try:
        base, models, n_params = build_models(root, args.hidden, args.layers)
        if args.only_tiers:
            tiers_table(args, root, n_params, len(models))
            return
        print(
            f"model set: base + {len(models)} fine-tunes of {n_params / 1e6:.1f}M parameters, "
            f"float32, {args.device}"
        )
        mergers = {k: ResidentMerger(base, models, device=args.device, kernels=k) for k in KERNELS}
        pair = ResidentMerger(base, models[:2], device=args.device)  # for TWO_MODELS
        merger = mergers["eager"]
        live = load_live_model(base, device=args.device)
        targets = merger._target_tensors(live)
        weights = [0.5, 0.3, 0.2]

        def reference() -> None:
            with torch.no_grad():
                for name in merger.names:
                    b, t = merger.base[name], [d[name] for d in merger.deltas]
                    targets[name].copy_(
                        b + weights[0] * t[0] + weights[1] * t[1] + weights[2] * t[2]
                    )

        bandwidth = copy_bandwidth(
            max(t.numel() for t in merger.base.values()) * 32, args.device, args.repeats
        )
        floor = {
            m: bytes_moved(m, n_params, 2 if m in TWO_MODELS else len(models)) / bandwidth
            for m in METHODS
        }
        print(
            f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; a task-arithmetic candidate moves "
            f"{bytes_moved('task_arithmetic', n_params, len(models)) / 1e9:.2f} GB: floor "
            f"{floor['task_arithmetic'] * 1000:.0f} ms"
        )
        ref_s = timed(reference, args.repeats, args.device)
        print(
            f"plain torch base + sum w*T: {ref_s * 1000:.0f} ms per candidate, "
            f"{ref_s / floor['task_arithmetic']:.2f}x the floor"
        )
        print(
            f"{'method':<16}{'floor ms':>10}{'eager ms':>10}{'x floor':>9}"
            f"{'compiled ms':>13}{'x floor':>9}{'goal':>7}{'first call s':>14}"
        )
        for method in METHODS:
            r = recipe(method, base, models)
            row, first = [], 0.0
            for k in KERNELS:
                merge = (pair if method in TWO_MODELS else mergers[k]).apply
                t0 = time.perf_counter()
                merge(r, live)  # first call: tables, and for "compiled" the compile
                first = time.perf_counter() - t0 if k == "compiled" else first
                row.append(
                    timed(lambda r=r, merge=merge: merge(r, live), args.repeats, args.device)
                )
            goal = f"<={GOALS[method]}" if method in GOALS else ""
            f = floor[method]
            print(
                f"{method:<16}{f * 1000:>10.0f}{row[0] * 1000:>10.0f}{row[0] / f:>9.2f}"
                f"{row[1] * 1000:>13.0f}{row[1] / f:>9.2f}{goal:>7}{first:>14.1f}"
            )
        model_bytes = n_params * 4
        for k in KERNELS:
            held = resident_bytes(mergers[k], live)
            print(
                f"resident per worker ({k} merger and the live model): {held / 1e9:.2f} GB = "
                f"{held / model_bytes:.2f} x the model; (2 + {len(models)}) x model = "
                f"{(2 + len(models)) * model_bytes / 1e9:.2f} GB"
            )
        if args.device == "cuda":
            print(
                f"CUDA peak allocated: {torch.cuda.max_memory_allocated() / 1e9:.2f} GB "
                "(both mergers, the live model, scratch)"
            )

        def copy(sources: list[str], n_written: int) -> float:
            t0 = time.perf_counter()
            for i, src in enumerate(sources):
                tensors = load_file(str(Path(src) / "model.safetensors"))
                if i < n_written:
                    save_file(tensors, str(root / f"copy{i}.safetensors"))
            return time.perf_counter() - t0

        copy_all = copy([base, *models], n_written=4)
        read_all_write_one = copy([base, *models], n_written=1)
        print(
            f"copying the 4 source files safetensors->safetensors: {copy_all:.2f} s; "
            f"reading the 4 and writing one model: {read_all_write_one:.2f} s"
        )
        for k in KERNELS:
            out = root / f"out-{k}"
            t0 = time.perf_counter()
            export_merge(
                recipe("ties", base, models), out, progress=False, device=args.device, kernels=k
            )
            export_s = time.perf_counter() - t0
            print(
                f"export (ties, {k} kernels) {export_s:.2f} s: ratio {export_s / copy_all:.2f} "
                f"to the copy (goal <=2), {export_s / read_all_write_one:.2f} to read 4 + write 1"
            )
        tiers_table(args, root, n_params, len(models))
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- placement tiers ------------------------------------------------------------------------------

TIER_RUNS = ("device", "host", "disk")


def _status(field: str) -> int:
    """A /proc/self/status field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def tier_child(args) -> dict:
    """One placement's merger and live model in this fresh process: candidate times (warm; for
    disk cold too), peak and anonymous RSS above what the process held before, and the plan."""
    from search.config import StudyConfig
    from search.memory import worker_plan

    root = Path(args.root)
    base, models = str(root / "base"), [str(root / f"ft{k}") for k in range(3)]
    placement = args.tier_child
    from transformers import LlamaForCausalLM  # noqa: F401 - its imports are not the merger's memory

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS counted from here
    rss0, anon0, file0 = _status("VmRSS"), _status("RssAnon"), _status("RssFile")
    t0 = time.perf_counter()
    merger = ResidentMerger(
        base,
        models,
        device=args.device,
        kernels=args.tier_kernels,
        placement=placement,
        cache_dir=root / "cache",
    )
    build_s = time.perf_counter() - t0
    live = load_live_model(base, device=args.device)
    r = recipe("task_arithmetic", base, models)
    warm = timed(lambda: merger.apply(r, live), args.repeats, args.device)
    cold = None
    if placement == "disk":
        times = []
        for _ in range(args.repeats):
            for f in merger._disk.files.values():
                f.drop_page_cache()
            t0 = time.perf_counter()
            merger.apply(r, live)
            times.append(time.perf_counter() - t0)
        cold = statistics.median(times)
    config = StudyConfig.model_validate(
        {
            "study": {"name": "bench"},
            "models": {"base": base, "finetunes": models, "placement": placement},
            "evaluator": {"tasks": ["gsm8k"]},
            "objectives": {"items": [{"task": "gsm8k", "metric": "exact_match"}]},
        }
    )
    plan = worker_plan(config.models, config.evaluator, ["task_arithmetic"], "cpu")
    # what the process holds of its own: the device part and (on a CPU, the same memory) the host
    # tier; the disk tier is page cache
    planned = plan.fixed_bytes + plan.tiers.held["host"]
    return {
        "placement": placement,
        "build_s": build_s,
        "warm_s": warm,
        "cold_s": cold,
        "peak_rss": _status("VmHWM") - rss0,
        "anon_rss": _status("RssAnon") - anon0,
        "rss": _status("VmRSS") - rss0,
        "file_rss": _status("RssFile") - file0,
        "planned": planned,
        "held": merger.tier_bytes(),
    }


def tiers_table(args, root: Path, n_params: int, n_models: int) -> None:
    from search.memory import bandwidths

    copy_bw = copy_bandwidth(8 * 2**20, args.device, args.repeats)
    disk_bw = bandwidths(args.device, root / "bandwidth")["disk"]
    model = n_params * 4
    print(
        f"placement tiers (task_arithmetic, {args.tier_kernels} kernels, {n_models} fine-tunes, "
        f"each tier in a fresh process): copy {copy_bw / 1e9:.1f} GB/s, cold disk read "
        f"{disk_bw / 1e9:.2f} GB/s"
        + (
            "; on a CPU device the host tier is the same memory as the device tier"
            if args.device == "cpu"
            else ""
        )
    )
    print(
        f"{'tier':<12}{'floor ms':>10}{'merge ms':>10}{'x floor':>9}{'goal':>7}"
        f"{'memory MB':>11}{'plan MB':>9}{'x plan':>8}{'  measured as'}"
    )
    for placement in TIER_RUNS:
        child = subprocess.run(
            [sys.executable, __file__, "--tier-child", placement, "--root", str(root)]
            + ["--device", args.device, "--repeats", str(args.repeats)]
            + ["--tier-kernels", args.tier_kernels],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(child.stdout.strip().splitlines()[-1])
        memory_floor = (2 + n_models) * model / copy_bw  # read base + task vectors, write live
        runs = [(placement, got["warm_s"], memory_floor)]
        if got["cold_s"] is not None:
            runs[0] = ("disk warm", got["warm_s"], memory_floor)
            cold_floor = (1 + n_models) * model / disk_bw + model / copy_bw
            runs.append(("disk cold", got["cold_s"], cold_floor))
        # the process's own memory: its RSS less the disk tier's mapped files (page cache, which
        # the plan leaves out); a base held on a CPU device may be a mapping of its safetensors
        # (no copy), which RSS counts and anonymous RSS does not
        page_cache = min(got["file_rss"], got["held"].get("disk", 0))
        held = got["rss"] - page_cache
        how = (
            f"RSS less the disk tier's pages {page_cache / 1e6:.0f} MB (anon "
            f"{got['anon_rss'] / 1e6:.0f} MB, mapped files {got['file_rss'] / 1e6:.0f} MB; "
            f"peak RSS {got['peak_rss'] / 1e6:.0f} MB)"
        )
        for i, (what, took, floor) in enumerate(runs):
            mem = (
                f"{held / 1e6:>11.0f}{got['planned'] / 1e6:>9.0f}{held / got['planned']:>8.2f}"
                f"  {how}"
                if i == 0
                else ""
            )
            print(
                f"{what:<12}{floor * 1000:>10.0f}{took * 1000:>10.0f}{took / floor:>9.2f}"
                f"{'<=1.3':>7}{mem}"
            )


if __name__ == "__main__":
    main()
