"""Proposals made by processes of their own (`sampler.proposers: N`), for many workers.

A proposal thread (search/proposals.py `Ahead`) shares the run's process, and so one core and
Python's lock, with the loop that tells results and writes records. With many workers and short
candidates, or a sampler whose ask takes long (TPE over thousands of trials), that one core is the
bottleneck: workers wait for their next candidate (README, "The sampler's cost"). Proposal
processes each open the study in its storage, with a sampler of their own drawing from its own
stream, claim a trial for this run (its runner record names the run's process, so a run that dies
leaves trials that are found silent, as its own), write the params and hand over the trial's
number, params and recipe. The run tells the results; the samplers read them from the storage at
their next ask. They are kept `depth` proposals ahead of the workers, as the thread is.

`Processes` has the interface of the thread's `Ahead`: `take`, `told`, `pending`, `spent`, `close`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

WAIT_S = 0.5  # how often a wait for a proposal looks at whether the processes still live


class ProposerError(RuntimeError):
    """A proposal process failed, or died."""


class Processes(Generic[T]):
    """`count` processes proposing for the run whose StudySetup is `setup`, `depth` ahead.

    `made(trial_id, params, recipe)` turns a proposal into what `take` hands out; `failed()` is
    called for each proposal whose params could not become a recipe (its trial failed in the
    process that made it).
    """

    def __init__(
        self,
        setup: Any,
        runner: dict[str, Any],
        count: int,
        depth: int,
        made: Callable[[int, dict[str, Any], dict[str, Any]], T],
        failed: Callable[[], None],
    ) -> None:
        self._made, self._failed, self._depth = made, failed, max(1, depth)
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._requests: Any = context.Queue()
        self._results: Any = context.Queue()
        self._stop: Any = context.Event()  # set by `close`: requests still queued are dropped
        self._ready: list[T] = []
        self._asked = 0  # requests sent and not answered
        self._rest = False  # the last proposal found no budget; ask again once a trial is told
        shipped = dataclasses.replace(setup, study=None)  # each process opens the study itself
        self._procs = [
            context.Process(
                target=_serve,
                args=(shipped, runner, os.getpid(), self._requests, self._results, self._stop),
                name=f"basin-proposer-{k}",
                daemon=True,
            )
            for k in range(count)
        ]
        for proc in self._procs:
            proc.start()
        self._fill()

    def _fill(self) -> None:
        while not self._rest and len(self._ready) + self._asked < self._depth:
            self._requests.put(True)
            self._asked += 1

    def _receive(self, block: bool) -> bool:
        """Handle one answer; False when none came (within WAIT_S when blocking)."""
        try:
            answer = self._results.get(block, WAIT_S)
        except queue.Empty:
            return False
        kind, *rest = answer
        if kind == "error":
            raise ProposerError(f"a proposal process failed:\n{rest[0]}")
        self._asked -= 1
        failures, proposal = rest
        for _ in range(failures):
            self._failed()
        if proposal is None:
            self._rest = True
        else:
            self._ready.append(self._made(*proposal))
        return True

    def _drain(self) -> None:
        """Handle every answer already queued, without waiting."""
        while self._receive(block=False):
            pass

    def _check_alive(self) -> None:
        dead = [p for p in self._procs if p.exitcode is not None]
        if dead:
            raise ProposerError(
                f"proposal process {dead[0].name} died (exit code {dead[0].exitcode}); the run's "
                "trials are kept: `basin resume` goes on (with sampler.proposers: 0 the proposals "
                "are made in the run's own process)"
            )

    def take(self) -> T | None:
        """The next proposal; waits while one is being made. None when there is none to come
        until a trial is told (the budget is spent for now)."""
        self._drain()
        self._check_alive()  # a dead process may hold a request: its trial is found silent later
        while not self._ready and (self._asked or not self._rest):
            self._fill()
            if not self._receive(block=True):
                self._check_alive()
        proposal = self._ready.pop(0) if self._ready else None
        self._fill()
        return proposal

    def told(self) -> None:
        self._rest = False
        self._drain()
        self._fill()

    def pending(self) -> list[T]:
        return list(self._ready)

    def spent(self) -> bool:
        self._drain()
        return not self._ready and not self._asked and self._rest

    def close(self) -> None:
        """Stop the processes; proposals they were making are finished and kept (see `pending`)."""
        self._stop.set()
        for _ in self._procs:
            self._requests.put(None)
        while any(p.is_alive() for p in self._procs) or self._asked:
            try:
                if not self._receive(block=True) and not any(p.is_alive() for p in self._procs):
                    break
            except ProposerError:
                break
        for proc in self._procs:
            proc.join(timeout=WAIT_S)
            if proc.is_alive():
                proc.kill()


def _serve(
    setup: Any, runner: dict[str, Any], parent: int, requests: Any, results: Any, stop: Any
) -> None:
    """A proposal process: one proposal per request, until `stop`, or the run's end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle: it closes us
    try:
        import optuna

        from search import compat, records
        from search.budget import Budget, claim
        from search.loop import propose_trial
        from search.setup import own_sampler

        cfg = setup.config
        with compat.quiet_optuna():
            storage = records.open_storage(setup.folder, cfg.study.storage, cfg.study.heartbeat_s)
            with records.study_lock(setup.folder, cfg.study.storage, cfg.study.name):
                study = optuna.load_study(study_name=cfg.study.name, storage=storage)
                existing = len(study.get_trials(deepcopy=False))
                study.sampler = own_sampler(cfg.sampler, study, existing)
            setup = dataclasses.replace(setup, study=study)
            budget = Budget(study, cfg.budget)
            while (request := _next(requests, parent)) is not None and not stop.is_set():
                if not request:
                    continue
                failures, proposal = 0, None
                while trial := claim(study, setup.folder, runner, budget.left, cfg.study.storage):
                    if (flight := propose_trial(setup, trial)) is not None:
                        proposal = (trial._trial_id, flight.params, flight.recipe)
                        break
                    failures += 1
                results.put(("made", failures, proposal))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def _next(requests: Any, parent: int) -> bool | None:
    """The next request: True (propose), None (stop: asked to, or the run is gone), False (none
    yet)."""
    try:
        return requests.get(timeout=WAIT_S)
    except queue.Empty:
        return None if os.getppid() != parent else False
