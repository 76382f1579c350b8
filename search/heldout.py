"""Held-out scores: finalists and baselines re-scored on the report split, stored beside the study.

results/<study>/heldout/<split>/<trial>.json holds {"metrics": {...}}; a trial scored once is
never scored again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from search.records import write_json_atomic


def heldout_path(folder: Path, split: str, number: int) -> Path:
    return folder / "heldout" / split / f"{number}.json"


def read_heldout(folder: Path, split: str) -> dict[int, dict[str, float]]:
    out = {}
    for path in sorted((folder / "heldout" / split).glob("*.json")):
        out[int(path.stem)] = json.loads(path.read_text())["metrics"]
    return out


def score_heldout(
    folder: Path, spec: Any, recipes: dict[int, dict], split: str, progress: bool = True
) -> dict[int, dict[str, float]]:
    """Score the trials not yet scored in the report role with one in-process worker; returns all scores.

    `split` names what the report role scores (the evaluator section's label), and the folder they are kept in.
    """
    from search.workers import CandidateWorker

    todo = {n: r for n, r in recipes.items() if not heldout_path(folder, split, n).is_file()}
    if todo:
        worker = CandidateWorker(spec)
        for number, recipe in tqdm(
            sorted(todo.items()), desc=f"scoring on {split}", disable=not progress
        ):
            result = worker.run(recipe, role="report")
            if "error" in result:
                raise RuntimeError(f"trial {number} failed on the {split} split: {result['error']}")
            write_json_atomic(heldout_path(folder, split, number), {"metrics": result["metrics"]})
    return read_heldout(folder, split)
