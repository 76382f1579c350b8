"""Per-candidate overhead of HarnessEvaluator vs calling lm-eval's simple_evaluate afresh.

Overhead = wall time of one candidate's evaluation minus the model's own forward time (measured
by timing model.forward during the run). The baseline builds, per candidate, a new HFLM around the
same live model and a new TaskManager and tasks, as a search loop calling simple_evaluate would;
both run with bootstrap off and no sample logging, and must report equal scores.

    .venv/bin/python tests/benchmarks/bench_evaluator.py                     # tiny model + tasks
    .venv/bin/python tests/benchmarks/bench_evaluator.py --model DIR --tasks-dir DIR [--tasks a,b]

A script, not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from evaluators.engines import HFEngine

REPO = Path(__file__).resolve().parents[2]


class ForwardTimer:
    """Accumulates the seconds spent inside model.forward (synchronising CUDA around it)."""

    def __init__(self, model: Any) -> None:
        import torch

        self.model, self.seconds = model, 0.0
        self._sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        self._forward = model.forward
        model.forward = self._timed  # nn.Module.__call__ looks forward up on the instance

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        self._sync()
        start = time.perf_counter()
        try:
            return self._forward(*args, **kwargs)
        finally:
            self._sync()
            self.seconds += time.perf_counter() - start

    def close(self) -> None:
        del self.model.forward


def write_candidate(weight: Any, base: Any, index: int) -> None:
    """Write candidate `index`'s weights in place, as a merge would (outside the timed region)."""
    import torch

    gen = torch.Generator().manual_seed(index)
    with torch.no_grad():
        noise = torch.randn(base.shape, generator=gen).to(base.device, base.dtype)
        weight.copy_(base + 0.5 * base.std() * noise)


def measure(
    label: str, run: Callable[[], dict[str, float]], model: Any, candidates: int
) -> tuple[list[tuple[float, float]], list[dict[str, float]]]:
    """(wall, forward) seconds and metrics per candidate; candidate 0 is an untimed warm-up."""
    weight = model.get_output_embeddings().weight
    base = weight.detach().clone()
    timings, scores = [], []
    try:
        for index in range(candidates + 1):
            write_candidate(weight, base, index)
            timer = ForwardTimer(model)
            start = time.perf_counter()
            try:
                metrics = run()
            finally:
                wall = time.perf_counter() - start
                timer.close()
            if index:
                timings.append((wall, timer.seconds))
                scores.append(metrics)
            print(
                f"  {label:<33} candidate {index}: {wall:7.3f} s wall, "
                f"{timer.seconds:7.3f} s forward{'  (warm-up)' if not index else ''}",
                flush=True,
            )
    finally:
        import torch

        with torch.no_grad():
            weight.copy_(base)
    return timings, scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="HF model folder (default: build a tiny Llama)")
    parser.add_argument("--tasks-dir", type=Path, help="lm-eval task folder (default: tiny tasks)")
    parser.add_argument("--tasks", help="comma-separated task names (default: all in --tasks-dir)")
    parser.add_argument("--items", type=int, default=400, help="items per split of the tiny tasks")
    parser.add_argument(
        "--split",
        choices=["validation", "test"],
        default="test",
        help="adapter split; must be the one lm-eval picks itself (test if declared)",
    )
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--device", default=None, help="e.g. cuda:0 (default: where the model loads)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import HarnessSection
    from evaluators.harness import (
        HarnessEvaluator,
        _quiet,
        disable_template_cache,
        enable_template_cache,
    )
    from tests.support.tiny import build_model, build_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="bench_evaluator_"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    model_dir = args.model or build_model(scratch / "model")
    tasks_dir = args.tasks_dir or build_tasks(scratch / "tasks", n_items=args.items).folder
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if args.device:
        model.to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if args.tasks:
        names = args.tasks.split(",")
    else:
        from lm_eval.tasks import TaskManager

        names = TaskManager(include_path=str(tasks_dir), include_defaults=False).all_subtasks

    def baseline() -> dict[str, float]:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(names), task_manager=manager, bootstrap_iters=0, log_samples=False
        )
        return {
            f"{task}/{field.split(',')[0]}": value
            for task, row in out["results"].items()
            for field, value in row.items()
            if field.endswith(",none") and "_stderr" not in field
        }

    def adapter(cache_templates: bool) -> Callable[[], dict[str, float]]:
        section = HarnessSection(
            tasks=list(names), include_path=str(tasks_dir), batch_size=args.batch_size
        )
        ev = HarnessEvaluator(section, split=args.split, cache_templates=cache_templates)
        engine = HFEngine(model, tokenizer)
        return lambda: ev.evaluate(engine).metrics

    print(
        f"model {model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{model.device}, {torch.get_num_threads()} threads); tasks {names} from {tasks_dir}; "
        f"{args.candidates} candidates after a warm-up",
        flush=True,
    )
    base, base_cached = "simple_evaluate afresh", "simple_evaluate + template cache"
    results = {}
    disable_template_cache()
    with _quiet(True):
        results[base] = measure(base, baseline, model, args.candidates)
    results["adapter, template cache off"] = measure(
        "adapter, template cache off", adapter(False), model, args.candidates
    )
    enable_template_cache()
    with _quiet(True):
        results[base_cached] = measure(base_cached, baseline, model, args.candidates)
    results["adapter"] = measure("adapter", adapter(True), model, args.candidates)

    reference = results[base][1]
    print(f"\nper candidate (median of {args.candidates}):")
    print(f"  {'method':<33} {'wall':>9} {'forward':>9} {'overhead':>9}  scores equal baseline")
    overhead = {}
    for label, (timings, scores) in results.items():
        wall = statistics.median(w for w, _ in timings)
        forward = statistics.median(f for _, f in timings)
        overhead[label] = statistics.median(w - f for w, f in timings)
        print(
            f"  {label:<33} {wall:8.3f}s {forward:8.3f}s {overhead[label]:8.3f}s  "
            f"{scores == reference}"
        )
    for slow, fast in ((base, "adapter"), (base_cached, "adapter")):
        ratio = overhead[slow] / max(overhead[fast], 1e-9)
        print(f"overhead ratio {slow} / {fast}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
