"""After a crash: trials a dead run left RUNNING are failed and queued again; missing records are
written.

A trial belongs to the runner recorded in its `runner` user attr (host and pid). On this host a
runner whose pid is gone is dead, and its trials are stale. With a database storage, running
trials also send heartbeats (Optuna's, recorded by `Heartbeat`): one silent past the grace period
is stale whatever host ran it, and any runner of the study fails and requeues it.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from merging.process import pid_alive
from merging.recipe import recipe_to_dict
from search import attrs, compat, records
from search.space import SearchSpace, recipe_from_params

OWNERLESS_GRACE_S = 5.0  # a live runner records itself on a trial milliseconds after asking for it


def requeue_stale(study: optuna.Study, grace_s: float = OWNERLESS_GRACE_S) -> list[int]:
    """Trials left RUNNING by a dead run on this host: mark them failed and queue their params
    again.

    A trial without a runner attr comes from a run that died between ask and recording itself, or
    from a live runner recording itself right now: wait until such trials are `grace_s` old rather
    than take a live runner's trial. A runner with this process's pid is a former run (a restarted
    container reuses pids), since this run has asked for nothing yet.
    """
    requeue_silent(study)
    host, me = socket.gethostname(), os.getpid()
    while young := [
        _age_s(t)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not t.user_attrs.get(attrs.RUNNER) and _age_s(t) < grace_s
    ]:
        time.sleep(grace_s - min(young) + 0.1)
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(attrs.RUNNER)
        if owner and (
            owner.get("host") != host or (owner.get("pid") != me and pid_alive(owner.get("pid")))
        ):
            continue
        fail_and_requeue(
            study, t, "the run was stopped while this trial ran; its params were queued again"
        )
        stale.append(t.number)
    return stale


def requeue_silent(study: optuna.Study, mine: set[int] = frozenset()) -> list[int]:
    """Running trials whose heartbeat went silent past the grace period (a runner that died on any
    host): fail them and queue their params again. Call it under the runners' lock
    (records.study_lock), so two runners cannot requeue one trial twice. `mine`: this runner's
    trials, alive whatever the clock says."""
    stale = [n for n in compat.stale_trials(study) if n not in mine]
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in stale:
            fail_and_requeue(
                study,
                t,
                "its runner sent no heartbeat for longer than the grace period (it died or lost "
                "the database); its params were queued again",
            )
    return stale


class Heartbeat:
    """This runner's running trials send heartbeats; silent trials of other runners are requeued.

    Beats every half `interval` (Optuna's grace period is twice the interval), from the study loop.
    """

    def __init__(self, study: optuna.Study, interval_s: float, lock: Any) -> None:
        self.study, self.interval_s, self.lock, self.last = study, interval_s, lock, -math.inf

    def beat(self, trials: list[optuna.trial.Trial]) -> None:
        now = time.monotonic()
        if now - self.last < self.interval_s / 2:
            return
        self.last = now
        for trial in trials:
            compat.record_heartbeat(self.study, trial)
        if compat.stale_trials(self.study):
            with self.lock():
                requeue_silent(self.study, {t.number for t in trials})


def runner_alive(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a running trial has a live runner that will finish it (a dead runner's is requeued
    later)."""
    owner = t.user_attrs.get(attrs.RUNNER)
    return not owner or owner.get("host") != socket.gethostname() or pid_alive(owner.get("pid"))


def _age_s(t: optuna.trial.FrozenTrial) -> float:
    return (dt.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else math.inf


def fail_and_requeue(
    study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, reason: str
) -> None:
    """Fail a trial that will not finish and queue its params again, as a retry linked by
    retry_of."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
    compat.set_user_attr_of(study, frozen, attrs.ERROR, reason)
    study.tell(frozen.number, state=TrialState.FAIL)
    queue_again(study, frozen)


def queue_again(study: optuna.Study, frozen: optuna.trial.FrozenTrial, **extra: Any) -> None:
    """Queue a failed trial's params again, as a retry linked by retry_of (keeping its baseline
    name, and a user's recipe outside the space)."""
    kept = (attrs.BASELINE, attrs.RECIPE, attrs.OUTSIDE, attrs.RECIPE_FILE)  # a user's recipe too
    extra |= {k: v for k, v in frozen.user_attrs.items() if k in kept} | {
        attrs.RETRY_OF: frozen.number
    }
    # the enqueued params: a baseline or retry asked but killed before its params were suggested
    study.enqueue_trial({**compat.enqueued_params(frozen), **frozen.params}, user_attrs=extra)


def sync_records(study: optuna.Study, folder: Path, space: SearchSpace) -> None:
    """Write the record of any finished trial that has none (a run killed between tell and
    write)."""
    have = {int(p.stem) for p in (folder / "trials").glob("*.json")}
    for t in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    ):
        if t.number not in have:
            try:
                recipe = t.user_attrs.get(attrs.RECIPE) or recipe_to_dict(
                    recipe_from_params(t.params, space)
                )
            except Exception:  # a proposal that never became a recipe
                recipe = None
            record = records.trial_record(
                t,
                recipe,
                None,
                t.user_attrs.get(attrs.ERROR),
                state="PRUNED" if t.state == TrialState.PRUNED else None,
            )
            records.write_trial_record(folder, record)
