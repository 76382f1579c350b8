"""Multi-fidelity against full-fidelity search on the toy zoo: items spent to reach the same best.

For each zoo seed, two single-objective studies (the mean accuracy of the four skills, TPE with one
seed, one worker so both runs are repeatable) get the same budget counted in evaluation items
(--mode pareto: a Pareto study of the four accuracies, judged by the hypervolume of its front of
complete trials, reference point 0; "best" below is then that hypervolume):
  full   every candidate scored on every search item;
  multi  fidelity rungs (default 24 and 72 items per task, keep 0.2), the rest on the full set.
It prints, per seed, the best full-search-set score found against items spent, and checks:
  reach  multi reaches full's final best (within 0.005; Pareto: 1%) with at most a third of
         full's items;
  equal  at equal items (the whole budget) multi's best is at least full's;
and the wall-clock ratio (merges and per-call set-up are paid per candidate, not per item).

    .venv/bin/python tests/benchmarks/bench_fidelity.py [--seeds 0 1 2] [--trials 60] \
        [--rungs 24 72] [--keep 0.2] [--window 20] [--reuse-full] [--mode pareto]

Zoos other than the cached seed 0 are built on first use (a few minutes each). A script, not a
test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CHECKPOINTS = (1 / 6, 1 / 3, 1 / 2, 1.0)  # shares of the budget at which the curves are printed


def study_dict(
    zoo: Any, folder: Path, items: int, fidelity: dict[str, Any] | None, mode: str
) -> dict[str, Any]:
    tasks = list(zoo.tasks)
    objectives = (
        {"items": [{"task": t, "weight": 1.0 / len(tasks)} for t in tasks]}
        if mode == "single"
        else {"mode": "pareto", "items": [{"task": t} for t in tasks]}
    )
    data = {
        "study": {"name": "bench", "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes.values()]},
        "space": {
            "methods": ["ties", "dare_ties", "task_arithmetic"],
            "weight": [0.0, 1.0],
            "density": [0.2, 1.0],
            "lambda": [0.3, 1.5],
        },
        "evaluator": {
            "tasks": tasks,
            "include_path": str(zoo.tasks_dir),
            "builtin_tasks": False,
            "batch_size": 64,
        },
        "objectives": objectives,
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 10},
        "budget": {"n_trials": None, "items": items},
        "workers": {"count": 1},
    }
    data["fidelity"] = fidelity  # None: full fidelity (not left to basin's default)
    return data


def hypervolume(values: list[list[float]]) -> float:
    """The hypervolume (reference point 0) of maximised values in [0, 1]: Optuna's own routine."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    if not values:
        return 0.0
    return float(compute_hypervolume(-np.array(values), np.zeros(len(values[0]))))


def curve(study: Any) -> list[tuple[int, float, float]]:
    """(items spent so far, best complete value so far, seconds since the first trial began) after
    each finished trial, in the order they finished."""
    from optuna.trial import TrialState

    trials = sorted(
        (t for t in study.get_trials(deepcopy=False) if t.datetime_complete),
        key=lambda t: t.datetime_complete,
    )
    began = min(t.datetime_start for t in trials)
    out, spent, best, complete = [], 0, float("-inf"), []
    for t in trials:
        spent += int(t.user_attrs.get("items", 0))
        if t.state == TrialState.COMPLETE:
            complete.append(t.values)
            best = max(best, t.value) if len(t.values) == 1 else hypervolume(complete)
        out.append((spent, best, (t.datetime_complete - began).total_seconds()))
    return out


def best_at(points: list[tuple[int, float, float]], items: float) -> float:
    return max([b for s, b, _ in points if s <= items], default=float("-inf"))


def to_reach(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(items, seconds) spent when the best first reached `target`."""
    return next(((s, w) for s, b, w in points if b >= target), None)


def run(
    zoo: Any, items: int, fidelity: dict[str, Any] | None, mode: str
) -> tuple[list[tuple[int, float, float]], float, int, int]:
    from optuna.trial import TrialState

    from search.config import config_from_dict
    from search.loop import run_study

    with tempfile.TemporaryDirectory(prefix="basin-bench-fidelity-") as tmp:
        start = time.perf_counter()
        data = study_dict(zoo, Path(tmp) / "study", items, fidelity, mode)
        study = run_study(config_from_dict(data), progress=False)
        wall = time.perf_counter() - start
        trials = study.get_trials(deepcopy=False)
        return curve(study), wall, len(trials), sum(t.state == TrialState.PRUNED for t in trials)


def full_run(
    zoo: Any, budget: int, args: argparse.Namespace, seed: int
) -> tuple[list[tuple[int, float, float]], float, int]:
    """The full-fidelity run: made now, or with --reuse-full read from the last one made."""
    kept = args.cache / "fidelity-full" / f"seed{seed}-items{budget}-{args.mode}.json"
    if args.reuse_full and kept.is_file():
        data = json.loads(kept.read_text())
        print(f"  (full: the run kept in {kept})")
        return [tuple(p) for p in data["curve"]], data["wall"], data["candidates"]
    points, wall, n, _ = run(zoo, budget, None, args.mode)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"curve": points, "wall": wall, "candidates": n}))
    return points, wall, n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--trials",
        type=int,
        default=60,
        help="the budget: this many full-fidelity candidates' items",
    )
    parser.add_argument("--rungs", type=int, nargs="+", default=[24, 72])
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="fidelity.window: peers of comparable age a candidate is compared with (default all)",
    )
    parser.add_argument(
        "--mode",
        choices=["single", "pareto"],
        default="single",
        help="one objective (the mean accuracy) or a Pareto study of the four accuracies",
    )
    parser.add_argument(
        "--reuse-full",
        action="store_true",
        help="take the full-fidelity runs from an earlier run of this script with the same seeds "
        "and budget (kept under --cache), as they repeat (one worker, a seeded sampler)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("BASIN_TEST_CACHE") or Path.home() / ".cache" / "basin-tests"),
    )
    args = parser.parse_args()

    import optuna

    from evaluators import HarnessEvaluator, HarnessSection
    from evaluators.zoo import build_zoo

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fidelity = {"rungs": args.rungs, "keep": args.keep, "window": args.window}
    print(
        f"budget: {args.trials} full-fidelity candidates' items; "
        f"multi-fidelity rungs {args.rungs}, keep {args.keep}, window {args.window or 'all'}"
    )
    ok = True
    for seed in args.seeds:
        zoo = build_zoo(args.cache / "zoo" / f"seed{seed}", seed=seed)
        section = HarnessSection(
            tasks=list(zoo.tasks), include_path=str(zoo.tasks_dir), builtin_tasks=False
        )
        sizes = HarnessEvaluator(section, split="validation").item_counts
        budget = args.trials * sum(sizes.values())
        full, full_wall, full_n = full_run(zoo, budget, args, seed)
        multi, multi_wall, multi_n, pruned = run(zoo, budget, fidelity, args.mode)
        final = full[-1][1]
        near = final - 0.005 if args.mode == "single" else 0.99 * final
        reach, own = to_reach(multi, near), to_reach(full, final)
        print(f"\nzoo seed {seed}: search items per task {sizes}; budget {budget:,} items")
        print(f"  full : {full_n} candidates, {full_wall:.0f} s")
        print(
            f"  multi: {multi_n} candidates ({pruned} pruned), {multi_wall:.0f} s "
            f"(wall-clock {multi_wall / full_wall:.2f}x full's for the same items)"
        )
        what = "score" if args.mode == "single" else "hypervolume of the complete trials"
        print(f"  best full-search-set {what} against items spent:")
        print("    items        full     multi")
        for share in CHECKPOINTS:
            spent = share * budget
            print(f"    {spent:10,.0f}  {best_at(full, spent):.4f}   {best_at(multi, spent):.4f}")
        reached = reach is not None and reach[0] <= budget / 3
        at_budget = best_at(multi, budget)  # (its last candidate may end past the budget)
        equal = at_budget >= final
        ok &= reached and equal
        print(
            f"  full found its final best {final:.4f} after {own[0]:,} items "
            f"({own[0] / budget:.2f} of them), {own[1]:.0f} s"
        )
        where = (
            (
                f"{reach[0]:,} items, {reach[0] / budget:.2f} of full's, {reach[1]:.0f} s "
                f"({reach[1] / full_wall:.2f}x full's whole run)"
            )
            if reach is not None
            else "never"
        )
        print(
            f"  reach: multi reached {near:.4f} after {where}: "
            f"{'met' if reached else 'MISSED'} (goal <= 0.33)"
        )
        print(
            f"  equal: at equal items multi {at_budget:.4f} vs full {final:.4f}: "
            f"{'met' if equal else 'MISSED'}"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
