"""Held-out scores: finalists and baselines re-scored on the report split, stored beside the study.

results/<study>/heldout/<split>/<trial>.json holds {"metrics": {...}}; a trial scored once is
never scored again.

The finalists are scored by one worker with the settings of the one worker of a one-worker study
on this machine (search.pool: its share of the cores as torch threads, OMP_WAIT_POLICY=PASSIVE,
the tokenizer without threads of its own), which builds the report role's evaluator only. Where
that worker runs one thread (any CPU machine of 2 cores, or workers.threads: 1) or a GPU does the
work, it runs in this process: torch's threads can be set here, and with one thread OpenMP's wait
policy, which this process fixed when it imported torch, does not matter. A CPU worker of more
threads runs in a one-worker Ray pool as `basin run` starts one, where its process starts with
the passive policy (unless this process started with a worker's: OMP_WAIT_POLICY=PASSIVE basin
report scores here).
Measured on 2 cores (tests/benchmarks/bench_report.py, wall seconds per finalist against the
study workers' mean eval_s; quiet, then beside one busy process): this process with the worker's 1
thread 0.79x and 0.98x, started in 0.4-0.7 s; a one-worker Ray pool 0.88x and 0.92x, started in 15
and 36 s; torch's default 2 threads here (what held-out scoring did before) 0.98x and 2.1x, and
21x and 27x (16 and 21 s a finalist) while other work also ran, where this process's 1 thread
stayed at 0.63x and 1.6x. With 2 threads (workers.threads: 2) the wait policy decides:
spinning here 1.7x and 13x, passive in a fresh process 0.7x, on the Ray pool 1.2x and 4.0x
(started in 19 and 117 s: on 2 cores Ray's own processes compete with the worker's threads).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from search import console
from search.pool import (
    InProcessPool,
    Pool,
    RayPool,
    WorkerStartError,
    cpu_worker,
    worker_env,
)
from search.records import write_json_atomic
from search.workers import WorkerSpec, resolve_device


def heldout_path(folder: Path, split: str, number: int) -> Path:
    return folder / "heldout" / split / f"{number}.json"


def read_heldout(folder: Path, split: str) -> dict[int, dict[str, float]]:
    out = {}
    for path in sorted((folder / "heldout" / split).glob("*.json")):
        out[int(path.stem)] = json.loads(path.read_text())["metrics"]
    return out


def heldout_pool(spec: WorkerSpec) -> Pool:
    """One worker with the torch threads and environment of the one worker of a one-worker study
    on this machine (`spec.threads` if the study sets them), serving the report role only (it
    builds no search evaluator): in this process, or on Ray where a CPU worker of more than one
    thread needs an OpenMP wait policy this process did not start with (only a process starting
    can set it; it was read when torch was imported)."""
    spec = replace(spec, roles=("report",))
    if resolve_device(spec.models.device) == "cpu":
        spec = cpu_worker(spec, 1)
        policy = worker_env(spec.threads)["OMP_WAIT_POLICY"]
        if spec.threads > 1 and os.environ.get("OMP_WAIT_POLICY") != policy:
            return RayPool(spec, 1)  # a local Ray, as `basin run` starts it; gone at shutdown
    return InProcessPool(spec, env=worker_env(spec.threads))


def score_heldout(
    folder: Path,
    spec: WorkerSpec,
    recipes: dict[int, dict],
    split: str,
    progress: bool = True,
    pool: Pool | None = None,
) -> dict[int, dict[str, float]]:
    """Score the trials not yet scored in the report role; returns every score kept for `split`.

    `split` names what the report role scores (the evaluator section's label) and the folder the
    scores are kept in. `pool` runs the candidates (default: heldout_pool's one worker, shut down
    before this returns).
    """
    todo = {n: r for n, r in recipes.items() if not heldout_path(folder, split, n).is_file()}
    if not todo:
        return read_heldout(folder, split)
    own = pool is None
    with console.others_to(folder / console.RAY_LOG) as terminal:
        # the engine's own output (vLLM's start, its warnings) goes beside Ray's, in the folder
        pool = pool or heldout_pool(spec)
        try:
            return _score(folder, pool, todo, split, progress, terminal)
        finally:
            if own:
                pool.shutdown()


def _score(
    folder: Path, pool: Pool, todo: dict, split: str, progress: bool, terminal: TextIO
) -> dict[int, dict[str, float]]:
    try:
        while not pool.available(0):  # up before the bar starts: its rate is the finalists'
            time.sleep(0.1)
    except WorkerStartError as exc:
        raise WorkerStartError(f"cannot score on the {split} split: {exc}") from None
    bar = tqdm(
        sorted(todo.items()), desc=f"scoring on {split}", disable=not progress, file=terminal
    )
    for number, recipe in bar:
        ref = pool.submit(0, recipe, "report")
        result = pool.result(pool.wait([ref], None)[0])
        if not result.ok:
            raise RuntimeError(f"trial {number} failed on the {split} split: {result.error}")
        write_json_atomic(heldout_path(folder, split, number), {"metrics": result.metrics})
    return read_heldout(folder, split)
