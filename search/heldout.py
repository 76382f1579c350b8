"""Held-out scores: finalists and baselines re-scored on the report split, stored beside the study.

results/<study>/heldout/<split>/<trial>.json holds {"metrics": {...}}; a trial scored once is
never scored again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

from search import console
from search.pool import InProcessPool, Pool
from search.records import write_json_atomic
from search.workers import WorkerSpec


def heldout_path(folder: Path, split: str, number: int) -> Path:
    return folder / "heldout" / split / f"{number}.json"


def read_heldout(folder: Path, split: str) -> dict[int, dict[str, float]]:
    out = {}
    for path in sorted((folder / "heldout" / split).glob("*.json")):
        out[int(path.stem)] = json.loads(path.read_text())["metrics"]
    return out


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
    scores are kept in. `pool` runs the candidates (default: one worker in this process).
    """
    todo = {n: r for n, r in recipes.items() if not heldout_path(folder, split, n).is_file()}
    if not todo:
        return read_heldout(folder, split)
    own = pool is None
    with console.others_to(folder / console.RAY_LOG) as terminal:
        # the engine's own output (vLLM's start, its warnings) goes beside Ray's, in the folder
        pool = pool or InProcessPool(spec)
        try:
            return _score(folder, pool, todo, split, progress, terminal)
        finally:
            if own:
                pool.shutdown()


def _score(
    folder: Path, pool: Pool, todo: dict, split: str, progress: bool, terminal: TextIO
) -> dict[int, dict[str, float]]:
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
