"""Search-loop benchmarks: per-trial overhead, scheduling without a generation barrier, TPE vs
random.

    .venv/bin/python tests/benchmarks/bench_search.py                        # all three parts
    .venv/bin/python tests/benchmarks/bench_search.py --parts overhead,schedule
    .venv/bin/python tests/benchmarks/bench_search.py --parts schedule --schedule-reproducible
    .venv/bin/python tests/benchmarks/bench_search.py --parts quality --trials 20 --seeds 2

Every number comes from ONE run of each study (no repeats); each part prints its own wall time.

a. overhead: a short study on the toy zoo (2 CPU workers, real lm-eval). Per trial,
   (wall time seen by the study loop - the evaluator's own eval_s) / wall time, median over the
   trials, leaving out each worker's first trial (a warm-up: first forward pass, lazy imports).
   Goal <= 10%.
b. schedule: 8 simulated GPU workers (workers.count 8, gpus_per_worker 1; without CUDA, start_ray
   advertises logical GPUs) whose candidates sleep 1-3 s instead of evaluating, 96 trials through
   search.loop.run_study. Makespan vs the ideal (sum of the sleeps / 8) and vs a generation-barrier
   schedule (dispatch 8, wait for all 8, repeat) computed on the same sleeps. Goal: within 10%.
   run_study's worker_cls hook replaces CandidateWorker with SleepWorker, a stand-in with the same
   constructor and run() signature; it holds a start barrier so the makespan measures scheduling,
   not the staggered start of 8 Ray processes on a small machine.
c. quality: on the zoo, --trials trials of TPE and of random search for each of --seeds seeds,
   single objective = mean validation accuracy over the zoo's tasks; best value per study.
   One worker by default (--quality-workers): then each study is a function of its seed and the
   figures repeat exactly. With several workers TPE's proposals depend on which candidate finishes
   first, so a rerun gives other numbers.

The zoo is built (or reused) in REPO/.zoo/seed0; part b needs only a tiny model and tiny tasks.
A script, not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ZOO_DIR = REPO / ".zoo" / "seed0"


# --- helpers --------------------------------------------------------------------------------------


def zoo_config(
    zoo: Any,
    folder: Path,
    name: str,
    *,
    n_trials: int,
    sampler: dict[str, Any],
    limit: int | None,
    workers: int = 2,
    baselines: bool = False,
) -> dict[str, Any]:
    tasks = list(zoo.tasks)
    return {
        "study": {"name": name, "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes.values()]},
        "space": {
            "methods": ["linear", "task_arithmetic", "ties", "dare_ties"],
            "weight": [0.0, 1.0],
            "density": [0.1, 1.0],
            "lambda": [0.3, 1.5],
        },
        "evaluator": {
            "tasks": tasks,
            "include_path": str(zoo.tasks_dir),
            "limit": limit,
            "builtin_tasks": False,
            "batch_size": 64,
        },
        "objectives": {
            "mode": "single",
            "items": [{"task": t, "weight": 1.0 / len(tasks)} for t in tasks],
        },
        "sampler": sampler,
        "budget": {"n_trials": n_trials},
        "workers": {"count": workers},
        "baselines": baselines,
    }


def run(config_data: dict[str, Any], worker_cls: type | None = None):
    from search.config import config_from_dict
    from search.loop import run_study

    return run_study(config_from_dict(config_data), progress=False, worker_cls=worker_cls)


def restart_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# --- a. per-trial overhead ------------------------------------------------------------------------


def bench_overhead(zoo: Any, scratch: Path, args: argparse.Namespace) -> None:
    from search import records

    print(
        f"\n== a. per-trial overhead: {args.overhead_trials} trials on the zoo, 2 workers, "
        f"limit {args.limit or 'none (full validation split)'}",
        flush=True,
    )
    restart_ray()
    folder = scratch / "overhead"
    t0 = time.perf_counter()
    run(
        zoo_config(
            zoo,
            folder,
            "overhead",
            n_trials=args.overhead_trials,
            sampler={"name": "tpe", "seed": 0, "n_startup_trials": 10},
            limit=args.limit,
            baselines=True,
        )
    )
    total = time.perf_counter() - t0
    recs = [
        r for _, r in sorted(records.read_trial_records(folder).items()) if r["state"] == "COMPLETE"
    ]
    first_of_worker: dict[str, int] = {}
    for r in recs:
        first_of_worker.setdefault(r["worker"], r["number"])
    steady = [r for r in recs if r["number"] not in first_of_worker.values()]
    overhead = [(r["wall_s"] - r["eval_s"]) / r["wall_s"] for r in steady]
    merge = [r["merge_s"] / r["wall_s"] for r in steady]
    rest = [(r["wall_s"] - r["eval_s"] - r["merge_s"]) for r in steady]
    print(
        f"  {len(recs)} complete trials, {len(first_of_worker)} workers; study wall {total:.1f} s "
        f"(study setup and worker start-up included)"
    )
    print(
        "  first trial per worker (left out as warm-up): "
        + ", ".join(
            f"{next(r['wall_s'] for r in recs if r['number'] == n):.1f} s"
            for n in first_of_worker.values()
        )
    )
    print(
        f"  steady trials: median wall {statistics.median(r['wall_s'] for r in steady):.3f} s, "
        f"median eval_s {statistics.median(r['eval_s'] for r in steady):.3f} s, "
        f"median merge_s {statistics.median(r['merge_s'] for r in steady):.3f} s, "
        f"median loop/Ray/driver {statistics.median(rest) * 1000:.0f} ms"
    )
    print(
        f"  overhead (wall - eval_s) / wall, median over {len(steady)} trials: "
        f"{pct(statistics.median(overhead))}"
        f"  (merge alone: {pct(statistics.median(merge))}; max {pct(max(overhead))})  goal <= 10%: "
        f"{'met' if statistics.median(overhead) <= 0.10 else 'NOT met'}"
    )
    print(f"  part a took {time.perf_counter() - t0:.0f} s", flush=True)


# --- b. scheduling --------------------------------------------------------------------------------


class SleepWorker:
    """Stands in for search.workers.CandidateWorker: same constructor and run(); sleeps 1-3 s per
    candidate.

    The sleep is drawn from the recipe (a hash seeds it), so it is known afterwards from the
    records.
    A barrier in __init__ releases every actor at once (set BARRIER/COUNT before the pool is built).
    It imports nothing heavy of its own (the spec's class is unpickled from search.workers).
    """

    BARRIER: str = ""
    COUNT: int = 0
    LOW, HIGH = 1.0, 3.0

    def __init__(self, spec: Any, index: int = 0) -> None:
        import pathlib
        import time as _time

        self.spec, self.index = spec, index
        barrier = pathlib.Path(self.BARRIER)
        (barrier / f"{index}.{os.getpid()}").touch()
        deadline = _time.time() + 300
        while len(list(barrier.iterdir())) < self.COUNT and _time.time() < deadline:
            _time.sleep(0.005)

    def info(self) -> dict[str, Any]:
        return {"index": self.index, "pid": os.getpid()}

    def run(
        self,
        recipe: dict[str, Any],
        role: str = "search",
        items: int | None = None,
        rung: bool = False,
    ):
        import hashlib
        import json as _json
        import random
        import time as _time

        from search.result import WorkerResult

        start = _time.time()
        seed = int(
            hashlib.sha256(_json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16], 16
        )
        rng = random.Random(seed)
        sleep = rng.uniform(self.LOW, self.HIGH)
        _time.sleep(sleep)
        metrics = {f"{task}/acc": rng.random() for task in self.spec.evaluator.task_names}
        metrics.update({"bench/start": start, "bench/end": _time.time(), "bench/sleep": sleep})
        return WorkerResult(
            worker=f"sleep:{os.getpid()}/{self.index}",
            metrics=metrics,
            higher_is_better={k: True for k in metrics},
            eval_s=sleep,
        )


def greedy_makespan(sleeps: list[float], machines: int) -> float:
    """No barrier, no overhead: each job in order goes to the machine that frees first."""
    free = [0.0] * machines
    for s in sleeps:
        i = free.index(min(free))
        free[i] += s
    return max(free)


def barrier_makespan(sleeps: list[float], machines: int) -> float:
    """Generation barrier: dispatch `machines` jobs, wait for all, repeat."""
    return sum(max(sleeps[i : i + machines]) for i in range(0, len(sleeps), machines))


def bench_schedule(scratch: Path, args: argparse.Namespace) -> None:
    from search import records
    from tests.support.tiny import build_model, build_tasks

    n_workers, n_trials = args.schedule_workers, args.schedule_trials
    print(
        f"\n== b. scheduling: {n_workers} simulated GPU workers, {n_trials} trials sleeping "
        f"{SleepWorker.LOW:g}-{SleepWorker.HIGH:g} s"
        + (", sampler.reproducible" if args.schedule_reproducible else ""),
        flush=True,
    )
    t0 = time.perf_counter()
    restart_ray()
    model = build_model(scratch / "tiny" / "base", seed=0)
    finetunes = [build_model(scratch / "tiny" / f"ft{i}", seed=i) for i in (1, 2)]
    tasks = build_tasks(scratch / "tiny" / "tasks", n_items=10)
    barrier = scratch / "barrier"
    barrier.mkdir()
    SleepWorker.BARRIER, SleepWorker.COUNT = str(barrier), n_workers
    folder = scratch / "schedule"
    data = {
        "study": {"name": "schedule", "output_dir": str(folder)},
        "models": {"base": str(model), "finetunes": [str(p) for p in finetunes]},
        "space": {"methods": ["ties", "task_arithmetic"], "lambda": [0.5, 1.5]},
        "evaluator": {
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
        },
        "objectives": {"items": [{"task": t} for t in tasks.names]},
        "sampler": {
            "name": args.schedule_sampler,
            "seed": 0,
            "reproducible": args.schedule_reproducible,
        },
        "budget": {"n_trials": n_trials},
        "workers": {"count": n_workers, "gpus_per_worker": 1},
        "baselines": False,
    }
    t_run = time.perf_counter()
    run(data, worker_cls=SleepWorker)
    run_wall = time.perf_counter() - t_run
    recs = [
        r for _, r in sorted(records.read_trial_records(folder).items()) if r["state"] == "COMPLETE"
    ]
    assert len(recs) == n_trials, f"expected {n_trials} complete trials, got {len(recs)}"
    sleeps = [r["metrics"]["bench/sleep"] for r in recs]  # in trial (= dispatch) order
    start = min(r["metrics"]["bench/start"] for r in recs)
    end = max(r["metrics"]["bench/end"] for r in recs)
    makespan = end - start
    ideal = sum(sleeps) / n_workers
    greedy = greedy_makespan(sleeps, n_workers)
    barrier_time = barrier_makespan(sleeps, n_workers)
    # idle gaps on a worker between the end of one candidate and the start of its next one
    by_worker: dict[str, list[dict[str, float]]] = {}
    for r in recs:
        by_worker.setdefault(r["worker"], []).append(r["metrics"])
    gaps = []
    for runs in by_worker.values():
        runs.sort(key=lambda m: m["bench/start"])
        gaps += [b["bench/start"] - a["bench/end"] for a, b in zip(runs, runs[1:])]
    first_starts = sorted(runs[0]["bench/start"] - start for runs in by_worker.values())
    print(
        f"  {len(recs)} trials on {len(by_worker)} workers; sum of sleeps {sum(sleeps):.1f} s; "
        f"run_study wall {run_wall:.1f} s (actor start-up included)"
    )
    print(f"  first candidate start per worker, after the first: max {max(first_starts):.3f} s")
    print(
        f"  dispatch gap on a worker (end -> next start): "
        f"median {statistics.median(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms"
    )
    print(f"  ideal (sum / {n_workers}):                {ideal:7.2f} s")
    print(
        f"  measured, no barrier (run_study):   {makespan:7.2f} s  = "
        f"{makespan / ideal:.3f} x ideal  "
        f"goal <= 1.10: {'met' if makespan / ideal <= 1.10 else 'NOT met'}"
    )
    print(
        f"  simulated, no barrier, no overhead: {greedy:7.2f} s  = {greedy / ideal:.3f} x ideal  "
        f"(measured / simulated = {makespan / greedy:.3f})"
    )
    print(
        f"  simulated, generation barrier:      {barrier_time:7.2f} s  = "
        f"{barrier_time / ideal:.3f} x ideal"
    )
    print(f"  part b took {time.perf_counter() - t0:.0f} s", flush=True)
    restart_ray()


# --- c. search quality ----------------------------------------------------------------------------


def bench_quality(zoo: Any, scratch: Path, args: argparse.Namespace) -> None:
    from optuna.trial import TrialState

    print(
        f"\n== c. search quality: {args.trials} trials per study, seeds {list(range(args.seeds))}, "
        f"limit {args.limit or 'none (full validation split)'}, "
        f"baselines {'on' if args.baselines else 'off'}, "
        f"{args.quality_workers} worker{'s' if args.quality_workers > 1 else ''}",
        flush=True,
    )
    restart_ray()
    t0 = time.perf_counter()
    results: dict[str, list[float]] = {"tpe": [], "random": []}
    curves: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    for seed in range(args.seeds):
        for sampler in ("tpe", "random"):
            ts = time.perf_counter()
            cfg = {"name": sampler, "seed": seed}
            if sampler == "tpe":
                cfg["n_startup_trials"] = args.startup
            study = run(
                zoo_config(
                    zoo,
                    scratch / f"quality-{sampler}-{seed}",
                    f"quality-{sampler}-{seed}",
                    n_trials=args.trials,
                    sampler=cfg,
                    limit=args.limit,
                    baselines=args.baselines,
                    workers=args.quality_workers,
                )
            )
            done = sorted(
                study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                key=lambda t: t.number,
            )
            best, curve = float("-inf"), []
            for t in done:
                best = max(best, t.values[0])
                curve.append(best)
            results[sampler].append(best)
            curves[sampler].append(curve)
            failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
            print(
                f"  seed {seed} {sampler:<6}: best mean accuracy {best:.4f} "
                f"({len(done)} complete, {failed} failed, {time.perf_counter() - ts:.0f} s)",
                flush=True,
            )
    for sampler, values in results.items():
        marks = [m for m in (10, 20, args.trials) if m <= args.trials]
        at = {m: statistics.mean(c[min(m, len(c)) - 1] for c in curves[sampler]) for m in marks}
        print(
            f"  {sampler:<6}: mean best {statistics.mean(values):.4f} over {len(values)} seeds "
            f"(per seed {', '.join(f'{v:.4f}' for v in values)}); mean best after "
            + ", ".join(f"{m}: {v:.4f}" for m, v in at.items())
        )
    print(f"  part c took {time.perf_counter() - t0:.0f} s", flush=True)
    restart_ray()


# --- main -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        default="overhead,schedule,quality",
        help="comma-separated: overhead, schedule, quality",
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="items per task and candidate in parts a and c (default: the full validation split)",
    )
    parser.add_argument("--overhead-trials", type=int, default=16)
    parser.add_argument("--schedule-workers", type=int, default=8)
    parser.add_argument(
        "--schedule-trials",
        type=int,
        default=96,
        help="trials in part b; with fewer, the last candidates' uneven ends weigh more "
        "(at 48 even the zero-overhead schedule ranged 1.05-1.12x ideal over runs)",
    )
    parser.add_argument("--schedule-sampler", default="tpe", choices=["tpe", "random"])
    parser.add_argument(
        "--schedule-reproducible",
        action="store_true",
        help="part b with sampler.reproducible: results told in trial order (its idle cost)",
    )
    parser.add_argument("--trials", type=int, default=40, help="trials per study in part c")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per sampler in part c")
    parser.add_argument(
        "--startup", type=int, default=10, help="TPE's random start-up trials in part c"
    )
    parser.add_argument(
        "--baselines", action="store_true", help="enqueue the baselines in part c too"
    )
    parser.add_argument(
        "--quality-workers",
        type=int,
        default=1,
        help="workers per study in part c (1: reproducible from the seed)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the study folders (printed)")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"overhead", "schedule", "quality"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    scratch = Path(tempfile.mkdtemp(prefix="bench_search_"))
    started = time.perf_counter()
    zoo = None
    if parts & {"overhead", "quality"}:
        from evaluators.zoo import build_zoo

        t = time.perf_counter()
        zoo = build_zoo(ZOO_DIR, seed=0, progress=True)
        print(
            f"zoo: {zoo.root} ({len(zoo.finetunes)} fine-tunes, tasks {', '.join(zoo.tasks)}; "
            f"ready in {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    try:
        if "overhead" in parts:
            bench_overhead(zoo, scratch, args)
        if "schedule" in parts:
            bench_schedule(scratch, args)
        if "quality" in parts:
            bench_quality(zoo, scratch, args)
    finally:
        restart_ray()
        if args.keep:
            print(f"\nstudy folders kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nall parts took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
