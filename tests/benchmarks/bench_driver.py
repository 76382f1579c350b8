"""The study loop's driver at scale: how long workers wait for their next candidate.

    .venv/bin/python tests/benchmarks/bench_driver.py                 # 16 workers, 2,000 trials
    .venv/bin/python tests/benchmarks/bench_driver.py --samplers tpe --trials 600
    .venv/bin/python tests/benchmarks/bench_driver.py --workers 8 --eval-s 1.0

Workers are simulated in this process (`ClockPool`, a search.pool.Pool): a candidate "evaluates"
for exactly --eval-s seconds of wall time, so what remains of a worker's time is the driver's:
telling the result, writing the record, asking the sampler, dispatching. The study is a real one
(search.loop.run_study, the journal storage in a study folder, the configured sampler) over the toy
zoo's four fine-tunes with the demo's methods at anchors granularity with the attention/MLP split
(58 params) and four objectives (a Pareto study, like the demo; --mode single: their mean). Each
candidate's four values are a smooth function of its recipe's numbers, so a sampler has something
to learn.

Printed per sampler, by windows of trials in dispatch order:
- worker idle: the time workers spent free (from the end of one candidate to the dispatch of their
  next), as a share of their time; goal < 5% at 16 workers and 0.3 s evaluations up to 2,000 trials;
- driver per trial: the mean of those gaps, against the evaluation time;
- proposal: the sampler's own time per proposal (Optuna's ask and basin's suggest, which writes
  the params), made on the loop's proposal thread while the workers run;
- the study's own record: what the run measured and stored on each trial (attrs.WORKER_TIME), as
  `basin status` prints it: from the end the worker stamps on its result to the next dispatch, so
  it should match the workers' idle time above.
One run per sampler; no repeats. A script, not a test (pytest does not collect it).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ZOO_DIR = REPO / ".zoo" / "seed0"


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [x for k in sorted(value) for x in _numbers(value[k])]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    return []


def synthetic_values(recipe: dict[str, Any], n: int) -> list[float]:
    """n values in (0, 1]: each peaks where the recipe's numbers sit near a target of its own."""
    xs = _numbers(recipe.get("models", [])) or [0.0]
    out = []
    for i in range(n):
        target = 0.15 + 0.2 * i
        out.append(1.0 / (1.0 + sum((x - target) ** 2 for x in xs) / len(xs)))
    return out


class ClockPool:
    """Simulated workers: a candidate is done --eval-s seconds after its dispatch."""

    def __init__(self, count: int, eval_s: float, tasks: list[str]) -> None:
        self.count, self.eval_s, self.tasks = count, eval_s, tasks
        self.done: list[tuple[float, int]] = []  # (deadline, ref), a heap
        self.results: dict[int, Any] = {}
        self.log: list[tuple[int, float, float]] = []  # (worker, dispatched, ended)
        self.next_ref = 0

    def available(self, worker: int) -> bool:
        return True

    def submit(
        self,
        worker: int,
        recipe: dict[str, Any],
        role: str = "search",
        *,
        items: int | None = None,
        rung: bool = False,
    ) -> int:
        from search.result import WorkerResult

        now = time.perf_counter()
        values = synthetic_values(recipe, len(self.tasks))
        metrics = {f"{task}/acc": v for task, v in zip(self.tasks, values)}
        ref = self.next_ref
        self.next_ref += 1
        self.results[ref] = WorkerResult(
            worker=f"sim/{worker}",
            metrics=metrics,
            higher_is_better={k: True for k in metrics},
            eval_s=self.eval_s,
            ended=time.time() + self.eval_s,  # as a worker would stamp it, finishing
        )
        heapq.heappush(self.done, (now + self.eval_s, ref))
        self.log.append((worker, now, now + self.eval_s))
        return ref

    def more(self, worker: int, items):
        raise NotImplementedError("no multi-fidelity in this benchmark")

    def wait(self, refs: list[int], timeout: float | None) -> list[int]:
        wanted = set(refs)
        if not wanted:
            time.sleep(min(timeout or 0.01, 0.01))
            return []
        first = min(d for d, r in self.done if r in wanted)
        now = time.perf_counter()
        if first > now:
            time.sleep(min(first - now, timeout if timeout is not None else first - now))
        now = time.perf_counter()
        ready = [r for d, r in self.done if r in wanted and d <= now]
        self.done = [(d, r) for d, r in self.done if r not in set(ready)]
        heapq.heapify(self.done)
        return ready

    def result(self, ref: int):
        return self.results.pop(ref)

    def restart(self, worker: int) -> None:
        pass

    def shutdown(self) -> None:
        pass


@contextlib.contextmanager
def timed_proposals() -> Iterator[dict[int, float]]:
    """The sampler's time per proposal, by trial number: Optuna's ask (the trial, and for a
    sampler that proposes all params at once, e.g. TPE multivariate, nothing yet) plus basin's
    suggest (every param: where a relative sampler does its work), in this process."""
    import optuna

    from search import loop

    took: dict[int, float] = {}
    plain_ask, plain_suggest = optuna.Study.ask, loop.suggest

    def ask(self, *args, **kwargs):
        start = time.perf_counter()
        trial = plain_ask(self, *args, **kwargs)
        took[trial.number] = time.perf_counter() - start
        return trial

    def suggest(trial, space):
        start = time.perf_counter()
        params = plain_suggest(trial, space)
        took[trial.number] = took.get(trial.number, 0.0) + time.perf_counter() - start
        return params

    optuna.Study.ask, loop.suggest = ask, suggest
    try:
        yield took
    finally:
        optuna.Study.ask, loop.suggest = plain_ask, plain_suggest


def bench(sampler: str, args: argparse.Namespace, zoo: Any, scratch: Path) -> None:
    import optuna

    from search.config import config_from_dict
    from search.loop import run_study
    from tests.benchmarks.bench_search import zoo_config

    tasks = list(zoo.tasks)
    data = zoo_config(
        zoo,
        scratch / sampler,
        f"driver-{sampler}",
        n_trials=args.trials,
        sampler={"name": sampler, "seed": 0, "proposers": args.proposers},
        limit=None,
        workers=args.workers,
    )
    # the demo's methods, at anchors with the attention/MLP split: 58 params
    data["space"].update(
        methods=["ties", "dare_ties", "task_arithmetic"],
        granularity="anchors",
        split_attn_mlp=True,
        density=[0.2, 1.0],
    )
    data["objectives"] = {"mode": args.mode, "items": [{"task": t} for t in tasks]}
    pool = ClockPool(args.workers, args.eval_s, tasks)
    with timed_proposals() as ask_by_trial:
        start = time.perf_counter()
        study = run_study(config_from_dict(data), progress=False, pool=lambda *a: pool)
        wall = time.perf_counter() - start
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))

    # each dispatch's gap: from the end of the worker's previous candidate (or the first dispatch)
    log = sorted(pool.log, key=lambda x: x[1])
    t0 = log[0][1]
    last_end: dict[int, float] = {}
    gaps = []
    for worker, dispatched, ended in log:
        gaps.append(max(0.0, dispatched - last_end.get(worker, t0)))
        last_end[worker] = ended
    ideal = len(log) * args.eval_s / args.workers
    print(
        f"\n{sampler}: {complete} complete of {len(log)} dispatched; wall {wall:.1f} s "
        f"(ideal {ideal:.1f} s = {len(log)} x {args.eval_s:g} s / {args.workers} workers)"
    )
    print(f"  {'trials':>11}  {'worker idle':>11}  {'driver/trial':>12}  {'proposal':>10}")
    edges = [e for e in args.windows if e < len(log)] + [len(log)]
    lo = 0
    for hi in edges:
        if hi <= lo:
            continue
        window = gaps[lo:hi]
        busy = (hi - lo) * args.eval_s
        idle = sum(window) / (sum(window) + busy)
        ask_times = [ask_by_trial[n] for n in range(lo, hi) if n in ask_by_trial]
        # made in proposal processes (--proposers): not timed here
        ask = f"{1000 * sum(ask_times) / len(ask_times):7.1f} ms" if ask_times else f"{'-':>10}"
        mark = "  goal < 5%: " + ("met" if idle < 0.05 else "NOT met")
        print(
            f"  {lo:>5}-{hi:<5}  {100 * idle:10.1f}%  {1000 * sum(window) / len(window):9.1f} ms"
            f"  {ask}{mark}"
        )
        lo = hi
    total_idle = sum(gaps) / (sum(gaps) + len(log) * args.eval_s)
    print(f"  all trials: worker idle {100 * total_idle:.1f}%")
    # what the run itself recorded (attrs.WORKER_TIME), as `basin status` says it
    from search.summary import driver_line

    print(f"  the study's own record: {driver_line(study.get_trials(deepcopy=False))}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samplers", default="random,nsga2,tpe")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--eval-s", type=float, default=0.3)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument(
        "--mode",
        default="pareto",
        choices=["pareto", "single"],
        help="four objectives (a Pareto study, like the demo) or their mean",
    )
    parser.add_argument(
        "--windows",
        default="100,300,500,1000,1500",
        help="window edges (trial numbers) of the table",
    )
    parser.add_argument(
        "--proposers",
        type=int,
        default=0,
        help="sampler.proposers: processes making the proposals (0: a thread of the run's)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the study folders (printed)")
    args = parser.parse_args(argv)
    args.windows = [int(x) for x in args.windows.split(",") if x]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    from evaluators.zoo import build_zoo

    zoo = build_zoo(ZOO_DIR, seed=0, progress=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench_driver_"))
    print(
        f"{args.workers} simulated workers, {args.eval_s:g} s per candidate, {args.trials} trials "
        f"per sampler, objectives: {args.mode}; proposals made by "
        f"{f'{args.proposers} processes' if args.proposers else 'a thread'}; "
        f"{os.cpu_count()} CPU cores",
        flush=True,
    )
    try:
        for sampler in [s.strip() for s in args.samplers.split(",") if s.strip()]:
            bench(sampler, args, zoo, scratch)
    finally:
        if args.keep:
            print(f"\nstudy folders kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
