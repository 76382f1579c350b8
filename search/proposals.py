"""Where the study loop gets its next candidate: proposals made while the workers work.

Asking the sampler for a candidate takes from a few milliseconds (random, NSGA-II) to a large part
of a second (TPE over a long history; README, "The sampler's cost"). Made at the moment a worker
frees up, that time is the worker's idle time. So proposals are made ahead, on a thread of their
own, up to one per worker: when a worker frees up, its next candidate is ready, and the sampler is
asked again while the workers run. The proposed trials are RUNNING trials of the study, so a sampler
that accounts for running trials (TPE's constant liar) does not propose them twice.

With `sampler.reproducible`, or one worker, the proposals are made in trial order instead, on the
loop's thread: one per worker at the start and one after each trial is told, so the sampler sees
the same history at every ask whatever order the results arrive in (search/loop.py tells them in
trial order). One worker's study stays a sequential one: each proposal knows every result before
it, and a seed repeats the study.

Either kind hands out proposals with `take`, is told with `told` that a trial was told, and lists
with `pending` the proposals no worker has taken (the loop keeps them alive and requeues them when
it stops).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    """Proposals made on the caller's thread, at their place in the trial order."""

    def __init__(self, propose: Callable[[], T | None], first: int) -> None:
        self._propose, self._ready = propose, []
        for _ in range(first):
            self.told()

    def take(self) -> T | None:
        return self._ready.pop(0) if self._ready else None

    def told(self) -> None:
        if (proposal := self._propose()) is not None:
            self._ready.append(proposal)

    def pending(self) -> list[T]:
        return list(self._ready)

    def spent(self) -> bool:
        return not self._ready

    def close(self) -> None:
        pass


class Ahead(Generic[T]):
    """Proposals made on a thread of their own, kept `depth` ahead of the workers.

    The thread proposes while fewer than `depth` proposals wait; when `propose` returns None (no
    budget left for now) it rests until the loop tells it a trial was told, which may free budget.
    """

    def __init__(self, propose: Callable[[], T | None], depth: int) -> None:
        self._propose, self._depth = propose, max(1, depth)
        self._ready: list[T] = []
        self._cond = threading.Condition()
        self._asking = False  # the thread is in `propose`
        self._rest = False  # the last proposal found no budget; wait for `told`
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="basin-proposals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._rest or len(self._ready) >= self._depth):
                    self._cond.wait()
                if self._closed:
                    return
                self._asking = True
            try:
                proposal = self._propose()
            except BaseException as exc:  # raised again on the loop's thread, by `take`
                with self._cond:
                    self._error, self._asking = exc, False
                    self._cond.notify_all()
                return
            with self._cond:
                self._asking = False
                if proposal is None:
                    self._rest = True
                else:
                    self._ready.append(proposal)
                self._cond.notify_all()

    def take(self) -> T | None:
        """The next proposal; waits while one is being made. None when there is none to come
        until a trial is told (the budget is spent for now)."""
        with self._cond:
            while not self._ready and self._error is None and (self._asking or not self._rest):
                self._cond.wait()
            if self._error is not None:
                raise self._error
            if not self._ready:
                return None
            proposal = self._ready.pop(0)
            self._cond.notify_all()
            return proposal

    def told(self) -> None:
        with self._cond:
            self._rest = False
            self._cond.notify_all()

    def pending(self) -> list[T]:
        with self._cond:
            return list(self._ready)

    def spent(self) -> bool:
        """No proposal waits and none is being made: the budget allowed none at the last ask."""
        with self._cond:
            return not self._ready and not self._asking and self._rest

    def close(self) -> None:
        """Stop proposing; a proposal being made is finished and kept (see `pending`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
