"""The study loop: keep one candidate in flight per worker, tell Optuna each result as it arrives.

    setup -> [take a proposal -> dispatch] ... wait for any -> tell -> record -> dispatch the next
             (proposals: claim -> suggest, made ahead on a thread of their own: search/proposals.py)

There is no generation barrier: as soon as a worker finishes, it gets the candidate proposed while
it worked, and its result is told. With multi-fidelity (search/fidelity.py) a candidate's result at
a rung is either the last (told), a stop (told PRUNED), or a promotion: the same worker, still
holding the merged weights, scores the next rung's items.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from merging.recipe import recipe_to_dict
from search import attrs, compat, fidelity, records
from search.budget import Budget, claim
from search.config import StudyConfig
from search.console import RAY_LOG, others_to
from search.objectives import checked_values
from search.pool import Pool, PoolFactory, WorkerStartError, ray_pool
from search.proposals import Ahead, InOrder
from search.proposers import Processes
from search.recovery import Heartbeat, fail_and_requeue, queue_again
from search.result import WorkerResult
from search.setup import StudySetup, setup_study
from search.space import recipe_from_params, suggest
from search.user_recipes import fixed_recipe

POLL_S = 1.0
# the time searched is stored, and the bar's summary of the study computed, at most this often
SAVE_S = 1.0


@dataclass
class Flight:
    """A candidate in flight: its trial, the worker that holds it, and what it has cost so far."""

    trial: optuna.trial.Trial
    params: dict[str, Any]
    recipe: dict[str, Any]
    worker: int = -1  # set when it is dispatched
    started: float = field(default_factory=time.perf_counter)
    rung: int = 0  # multi-fidelity: the rung being scored
    merge_s: float = 0.0  # over the rungs scored before this one
    eval_s: float = 0.0
    pruned: bool = False
    overdue: bool = False  # stopped at workers.candidate_timeout; its result arrives as an error
    # how long its worker stood free before it was dispatched, and of that, waiting for a proposal
    # (the sampler's time, not the loop's); 0 for a worker's first candidate of the run
    free_s: float = 0.0
    free_for_proposal_s: float = 0.0
    arrived: float = 0.0  # when its worker finished its last result (WorkerResult.ended)

    def promote(self, result: WorkerResult) -> None:
        """On to the next rung, on the same worker; this rung's time is kept."""
        self.rung += 1
        self.merge_s += result.merge_s
        self.eval_s += result.eval_s


# where the loop's candidates come from: search/proposals.py, search/proposers.py
Proposals = InOrder[Flight] | Ahead[Flight] | Processes[Flight]


def run_study(
    config: StudyConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    worker_cls: type | None = None,
    pool: PoolFactory | None = None,
) -> optuna.Study:
    """Run (or resume) the study until its budget is spent; returns the Optuna study.

    `worker_cls` replaces `CandidateWorker` (same constructor and `run`), e.g. for benchmarks;
    `pool` builds the pool the workers run in (default: Ray actors, search.pool.ray_pool).
    """
    compat.check_versions()
    with compat.quiet_optuna():
        s = setup_study(config, resume=resume)
        if not Budget(s.study, config.budget).left():
            return s.study  # nothing to run: no worker is started
        with others_to(s.folder / RAY_LOG) as out:  # Ray's messages: kept, not on the terminal
            return _run(s, pool or ray_pool, worker_cls, progress, out)


def _run(
    s: StudySetup, pool: PoolFactory, worker_cls: type | None, progress: bool, out: TextIO
) -> optuna.Study:
    """Start the pool, run the loop, and leave nothing in flight, however it ends."""
    workers = pool(s.spec, s.config.workers, worker_cls)
    in_flight: dict[Any, Flight] = {}
    proposals: list[Proposals] = []  # the loop's, once it has started
    budget = Budget(s.study, s.config.budget)
    unstarted, ended = None, False
    try:
        with _sigterm_as_interrupt():  # after the pool: Ray sets a handler of its own
            _loop(s, workers, budget, in_flight, proposals, progress, out)
        ended = True
    except WorkerStartError as exc:
        unstarted = exc
    finally:
        try:
            for made in proposals:
                made.close()  # a proposal being made is finished, and queued again below
            # interrupted (Ctrl-C, an error): no candidate is lost; at the end of the budget, a
            # candidate proposed ahead that no worker took runs first when the study is resumed
            for flight in in_flight.values():
                fail_and_requeue(
                    s.study,
                    flight.trial,
                    "interrupted before the candidate finished; its params were queued again",
                )
            for flight in (f for made in proposals for f in made.pending()):
                flight.trial.set_user_attr(attrs.NOT_RUN, True)
                fail_and_requeue(
                    s.study,
                    flight.trial,
                    "proposed ahead, and the budget ended before a worker took it; its params "
                    "were queued again"
                    if ended
                    else "interrupted before a worker took the candidate; its params were queued "
                    "again",
                )
            s.study.set_user_attr(attrs.ELAPSED_S, budget.elapsed_s())
        finally:
            workers.shutdown()
    if unstarted is not None:
        raise WorkerStartError(f"{unstarted}{_discard(s)}")
    return s.study


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C, so that the same clean-up runs."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread, whatever waits there (a Ray call may turn
    the exception into a plain KeyboardInterrupt: the signal's arrival is what counts)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    received = []

    def terminate(signum: int, frame: object) -> None:
        received.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        if received:
            raise Terminated() from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _discard(s: StudySetup) -> str:
    """After a failure before any candidate ran: remove the study folder this run made (what it
    held: the queued baselines), or say how the study goes on."""
    ran = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if s.created and not ran and not s.config.study.storage:
        shutil.rmtree(s.folder, ignore_errors=True)
        return f"; nothing was kept ({s.folder} was removed)"
    return f"; the study is kept: `basin resume {s.folder}` continues it once the cause is fixed"


def _loop(
    s: StudySetup,
    pool: Pool,
    budget: Budget,
    in_flight: dict[Any, Flight],
    made: list[Proposals],
    progress: bool,
    out: TextIO,
) -> None:
    study, cfg, rungs = s.study, s.config, s.rungs
    bar, by_items = _progress(s, budget, progress, out)
    free, recent, finished = list(range(cfg.workers.count))[::-1], [], []
    saved = shown = -math.inf  # when the time searched was last stored; the bar's postfix made
    arrived: list[tuple[Flight, WorkerResult]] = []
    in_order = cfg.sampler.reproducible
    runner = {"host": socket.gethostname(), "pid": os.getpid()}
    heartbeat = Heartbeat(
        study,
        cfg.study.heartbeat_s,
        lambda: records.study_lock(s.folder, cfg.study.storage, cfg.study.name),
    )

    def more() -> bool:
        return budget.left() and not _failing(recent, cfg.workers.count)

    def propose() -> Flight | None:
        """The next candidate; None when the budget allows none."""
        while (trial := claim(study, s.folder, runner, more, cfg.study.storage)) is not None:
            if (flight := propose_trial(s, trial)) is not None:
                return flight
            recent.append(False)  # a proposal that fails every time must end the study
        return None

    # made while the workers work, one ahead per worker (search/proposals.py); reproducible, or
    # one worker: at its place in the trial order (each proposal made knowing every result before
    # it, as a sequential study: a seed repeats it, and a slow evaluation makes the ask negligible)
    sequential = in_order or cfg.workers.count == 1
    proposals: Proposals
    if sequential:
        proposals = InOrder(propose, cfg.workers.count)
    elif cfg.sampler.proposers:  # processes of their own: the loop keeps its core
        proposals = Processes(
            s,
            runner,
            cfg.sampler.proposers,
            len(free),
            made=lambda trial_id, params, recipe: Flight(
                optuna.trial.Trial(study, trial_id), params, recipe
            ),
            failed=lambda: recent.append(False),
        )
    else:
        proposals = Ahead(propose, len(free))
    made.append(proposals)
    freed: dict[int, tuple[float, float]] = {}  # worker -> (freed at, `taking` then)
    taking = 0.0  # seconds the loop has waited in proposals.take()
    while True:
        # only a worker that is up: one being (re)started would refuse the candidate
        while (
            worker := next((w for w in free if pool.available(w)), None)
        ) is not None and not budget.ended():
            asked = time.perf_counter()
            flight = proposals.take()
            flight_at = time.perf_counter()
            taking += flight_at - asked
            if flight is None:
                break
            since, taken = freed.pop(worker, (flight_at, taking))
            flight.free_s, flight.free_for_proposal_s = flight_at - since, taking - taken
            flight.worker, flight.started = worker, flight_at
            free.remove(worker)
            first = rungs.first if rungs else None
            in_flight[pool.submit(worker, flight.recipe, items=first, rung=bool(rungs))] = flight
        # bookkeeping once the workers are busy again, not between a result and the next dispatch
        heartbeat.beat([f.trial for f in [*in_flight.values(), *proposals.pending()]])
        if time.perf_counter() - saved > SAVE_S:  # (an fsync: not at every result)
            study.set_user_attr(attrs.ELAPSED_S, budget.elapsed_s())
            saved = time.perf_counter()
        if finished and not bar.disable and time.perf_counter() - shown > SAVE_S:
            bar.set_postfix_str(_postfix(s), refresh=True)  # (a Pareto front costs O(n^2))
            shown = time.perf_counter()
        if not in_flight and (proposals.spent() or budget.ended()):
            if not more():
                break
            proposals.told()  # (another runner's trial failed, freeing budget: ask again)
        finished = pool.wait(list(in_flight), timeout=_wait_s(s, in_flight))
        arrived += [(in_flight.pop(ref), pool.result(ref)) for ref in finished]
        now, wall = time.perf_counter(), time.time()
        for flight, result in arrived[len(arrived) - len(finished) :]:
            # when the worker finished, by its clock (another node's may differ a little: bounded)
            flight.arrived = now - min(max(0.0, wall - result.ended), now - flight.started)
        for flight, result in _taken(arrived, in_flight, in_order):
            if result.worker_lost and not flight.overdue:
                _say_lost(s, flight, result, out)
            values, error = judge(s, flight, result)
            if rungs and result.rung is not None:
                fidelity.note_items(flight.trial, flight.rung, result.rung)
            if rungs and error is None and not rungs.last(flight.rung):
                if rungs.promote(study, flight.trial, flight.rung, values, result.rung):
                    flight.promote(result)  # the worker still holds the candidate's weights
                    flight.trial.set_user_attr(attrs.PROMOTED_TO, rungs.items[flight.rung])
                    in_flight[pool.more(flight.worker, rungs.items[flight.rung])] = flight
                    continue
                flight.pruned = True
            free.append(flight.worker)
            freed[flight.worker] = (flight.arrived, taking)
            ok = finish(s, flight, result, values, error)
            recent.append(ok)
            if ok:
                bar.update(fidelity.trial_items(flight.trial) if by_items else 1)
            proposals.told()
        _stop_overdue(s, pool, in_flight)
    bar.close()
    if _failing(recent, cfg.workers.count):
        raise StudyStopped(_failure_summary(s, _window(cfg.workers.count)))


def _taken(
    arrived: list[tuple[Flight, WorkerResult]], in_flight: dict[Any, Flight], in_order: bool
) -> Iterator[tuple[Flight, WorkerResult]]:
    """The results to handle now, each taken off `arrived`: all, as they came; or, in trial order,
    those of trials before every trial still in flight (a promoted trial is in flight again)."""
    while arrived:
        if in_order:
            arrived.sort(key=lambda pair: pair[0].trial.number)
            running = [f.trial.number for f in in_flight.values()]
            if running and arrived[0][0].trial.number > min(running):
                return
        yield arrived.pop(0)


def _progress(s: StudySetup, budget: Budget, progress: bool, out: TextIO) -> tuple[tqdm, bool]:
    """The bar, and whether it counts items: it counts what ends the study, trials or, with a
    budget of items alone, items."""
    cfg = s.config.budget
    by_items = cfg.n_trials is None and cfg.items is not None
    bar = tqdm(
        total=cfg.items if by_items else cfg.n_trials,
        initial=budget.items_spent() if by_items else budget.finished(),
        desc=s.config.study.name,
        unit="item" if by_items else "trial",
        disable=not progress,
        file=out,
    )
    return bar, by_items


def _say_lost(s: StudySetup, flight: Flight, result: WorkerResult, out: TextIO) -> None:
    """One line of basin's for a worker that died; Ray's own lines about it are in ray.log."""
    tqdm.write(
        f"basin: worker {flight.worker} died during trial {flight.trial.number} "
        f"({result.error}); Ray's messages are in {s.folder / RAY_LOG}",
        file=out,
    )


class StudyStopped(RuntimeError):
    """The run stopped before its budget for a reason the user must look at (exit 1)."""


def _failure_summary(s: StudySetup, window: int) -> str:
    """Why the last candidates failed: their reasons grouped with counts, and where to read more."""
    failed = s.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))[-window:]
    reasons = Counter(
        (t.user_attrs.get(attrs.ERROR) or "no reason recorded").splitlines()[0][:200]
        for t in failed
    )
    grouped = "\n".join(f"  {n} x {reason}" for reason, n in reasons.most_common())
    return (
        f"stopped: the last {len(failed)} candidates all failed, so the study cannot go on:\n"
        f"{grouped}\nEach failed trial's record, with its traceback, is in {s.folder / 'trials'}; "
        f"fix the cause, then `basin resume {s.folder}`"
    )


def propose_trial(s: StudySetup, trial: optuna.trial.Trial) -> Flight | None:
    """The trial's params and recipe (a user's recipe outside the space: that recipe, no params);
    a proposal that cannot become a recipe fails its trial."""
    try:
        if (fixed := fixed_recipe(trial)) is not None:
            params, recipe = {}, fixed
        else:
            with compat.batched_writes(s.study):  # the params in one append, not one each
                params = suggest(trial, s.space)
            recipe = recipe_to_dict(recipe_from_params(params, s.space))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr(attrs.ERROR, error)
        s.study.tell(trial, state=TrialState.FAIL)
        records.write_trial_record(s.folder, records.trial_record(trial, None, None, error))
        return None
    return Flight(trial, params, recipe)


def judge(
    s: StudySetup, flight: Flight, result: WorkerResult
) -> tuple[list[float] | None, str | None]:
    """The result's objective values, or why the candidate fails its trial (one of the two)."""
    if result.error is not None:
        if flight.trial.user_attrs.get(attrs.TIMED_OUT):
            limit = s.config.workers.candidate_timeout
            return (
                None,
                f"the candidate exceeded workers.candidate_timeout ({limit} s) and was stopped",
            )
        return None, result.error
    try:
        return checked_values(s.config.objectives, s.directions, result.metrics), None
    except (KeyError, TypeError, ValueError) as exc:
        return None, str(exc)


def _window(workers: int) -> int:
    return max(10, 2 * workers)


def _failing(recent: list[bool], workers: int) -> bool:
    window = _window(workers)
    return len(recent) >= window and not any(recent[-window:])


def _wait_s(s: StudySetup, in_flight: dict[Any, Flight]) -> float:
    """How long to wait for a result: POLL_S, or less so that a candidate reaching
    workers.candidate_timeout is stopped at its limit, not up to POLL_S after it."""
    limit = s.config.workers.candidate_timeout
    if limit is None or not in_flight:
        return POLL_S
    running = [f.started for f in in_flight.values() if not f.overdue]
    if not running:
        return POLL_S
    return max(0.01, min(POLL_S, min(running) + limit - time.perf_counter()))


def _stop_overdue(s: StudySetup, pool: Pool, in_flight: dict[Any, Flight]) -> None:
    limit = s.config.workers.candidate_timeout
    if limit is None:
        return
    now = time.perf_counter()
    for flight in in_flight.values():
        if now - flight.started > limit and not flight.overdue:
            flight.overdue = True
            flight.trial.set_user_attr(attrs.TIMED_OUT, True)
            pool.restart(flight.worker)  # its result arrives as an error


def finish(
    s: StudySetup,
    flight: Flight,
    result: WorkerResult,
    values: list[float] | None,
    error: str | None,
) -> bool:
    """Tell Optuna and write the trial's record; True when the candidate completed. A trial
    another runner failed meanwhile (found silent; its retry runs instead) is left as that runner
    left it."""
    try:
        trial = flight.trial
        wall = time.perf_counter() - flight.started
        retry = error is not None and retry_lost(trial, result)
        if retry:
            error += "; its params were queued again, to run once more on a worker that lives"
        state = None
        with compat.batched_writes(s.study):  # in one append, before the trial is told
            trial.set_user_attr(attrs.WORKER, result.worker)
            trial.set_user_attr(
                attrs.WORKER_TIME,
                {
                    "busy_s": round(max(0.0, flight.arrived - flight.started), 4),
                    "free_s": round(flight.free_s, 4),
                    "free_for_proposal_s": round(flight.free_for_proposal_s, 4),
                    "in_order": s.config.sampler.reproducible or s.config.workers.count == 1,
                },
            )
            if result.node:
                trial.set_user_attr(attrs.NODE, result.node)
            if error is None:
                if s.rungs is None:
                    trial.set_user_attr(attrs.ITEMS, sum(s.sizes.values()))
                trial.set_user_attr(attrs.METRICS, result.metrics)
                trial.set_user_attr(attrs.MERGE_S, flight.merge_s + result.merge_s)
                trial.set_user_attr(attrs.EVAL_S, flight.eval_s + result.eval_s)
            else:
                trial.set_user_attr(attrs.ERROR, error)
        if error is None:
            # single objective: told with its last reported value; Pareto: without values
            if flight.pruned:
                state = "PRUNED"
                told = s.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            else:
                told = s.study.tell(trial, values, skip_if_finished=True)
        else:
            told = s.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        if told.state.name != (state or ("COMPLETE" if error is None else "FAIL")):
            return False  # another runner found it silent and failed it (its retry runs instead)
        if retry:
            queue_again(s.study, told, lost_worker_retry=True)
        record = records.trial_record(trial, flight.recipe, wall, error, result.traceback, state)
        record["values"] = values
        records.write_trial_record(s.folder, record)
        return error is None
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def retry_lost(trial: optuna.trial.Trial, result: WorkerResult) -> bool:
    """A candidate whose worker died (a lost node, a killed process) runs once more elsewhere; not
    one stopped for its time limit, nor the retry of one whose worker died (the candidate may be
    the cause)."""
    stored = trial.user_attrs
    return (
        result.worker_lost
        and not stored.get(attrs.TIMED_OUT)
        and not stored.get(attrs.LOST_WORKER_RETRY)
    )


def _postfix(s: StudySetup) -> str:
    trials = s.study.get_trials(deepcopy=False)
    failed = f"failed={sum(attrs.failed(t) for t in trials)}"
    if s.rungs is not None:
        items, pruned = fidelity.spent(trials)
        failed += f" pruned={pruned} items={items}"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return failed
    if len(s.directions) == 1 or s.config.objectives.mode == "single":
        return f"{failed} best={s.study.best_value:.4f}"
    return f"{failed} front={len(s.study.best_trials)}"
