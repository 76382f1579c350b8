"""A seeded carve of one scored split into two disjoint item sets: one to search on, one held out.

Many tasks score a single split (gsm8k's test, hellaswag's validation). Searching and reporting on
the same items would report the very items the recipe was chosen on, so the split is cut in two:
the search never sees the held-out part, and the report scores only it. The cut depends only on
(seed, task name, number of items), so every worker, the report and a resumed run cut alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from evaluators.protocol import EvaluatorError

Part = Literal["search", "holdout"]


@dataclass(frozen=True)
class Carve:
    """Hold out `fraction` of each task's items (drawn from `seed`); score `part` of them."""

    fraction: float
    seed: int = 0
    part: Part = "search"
    split: str = ""  # the split it cuts (for the record and the report)

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise EvaluatorError(f"holdout must lie strictly between 0 and 1, got {self.fraction}")
        if self.part not in ("search", "holdout"):
            raise EvaluatorError(f"unknown carve part {self.part!r}; Known: search, holdout")

    def ids(self, n_items: int, task: str) -> list[int]:
        """This part's item indices of a task with `n_items` items, ascending."""
        return carve_ids(n_items, task, self.fraction, self.seed)[self.part]


def carve_ids(n_items: int, task: str, fraction: float, seed: int) -> dict[str, list[int]]:
    """Both parts of a task's items: {"search": [...], "holdout": [...]}, disjoint, covering all."""
    held = round(fraction * n_items)
    if held < 1 or held >= n_items:
        raise EvaluatorError(
            f"task {task!r} has {n_items} items: holding out {fraction} of them leaves "
            f"{held} held out and {n_items - held} to search on; both need at least one "
            "(choose another evaluator.holdout, or a task with more items)"
        )
    order = list(range(n_items))
    random.Random(f"carve:{seed}:{task}").shuffle(order)
    return {"search": sorted(order[held:]), "holdout": sorted(order[:held])}
