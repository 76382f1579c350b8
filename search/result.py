"""What a worker returns for one candidate: scores and timings, or the reason it failed.

A value that travels from a worker (a Ray actor, or this process) back to the study loop; plain
data, so it pickles across processes and nodes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RungScores:
    """Multi-fidelity: how far a held candidate has been scored, and its per-item scores so far."""

    stop: int  # items per task scored (the rung's; a smaller task is scored whole)
    items: dict[str, int]  # items scored per task
    # per metric key, one list of per-item scores per task
    item_scores: dict[str, list[list[float]]]

    @property
    def total(self) -> int:
        """Items scored over all tasks."""
        return sum(self.items.values())


@dataclass(frozen=True)
class WorkerResult:
    """One candidate's outcome on one worker; `error` is None when it was scored."""

    worker: str = ""  # host:pid/index
    node: str | None = None  # the Ray node the worker ran on (None outside Ray)
    metrics: dict[str, float] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    merge_s: float = 0.0
    eval_s: float = 0.0
    rung: RungScores | None = None  # multi-fidelity only
    error: str | None = None
    traceback: str | None = None
    # the worker died during the candidate (not the candidate's own error)
    worker_lost: bool = False
    # the wall clock where it was made (on the worker, as it finished): the loop, busy with other
    # results, may read it later, and the worker's idle time counts from here
    ended: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.error is None
