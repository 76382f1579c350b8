"""The study loop: keep one candidate in flight per worker, tell Optuna each result as it arrives.

    setup -> [claim -> suggest -> dispatch] ... wait for any -> tell -> record -> dispatch the next

There is no generation barrier: as soon as a worker finishes, its result is told and it gets
the next candidate. With multi-fidelity (search/fidelity.py) a candidate's result at a rung is
either the last (told), a stop (told PRUNED), or a promotion: the same worker, still holding the
merged weights, scores the next rung's items.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from merging.recipe import recipe_to_dict
from search import compat, fidelity, records
from search.budget import Budget, claim
from search.config import StudyConfig
from search.objectives import objective_values
from search.recovery import Heartbeat, fail_and_requeue, queue_again
from search.setup import StudySetup, setup_study
from search.space import recipe_from_params, suggest
from search.workers import WorkerPool

POLL_S = 1.0


@dataclass
class Flight:
    trial: optuna.trial.Trial
    worker: int
    params: dict[str, Any]
    recipe: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    rung: int = 0  # multi-fidelity: the rung being scored
    merge_s: float = 0.0
    eval_s: float = 0.0
    pruned: bool = False


def run_study(
    config: StudyConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    worker_cls: type | None = None,
) -> optuna.Study:
    """Run (or resume) the study until its budget is spent; returns the Optuna study.

    `worker_cls` replaces `CandidateWorker` (same constructor and `run`), e.g. for benchmarks.
    """
    compat.check_versions()
    with compat.quiet_optuna():
        s = setup_study(config, resume=resume)
        pool = WorkerPool(
            s.spec,
            config.workers.count,
            gpus_per_worker=config.workers.gpus_per_worker,
            address=config.workers.address,
            worker_cls=worker_cls,
        )
        in_flight: dict[Any, Flight] = {}
        try:
            _loop(s, pool, in_flight, progress)
        finally:
            try:
                for (
                    flight
                ) in in_flight.values():  # interrupted (Ctrl-C, an error): no candidate is lost
                    fail_and_requeue(
                        s.study,
                        flight.trial,
                        "interrupted before the candidate finished; its params were queued again",
                    )
            finally:
                pool.shutdown()
    return s.study


def _loop(s: StudySetup, pool: WorkerPool, in_flight: dict[Any, Flight], progress: bool) -> None:
    study, cfg = s.study, s.config
    budget = Budget(study, cfg.budget)
    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    bar = tqdm(
        total=cfg.budget.n_trials,
        initial=n_done,
        desc=cfg.study.name,
        unit="trial",
        disable=not progress,
    )
    free, recent, finished = list(range(cfg.workers.count))[::-1], [], []
    runner = {"host": socket.gethostname(), "pid": os.getpid()}
    heartbeat = Heartbeat(
        study,
        cfg.study.heartbeat_s,
        lambda: records.study_lock(s.folder, cfg.study.storage, cfg.study.name),
    )

    def more() -> bool:
        return budget.left() and not _failing(recent, cfg.workers.count)

    while True:
        # only a worker that is up: one being (re)started would refuse the candidate
        while (worker := next((w for w in free if pool.available(w)), None)) is not None and (
            trial := claim(study, s.folder, runner, more, cfg.study.storage)
        ) is not None:
            if (flight := _propose(s, trial, worker)) is None:
                recent.append(
                    False
                )  # a proposal that fails every time must end the study, not loop
                continue
            free.remove(worker)
            in_flight[
                pool.submit(worker, flight.recipe, items=_first_rung(s), rung=s.rungs is not None)
            ] = flight
        # bookkeeping once the workers are busy again, not between a result and the next dispatch
        heartbeat.beat([f.trial for f in in_flight.values()])
        study.set_user_attr("elapsed_s", budget.elapsed_s())
        if finished:
            bar.set_postfix_str(_postfix(s), refresh=True)
        if not in_flight and not more():  # (with budget left and no worker up yet: wait for one)
            break
        finished = pool.wait(list(in_flight), timeout=POLL_S)
        for ref in finished:
            flight, result = in_flight.pop(ref), pool.result(ref)
            if fidelity.go_on(
                s, flight, result
            ):  # on to the next rung, on the worker that holds it
                in_flight[pool.more(flight.worker, s.rungs[flight.rung])] = flight
                continue
            free.append(flight.worker)
            ok = _finish(s, flight, result)
            recent.append(ok)
            bar.update(1 if ok else 0)
        _stop_overdue(s, pool, in_flight)
    bar.close()
    if _failing(recent, cfg.workers.count):
        raise RuntimeError(
            f"stopped: the last {len(recent[-_window(cfg.workers.count) :])} candidates all failed; "
            f"see the error in {s.folder / 'trials'}"
        )


def _propose(s: StudySetup, trial: optuna.trial.Trial, worker: int) -> Flight | None:
    """The trial's params and recipe; a proposal that cannot become a recipe fails its trial, not the study."""
    try:
        params = suggest(trial, s.space)
        recipe = recipe_to_dict(recipe_from_params(params, s.space))
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        trial.set_user_attr("error", error)
        s.study.tell(trial, state=TrialState.FAIL)
        records.write_trial_record(s.folder, records.trial_record(trial, None, None, error))
        return None
    return Flight(trial, worker, params, recipe)


def _first_rung(s: StudySetup) -> int | None:
    return s.rungs[0] if s.rungs is not None else None


def _window(workers: int) -> int:
    return max(10, 2 * workers)


def _failing(recent: list[bool], workers: int) -> bool:
    window = _window(workers)
    return len(recent) >= window and not any(recent[-window:])


def _stop_overdue(s: StudySetup, pool: WorkerPool, in_flight: dict[Any, Flight]) -> None:
    limit = s.config.workers.candidate_timeout
    if limit is None:
        return
    now = time.perf_counter()
    for flight in in_flight.values():
        if now - flight.started > limit and not flight.trial.user_attrs.get("timed_out"):
            flight.trial.set_user_attr("timed_out", True)
            pool.restart(flight.worker)  # its result arrives as an error


def _finish(s: StudySetup, flight: Flight, result: dict[str, Any]) -> bool:
    """Tell Optuna and write the trial's record; True when the candidate completed. A trial another
    runner failed meanwhile (found silent; its retry runs instead) is left as that runner left it."""
    try:
        return _tell(s, flight, result)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def _tell(s: StudySetup, flight: Flight, result: dict[str, Any]) -> bool:
    trial, cfg = flight.trial, s.config
    wall = time.perf_counter() - flight.started
    error = result.get("error")
    if error and flight.trial.user_attrs.get("timed_out"):
        error = f"the candidate exceeded workers.candidate_timeout ({cfg.workers.candidate_timeout} s) and was stopped"
    values = None
    if error is None:
        try:
            values = objective_values(cfg.objectives, s.directions, result["metrics"])
        except (KeyError, TypeError, ValueError) as exc:
            error = str(exc)
        else:  # Optuna would fail such a trial silently while its record said COMPLETE
            if not all(math.isfinite(v) for v in values):
                error, values = (
                    f"the objective values {values} are not finite (NaN or inf): the candidate is broken",
                    None,
                )
    trial.set_user_attr("worker", result.get("worker"))
    if result.get("node"):
        trial.set_user_attr("node", result["node"])  # the Ray node it ran on
    retry = error is not None and _retry_lost(trial, result)
    if retry:
        error += "; its params were queued again, to run once more on a worker that lives"
    state = None
    if error is None:
        fidelity.note_items(trial, result, flight.rung)
        if s.rungs is None:
            trial.set_user_attr("items", sum(s.sizes.values()))
        trial.set_user_attr("metrics", result["metrics"])
        trial.set_user_attr("merge_s", flight.merge_s + result["merge_s"])
        trial.set_user_attr("eval_s", flight.eval_s + result["eval_s"])
        if (
            flight.pruned
        ):  # single objective: told with its last reported value; Pareto: without values
            state = "PRUNED"
            told = s.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            told = s.study.tell(trial, values, skip_if_finished=True)
    else:
        trial.set_user_attr("error", error)
        told = s.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if told.state.name != (state or ("COMPLETE" if error is None else "FAIL")):
        return False  # another runner found it silent and failed it (its retry runs instead): no record
    if retry:
        queue_again(s.study, told, lost_worker_retry=True)
    record = records.trial_record(trial, flight.recipe, wall, error, result.get("traceback"), state)
    record["values"] = values
    records.write_trial_record(s.folder, record)
    return error is None


def _retry_lost(trial: optuna.trial.Trial, result: dict[str, Any]) -> bool:
    """A candidate whose worker died (a lost node, a killed process) runs once more elsewhere; not one
    stopped for its time limit, nor the retry of one whose worker died (the candidate may be the cause)."""
    attrs = trial.user_attrs
    return (
        bool(result.get("worker_lost"))
        and not attrs.get("timed_out")
        and not attrs.get("lost_worker_retry")
    )


def _postfix(s: StudySetup) -> str:
    trials = s.study.get_trials(deepcopy=False)
    failed = f"failed={sum(t.state == TrialState.FAIL for t in trials)}"
    if s.rungs is not None:
        items, pruned = fidelity.spent(trials)
        failed += f" pruned={pruned} items={items}"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return failed
    if len(s.directions) == 1 or s.config.objectives.mode == "single":
        return f"{failed} best={s.study.best_value:.4f}"
    return f"{failed} front={len(s.study.best_trials)}"
