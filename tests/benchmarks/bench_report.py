"""Held-out scoring (`basin report`) per finalist against a study worker's eval_s, quiet and busy.

The script runs a small demo study on the toy zoo with real Ray workers, as `basin run` does, and
takes the workers' mean eval_s from its trials (the reference). It then scores the finalists the
report scores (the Pareto front, each fine-tune alone, the uniform average) on the report split,
first on a quiet machine, then beside one busy process it starts itself (a Python loop holding one
core), in these ways:
  held-out     search.heldout.heldout_pool: what `basin report` does now (one worker with a
               one-worker study's torch threads and environment, the report evaluator only: in
               this process where it runs one thread, else on a one-worker Ray pool);
  as before    one worker in this process with torch's default threads (all the cores) that also
               builds the search evaluator (what held-out scoring did before);
  passive      as before, but in a fresh process started with OMP_WAIT_POLICY=PASSIVE (what an
               in-process worker cannot get once torch is loaded): whether the wait policy alone
               would have been enough;
  ray          a one-worker Ray pool as `basin run` starts one (its start includes Ray's).
Each row prints the seconds until the worker could take the first finalist (start), the wall
seconds per finalist after that (merge, scoring, writing the score), the worker's own eval_s, and
the ratio of the wall seconds per finalist to the workers' quiet mean eval_s.
Goals: held-out <= 1.3x quiet, <= 2x busy.

    .venv/bin/python tests/benchmarks/bench_report.py [--zoo DIR] [--trials 16] [--finalists 10]
        [--contrast 3] [--no-ray] [--threads N]

`--contrast` finalists are scored in the contrast rows (as before, passive: slow when busy).
`--threads N` gives the held-out and ray rows N torch threads, as workers.threads would: with more
than one, held-out scoring runs its worker on a one-worker Ray pool (search.heldout.heldout_pool).
A script, not a test (pytest does not collect it). The zoo is built on first use (a few minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.benchmarks.bench_worker import one_busy_core, plural  # noqa: E402


@dataclass
class Row:
    label: str
    start_s: float  # until the worker could take the first finalist
    wall_s: float  # per finalist after that: merge, scoring, writing the score
    eval_s: float  # per finalist, as the worker measured it
    info: dict[str, Any]


def finalists(folder: Path) -> tuple[Any, dict[int, dict[str, Any]]]:
    """The study's worker spec and the recipes `basin report` scores on the held-out split."""
    from merging.recipe import recipe_to_dict
    from search import attrs
    from search.folder import load_study_folder, trial_recipe, worker_spec
    from search.pareto import front_and_baselines

    config, study = load_study_folder(folder)
    front, baselines = front_and_baselines(study)
    refs = [
        t
        for t in baselines
        if t.user_attrs[attrs.BASELINE].startswith("alone:")
        or t.user_attrs[attrs.BASELINE] == "uniform"
    ]
    recipes = {t.number: recipe_to_dict(trial_recipe(config, t)) for t in [*front, *refs]}
    return worker_spec(config), recipes


def split_of(folder: Path) -> str:
    from search.folder import load_study_folder

    return load_study_folder(folder)[0].evaluator.label("report")


def timed(
    label: str, make: Callable[[], Any], folder: Path, recipes: dict[int, dict[str, Any]]
) -> Row:
    """Score `recipes` (the first one a warm-up) with the pool `make` builds, as score_heldout
    does."""
    from search.heldout import heldout_path
    from search.records import write_json_atomic

    split = split_of(folder)
    shutil.rmtree(folder / "heldout", ignore_errors=True)
    t0 = time.perf_counter()
    pool = make()
    try:
        while not pool.available(0):
            time.sleep(0.05)
        started = time.perf_counter() - t0
        walls, evals = [], []
        for number, recipe in recipes.items():
            t = time.perf_counter()
            result = pool.result(pool.wait([pool.submit(0, recipe, "report")], None)[0])
            if not result.ok:
                raise SystemExit(f"{label}: trial {number} failed: {result.error}")
            write_json_atomic(heldout_path(folder, split, number), {"metrics": result.metrics})
            walls.append(time.perf_counter() - t)
            evals.append(result.eval_s)
        info = pool.ready()[0] if hasattr(pool, "ready") else pool.worker(0).info()
    finally:
        pool.shutdown()
    # the first finalist warms caches up (first forward pass, lazy imports)
    return Row(label, started, statistics.mean(walls[1:]), statistics.mean(evals[1:]), info)


def child(folder: Path, count: int) -> None:
    """--child: the 'as before' pool in this fresh process (its environment set by the parent)."""
    from search.pool import InProcessPool

    spec, recipes = finalists(folder)
    row = timed("", lambda: InProcessPool(spec), folder, dict(list(recipes.items())[:count]))
    print(json.dumps(row.__dict__))


def in_fresh_process(label: str, folder: Path, count: int, env: dict[str, str]) -> Row:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), "--contrast", str(count)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{label}: the fresh process failed:\n{out.stderr[-3000:]}")
    return Row(**{**json.loads(out.stdout.strip().splitlines()[-1]), "label": label})


def described(info: dict[str, Any]) -> str:
    return (
        f"{plural(info['threads'], 'thread')}, OMP_WAIT_POLICY={info['omp_wait_policy'] or 'unset'}"
    )


def measure(
    folder: Path,
    spec: Any,
    todo: dict[int, dict[str, Any]],
    contrast: dict[int, dict[str, Any]],
    ray: bool,
) -> list[tuple[str, Row]]:
    """Every row, quiet and then busy."""
    from search.heldout import heldout_pool
    from search.pool import InProcessPool, RayPool

    ray_spec = replace(spec, roles=("report",))  # what a Ray pool for held-out scoring would run
    passive = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    rows: list[tuple[str, Row]] = []
    for load in ("quiet", "busy"):
        with one_busy_core() if load == "busy" else contextlib.nullcontext():
            rows.append((load, timed("held-out", lambda: heldout_pool(spec), folder, todo)))
            rows.append((load, timed("as before", lambda: InProcessPool(spec), folder, contrast)))
            rows.append((load, in_fresh_process("passive", folder, len(contrast) - 1, passive)))
            if ray:
                rows.append((load, timed("ray", lambda: RayPool(ray_spec, 1), folder, todo)))
    return rows


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
    parser.add_argument("--trials", type=int, default=16, help="trials of the study")
    parser.add_argument("--finalists", type=int, default=10, help="at most, +1 warm-up")
    parser.add_argument("--contrast", type=int, default=3, help="finalists of the contrast rows")
    parser.add_argument("--no-ray", action="store_true", help="leave out the one-worker Ray pool")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the held-out worker (as workers.threads)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    import optuna
    import transformers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    if args.child:
        child(args.child, args.contrast + 1)
        return

    import torch

    from evaluators.zoo import build_zoo
    from search import console
    from search.demo import load_demo_config
    from search.loop import run_study
    from search.pool import cpu_slots

    build_zoo(args.zoo, seed=0, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        folder = tmp / "demo"
        config = load_demo_config(str(folder), [f"budget.n_trials={args.trials}"], str(args.zoo))
        t0 = time.perf_counter()
        study = run_study(config, progress=False)
        study_s = time.perf_counter() - t0
        evals = [t.user_attrs["eval_s"] for t in study.trials if "eval_s" in t.user_attrs]
        reference = statistics.mean(evals)
        spec, recipes = finalists(folder)
        if args.threads:
            spec = replace(spec, threads=args.threads)
        todo = dict(list(recipes.items())[: args.finalists + 1])
        contrast = dict(list(todo.items())[: args.contrast + 1])
        print(
            f"{cpu_slots()} cores; torch default threads {torch.get_num_threads()}; study of "
            f"{args.trials} trials with {plural(config.workers.count, 'worker')} in "
            f"{study_s:.0f} s; workers' mean eval_s {reference:.3f} s (median "
            f"{statistics.median(evals):.3f} s, {len(evals)} trials); held-out: {len(todo) - 1} "
            f"finalists (+1 warm-up), contrast rows {len(contrast) - 1} (+1); ratio: wall s per "
            "finalist / workers' mean eval_s",
            flush=True,
        )
        with console.others_to(tmp / "others.log"):  # Ray's and the engine's lines, as in a report
            rows = measure(folder, spec, todo, contrast, not args.no_ray)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n  {'':52s} {'start':>8s} {'wall':>8s} {'eval_s':>8s} {'ratio':>7s}")
    for load, row in rows:
        label = f"{load:5s} {row.label} ({described(row.info)})"
        print(
            f"  {label:52s} {row.start_s:7.2f}s {row.wall_s:7.3f}s {row.eval_s:7.3f}s "
            f"{row.wall_s / reference:6.2f}x"
        )
    ok = True
    for load, goal in (("quiet", 1.3), ("busy", 2.0)):
        row = next(r for ld, r in rows if ld == load and r.label == "held-out")
        ratio = row.wall_s / reference
        ok &= ratio <= goal
        verdict = "met" if ratio <= goal else "MISSED"
        print(f"  goal: {load} held-out <= {goal}x: {ratio:.2f}x {verdict}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
