"""Short terminal summaries of a study: after a run, and for `basin status`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.records import redact


def _duration(seconds: float) -> str:
    return str(dt.timedelta(seconds=round(seconds)))


def _describe(trial: optuna.trial.FrozenTrial) -> str:
    name = trial.user_attrs.get("baseline")
    method = trial.params.get("method") or "-"
    values = ", ".join(f"{v:.4f}" for v in trial.values)
    return f"trial {trial.number} ({name or method}): {values}"


def print_summary(folder: Path, study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    print(f"\nstudy '{study.study_name}' in {folder}: {len(complete)} complete, {len(failed)} failed, "
          f"{_duration(float(study.user_attrs.get('elapsed_s', 0.0)))} searched")
    if not complete:
        return
    baselines = [t for t in complete if t.user_attrs.get("baseline")]
    if len(study.directions) == 1:
        print(f"best  {_describe(study.best_trial)}")
        if baselines:
            top = max(baselines, key=lambda t: t.values[0])
            print(f"best baseline  {_describe(top)}")
    else:
        print(f"Pareto front ({len(study.best_trials)} trials):")
        for t in sorted(study.best_trials, key=lambda t: t.number):
            print(f"  {_describe(t)}")


def print_status(folder: Path) -> None:
    from search.setup import load_study_folder

    config, study = load_study_folder(folder)
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)}
    budget = config.budget.n_trials
    storage = redact(config.study.storage) if config.study.storage else f"{folder}/journal.log"
    print(f"study '{config.study.name}' ({config.objectives.mode}, storage {storage})")
    print(f"  done {counts[TrialState.COMPLETE]}{f' of {budget}' if budget else ''}, failed {counts[TrialState.FAIL]}, "
          f"running {counts[TrialState.RUNNING]}, queued {counts[TrialState.WAITING]}")
    print(f"  elapsed {_duration(float(study.user_attrs.get('elapsed_s', 0.0)))}")
    if counts[TrialState.COMPLETE]:
        if len(study.directions) == 1:
            print(f"  best {_describe(study.best_trial)}")
        else:
            print(f"  Pareto front: {len(study.best_trials)} trials")
    last_errors = [t for t in trials if t.state == TrialState.FAIL][-3:]
    for t in last_errors:
        print(f"  failed trial {t.number}: {t.user_attrs.get('error', 'no reason recorded')}")
