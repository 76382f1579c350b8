"""A CPU worker's evaluation time against the in-process adapter, on a quiet and on a busy machine.

For the demo's multiple-choice evaluator and the generative demo's (batch 32 both), the script
times the same candidates three ways:
  in-process   HarnessEvaluator built from the same config section, called in this process on a
               live model (the reference: the faster of one thread and torch's default threads);
  worker       a real Ray worker as `basin run` starts it (its eval_s);
  as before    a Ray worker with all the cores as torch threads and Ray's environment only (what
               workers did before they split the cores and waited passively), for contrast.
It does so first on a quiet machine, then beside one busy process it starts itself (a Python loop
holding one core), and prints each median eval_s with its ratio to the quiet in-process reference.
Goals: worker <= 1.3x quiet, <= 2x busy.

    .venv/bin/python tests/benchmarks/bench_worker.py [--zoo DIR] [--candidates 8]

A script, not a test (pytest does not collect it). The zoo is built on first use (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


@contextlib.contextmanager
def one_busy_core() -> Iterator[None]:
    """A competing process that keeps one core busy for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it get going
        yield
    finally:
        proc.kill()
        proc.wait()


def recipes(zoo: Any, count: int) -> list[dict[str, Any]]:
    """`count` linear merges with random weights (seeded): a real merge per candidate."""
    rng = random.Random(0)
    return [
        {
            "method": "linear",
            "base": str(zoo.base),
            "models": [
                {"path": str(p), "weight": rng.uniform(0.1, 1.0)} for p in zoo.finetunes.values()
            ],
        }
        for _ in range(count)
    ]


def evaluator_spec(zoo_dir: Path, generative: bool):
    from search.config import config_from_dict
    from search.demo import demo_config
    from search.folder import worker_spec

    raw = demo_config(str(zoo_dir), generative=generative)
    raw["evaluator"]["batch_size"] = 32
    return worker_spec(config_from_dict(raw, "the benchmark config"))


class InProcess:
    """The evaluator built from the spec's section, called in this process on a live model."""

    def __init__(self, spec: Any) -> None:
        from transformers import AutoTokenizer

        from evaluators import build_evaluator
        from evaluators.engines import HFEngine
        from merging import ResidentMerger, load_live_model

        models = spec.models
        self.merger = ResidentMerger(
            models.base, list(models.finetunes), device="cpu", dtype=models.dtype
        )
        self.model = load_live_model(models.base, device="cpu", dtype=models.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(models.base))
        self.engine = HFEngine(self.model, self.tokenizer)
        self.evaluator = build_evaluator(spec.evaluator, "search")

    def times(self, todo: list[dict[str, Any]], threads: int) -> list[float]:
        """eval seconds of each candidate with `threads` torch threads."""
        import torch

        from merging import recipe_from_dict

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = []
            for recipe in todo:
                self.merger.apply(recipe_from_dict(recipe), self.model)
                start = time.perf_counter()
                self.evaluator.evaluate(self.engine)
                out.append(time.perf_counter() - start)
            return out
        finally:
            torch.set_num_threads(saved)


def in_worker(
    spec: Any, todo: list[dict[str, Any]], *, before: bool
) -> tuple[list[float], dict[str, Any]]:
    """eval_s of each candidate as a Ray worker reports it, and the worker's info."""
    from dataclasses import replace

    from search.pool import RayPool, cpu_slots

    if before:
        pool = RayPool(replace(spec, threads=cpu_slots()), 1, env={})
    else:
        pool = RayPool(spec, 1)
    try:
        info = pool.ready()[0]
        out = []
        for recipe in todo:
            result = pool.result(pool.submit(0, recipe))
            if not result.ok:
                raise SystemExit(f"candidate failed in the worker: {result.error}")
            out.append(result.eval_s)
        return out, info
    finally:
        pool.shutdown()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def described(info: dict[str, Any]) -> str:
    return (
        f"{plural(info['threads'], 'thread')}, OMP_WAIT_POLICY={info['omp_wait_policy'] or 'unset'}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values[1:])  # the first candidate warms caches up


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--zoo",
        type=Path,
        default=Path(os.environ.get("BASIN_TEST_CACHE", Path.home() / ".cache" / "basin-tests"))
        / "zoo"
        / "seed0",
    )
    parser.add_argument("--candidates", type=int, default=8)
    args = parser.parse_args()

    import optuna
    import torch
    import transformers

    from evaluators.zoo import build_zoo
    from search.pool import cpu_slots, start_ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    zoo = build_zoo(args.zoo, seed=0)
    todo = recipes(zoo, args.candidates + 1)
    cores, default_threads = cpu_slots(), torch.get_num_threads()
    start_ray(None, 1, 0, cpus=cores)
    print(
        f"{cores} cores; torch default threads {default_threads}; "
        f"{args.candidates} candidates per row (+1 warm-up), median eval seconds; "
        "ratio to the quiet in-process reference"
    )
    ok = True
    for kind, generative in (("multiple choice", False), ("generative", True)):
        spec = evaluator_spec(args.zoo, generative)
        here = InProcess(spec)
        rows: list[tuple[str, float]] = []
        for load in ("quiet", "busy"):
            with one_busy_core() if load == "busy" else contextlib.nullcontext():
                for threads in sorted({1, default_threads}):
                    rows.append(
                        (
                            f"{load:5s} in-process ({plural(threads, 'thread')})",
                            median(here.times(todo, threads)),
                        )
                    )
                times, info = in_worker(spec, todo, before=False)
                rows.append((f"{load:5s} worker ({described(info)})", median(times)))
                times, info = in_worker(spec, todo, before=True)
                rows.append((f"{load:5s} as before ({described(info)})", median(times)))
        reference = min(v for label, v in rows if label.startswith("quiet in-process"))
        print(f"\n{kind} ({', '.join(spec.evaluator.tasks)})")
        for label, value in rows:
            print(f"  {label:55s} {value:8.3f} s  {value / reference:6.2f}x")
        for load, goal in (("quiet", 1.3), ("busy", 2.0)):
            ratio = (
                next(v for label, v in rows if label.startswith(f"{load:5s} worker")) / reference
            )
            met = ratio <= goal
            ok &= met
            print(f"  goal: {load} worker <= {goal}x: {ratio:.2f}x {'met' if met else 'MISSED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
