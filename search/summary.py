"""Short terminal summaries of a study: after a run, and for `basin status`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search import attrs, fidelity
from search.records import redact


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _method(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """The trial's merge method: a param when several are searched, else the space's only one."""
    if "method" in trial.params:
        return trial.params["method"]
    if attrs.RECIPE in trial.user_attrs:  # a user's recipe outside the space
        return str(trial.user_attrs[attrs.RECIPE].get("method", "?"))
    methods = study.user_attrs.get(attrs.CONFIG, {}).get("space", {}).get("methods", [])
    return methods[0] if len(methods) == 1 else "?"


def _describe(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """One trial with its values named: each objective's, or the weighted score."""
    name = trial.user_attrs.get(attrs.BASELINE) or _method(study, trial)
    keys = study.user_attrs.get(attrs.OBJECTIVE_KEYS) or []
    # one objective: the weighted score (a minimized metric enters with its sign), not a metric
    pareto = len(trial.values) > 1 and len(keys) == len(trial.values)
    labels = keys if pareto else ["score"] * len(trial.values)
    values = ", ".join(f"{k} {v:.4f}" for k, v in zip(labels, trial.values))
    return f"trial {trial.number} ({name}): {values}"


def print_summary(folder: Path, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if attrs.failed(t)]
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    searched = _duration(float(study.user_attrs.get("elapsed_s", 0.0)))
    print(
        f"\nstudy '{study.study_name}' in {folder}: {len(complete)} complete, "
        f"{f'{pruned} pruned, ' if pruned else ''}{len(failed)} failed, {searched} searched"
        f"{_not_run(trials)}"
    )
    if pruned and (line := items_line(study, trials)) is not None:
        print(line)
    if (line := driver_line(trials)) is not None:
        print(line)
    if not complete:
        return
    baselines = [t for t in complete if t.user_attrs.get(attrs.BASELINE)]
    if len(study.directions) == 1:
        print(f"best  {_describe(study, study.best_trial)}")
        if baselines:
            top = max(baselines, key=lambda t: t.values[0])
            print(f"best baseline  {_describe(study, top)}")
    else:
        print(f"Pareto front ({len(study.best_trials)} trials):")
        for t in sorted(study.best_trials, key=lambda t: t.number):
            print(f"  {_describe(study, t)}")


def _not_run(trials: list[optuna.trial.FrozenTrial]) -> str:
    """Proposals made ahead that no worker took and whose retry still waits (once it ran, they are
    history)."""
    waiting = {t.user_attrs.get(attrs.RETRY_OF) for t in trials if t.state == TrialState.WAITING}
    n = sum(
        t.state == TrialState.FAIL and bool(t.user_attrs.get(attrs.NOT_RUN)) and t.number in waiting
        for t in trials
    )
    if not n:
        return ""
    return f"; {n} proposed ahead but not run (queued again: `basin resume` runs them first)"


def items_line(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """Items scored against what the same finished trials would have cost on every search item."""
    sizes = study.user_attrs.get(attrs.SEARCH_ITEMS)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not sizes or not finished:
        return None
    spent, _ = fidelity.spent(trials)
    full = len(finished) * sum(sizes.values())
    return (
        f"items scored {spent:,}; on every search item these {len(finished)} trials would have "
        f"scored {full:,} ({spent / full:.0%} of it spent)"
    )


IDLE_NOTE = 0.05  # a share of the workers' time spent free above which the summary says why
RECENT = 100  # the candidates of the latest window a long study also reports


def driver_line(trials: list[optuna.trial.FrozenTrial]) -> str | None:
    """How much of their time the workers stood free between candidates, and of that how much they
    waited for proposals (attrs.WORKER_TIME); above IDLE_NOTE, why and what to do."""
    timed = sorted((t for t in trials if attrs.WORKER_TIME in t.user_attrs), key=lambda t: t.number)
    if not timed:
        return None

    def shares(ts: list[optuna.trial.FrozenTrial]) -> tuple[float, float]:
        times = [t.user_attrs[attrs.WORKER_TIME] for t in ts]
        total = sum(x["busy_s"] + x["free_s"] for x in times) or 1.0
        return (
            sum(x["free_s"] for x in times) / total,
            sum(x["free_for_proposal_s"] for x in times) / total,
        )

    free, waiting = shares(timed)
    line = (
        f"workers stood free {free:.1%} of their time between candidates ({waiting:.1%} waiting "
        "for proposals)"
    )
    if len(timed) >= 2 * RECENT:
        free, waiting = shares(timed[-RECENT:])
        line += f"; over the last {RECENT}: {free:.1%} ({waiting:.1%})"
    if free <= IDLE_NOTE:
        return line
    if timed[-1].user_attrs[attrs.WORKER_TIME].get("in_order"):
        return line + (
            "; proposals are made in trial order (one worker, or sampler.reproducible), each once "
            "the result before it is told, so that a seed repeats the study"
        )
    if waiting >= free - waiting:  # the larger part names the way out
        return line + (
            "; the sampler proposes slower than the workers finish: `sampler.proposers: N` makes "
            "proposals in N processes of their own, or a cheaper sampler (README, \"The sampler's "
            'cost")'
        )
    return line + (
        "; what they wait for is mostly the run's own work between candidates (telling results, "
        "writing records): candidates this short keep one run's process busy (README, \"The "
        "sampler's cost\")"
    )


def rungs_line(trials: list[optuna.trial.FrozenTrial], rungs: Sequence[int]) -> str | None:
    """Multi-fidelity: per rung (items per task, fidelity.study_rungs), the candidates scored there
    and those stopped there."""
    if not rungs:
        return None
    items = [*rungs, None]
    scored = [
        t for t in trials if attrs.RUNG in t.user_attrs and not t.user_attrs.get(attrs.BASELINE)
    ]
    if not scored:
        return None
    parts = []
    for i, n in enumerate(items):
        reached = sum(t.user_attrs[attrs.RUNG] >= i for t in scored)
        stopped = sum(
            t.user_attrs[attrs.RUNG] == i and t.state == TrialState.PRUNED for t in scored
        )
        name = f"{n} items/task" if n is not None else "all items"
        parts.append(
            f"{name}: {reached} scored" + (f", {stopped} stopped" if n is not None else "")
        )
    return "rungs (searched candidates): " + "; ".join(parts)


def print_status(folder: Path) -> None:
    from search.folder import load_study_folder

    config, study = load_study_folder(folder)
    trials = study.get_trials(deepcopy=False)
    counts = {
        state: sum(t.state == state for t in trials)
        for state in (
            TrialState.COMPLETE,
            TrialState.PRUNED,
            TrialState.FAIL,
            TrialState.RUNNING,
            TrialState.WAITING,
        )
    }
    budget = config.budget.n_trials
    storage = redact(config.study.storage) if config.study.storage else f"{folder}/journal.log"
    print(f"study '{config.study.name}' ({config.objectives.mode}, storage {storage})")
    rungs = fidelity.study_rungs(config, study)
    pruned = f" (pruned {counts[TrialState.PRUNED]})" if rungs else ""
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    of_budget = f" of {budget}" if budget else ""
    failed = sum(attrs.failed(t) for t in trials)
    print(
        f"  done {done}{of_budget}{pruned}, failed {failed}, "
        f"running {counts[TrialState.RUNNING]}, queued {counts[TrialState.WAITING]}"
        f"{_not_run(trials)}"
    )
    if (line := items_line(study, trials)) is not None:
        print(f"  {line}")
    if (line := rungs_line(trials, rungs)) is not None:
        print(f"  {line}")
    if (line := driver_line(trials)) is not None:
        print(f"  {line}")
    if config.budget.items is not None:
        spent = fidelity.spent(trials)[0]
        print(f"  items scored {spent} of the budget's {config.budget.items}")
    if config.budget.timeout is not None:
        print(f"  time budget {_duration(config.budget.timeout)}")
    print(f"  elapsed {_duration(float(study.user_attrs.get('elapsed_s', 0.0)))}")
    if counts[TrialState.COMPLETE]:
        if len(study.directions) == 1:
            print(f"  best {_describe(study, study.best_trial)}")
        else:
            print(f"  Pareto front: {len(study.best_trials)} trials")
    last_errors = [t for t in trials if attrs.failed(t)][-3:]
    for t in last_errors:
        print(f"  failed trial {t.number}: {t.user_attrs.get('error', 'no reason recorded')}")
