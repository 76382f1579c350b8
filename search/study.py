"""The study: create or load it, enqueue baselines, keep one candidate in flight per worker.

    setup -> [ask -> suggest -> dispatch] ... wait for any -> tell -> record -> dispatch the next

There is no generation barrier: as soon as a worker finishes, its result is told and it gets
the next candidate.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from merging.process import pid_alive
from merging.recipe import recipe_to_dict
from search import records
from search.config import ConfigError, SamplerSection, StudyConfig, config_from_dict, config_to_dict
from search.objectives import objective_values, resolve_directions, study_directions
from search.space import SearchSpace, baseline_params, build_space, recipe_from_params, suggest
from search.workers import WorkerPool, WorkerSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
POLL_S = 1.0
OWNERLESS_GRACE_S = 5.0  # a live runner records itself on a trial milliseconds after asking for it


@dataclass
class Flight:
    trial: optuna.trial.Trial
    worker: int
    params: dict[str, Any]
    recipe: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)


@dataclass
class StudySetup:
    config: StudyConfig
    folder: Path
    study: optuna.Study
    space: SearchSpace
    directions: list[str]
    spec: WorkerSpec


def make_sampler(cfg: SamplerSection, n_objectives: int, offset: int = 0) -> optuna.samplers.BaseSampler:
    seed = None if cfg.seed is None else cfg.seed + offset  # a resumed run must not replay its draws
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True,
                                          group=True, constant_liar=True)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.n_startup_trials,
                                            warn_independent_sampling=False)
    if cfg.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def _absolute(path: str) -> str:
    """Local paths made absolute (workers may run elsewhere); hub ids unchanged."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def setup_study(config: StudyConfig, *, resume: bool) -> StudySetup:
    """Everything before the first candidate: checks, folder, storage, study, baselines.

    Every check that can fail on bad input runs before the study folder is created, and a folder
    this call created is removed again if setup fails, so a mistake leaves nothing half-made.
    """
    folder = config.study.folder
    created = not folder.exists()
    try:
        return _setup(config, folder, resume)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _setup(config: StudyConfig, folder: Path, resume: bool) -> StudySetup:
    from evaluators import EvaluatorError, HarnessEvaluator
    from merging import Checkpoint, check_compatible

    snapshot = config_to_dict(config)
    if (folder / records.CONFIG_FILE).is_file():
        previous = records.read_config_snapshot(folder)
        if _search_part(previous) != _search_part(snapshot):
            raise ConfigError(f"{folder} holds a study with a different config; resume it as it is with "
                              f"`basin resume {folder}`, or choose another study.name / study.output_dir")
    elif resume:
        raise ConfigError(f"{folder} holds no study to resume; start one with `basin run CONFIG`")
    spec = worker_spec(config)
    ckpts = {p: Checkpoint(p, allow_pickle=spec.allow_pickle) for p in (spec.base, *spec.finetunes)}
    check_compatible(ckpts)  # headers only: incompatible models fail here, before any worker starts
    ev = config.evaluator
    try:  # loads the task definitions only: unknown tasks and metrics fail here, before any model
        probe = HarnessEvaluator(ev.tasks, include_path=list(spec.include_path) or None, split=ev.split, limit=1,
                                 builtin_tasks=ev.builtin_tasks, metrics=[o.key for o in config.objectives.items])
    except EvaluatorError as exc:
        raise ConfigError(f"evaluator: {exc}") from None
    directions = resolve_directions(config.objectives, probe.higher_is_better)
    space = study_space(config, spec)
    with records.study_lock(folder):  # runners starting at once set the study up one after the other
        try:
            storage = records.open_storage(folder, config.study.storage)
            existing = _count_trials(storage, config.study.name)
            study = optuna.create_study(
                study_name=config.study.name, storage=storage, load_if_exists=True,
                directions=study_directions(config.objectives, directions),
                sampler=make_sampler(config.sampler, len(directions), offset=existing),
            )
        except Exception as exc:
            raise _storage_error(config.study.storage or str(folder / records.JOURNAL_FILE), exc) from None
        records.write_config_snapshot(folder, snapshot)
        if "directions" not in study.user_attrs:
            study.set_user_attr("directions", directions)
            study.set_user_attr("objective_keys", [o.key for o in config.objectives.items])
        # Until the flag is set, not `existing == 0`: a run killed halfway through enqueuing must
        # not lose the remaining baselines (skip_if_exists leaves out those already queued or run).
        if config.baselines and not study.user_attrs.get("baselines_enqueued"):
            for name, params in baseline_params(space):
                study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
            study.set_user_attr("baselines_enqueued", True)
        requeue_stale(study)
        sync_records(study, folder, space)
    return StudySetup(config, folder, study, space, directions, spec)


def _storage_error(url: str, exc: Exception) -> ConfigError:
    return ConfigError(
        f"study.storage {records.redact(url)} cannot be opened ({type(exc).__name__}: {records.redact(str(exc))[:300]}); "
        "check the URL, that the server runs and its driver is installed, or leave study.storage "
        "empty to use a journal file in the study folder"
    )


def _include_paths(config: StudyConfig) -> list[str]:
    include = config.evaluator.include_path
    return [include] if isinstance(include, str) else list(include or [])


def worker_spec(config: StudyConfig) -> WorkerSpec:
    """What every worker of this study builds: models, evaluator, precomputations."""
    ev = config.evaluator
    return WorkerSpec(
        base=_absolute(config.models.base), finetunes=tuple(_absolute(p) for p in config.models.finetunes),
        dtype=config.models.dtype, device=config.models.device, allow_pickle=config.models.allow_pickle,
        trust_remote_code=config.models.trust_remote_code, tasks=tuple(ev.tasks),
        include_path=tuple(_absolute(p) for p in _include_paths(config)), batch_size=ev.batch_size,
        limit=ev.limit, sample_seed=ev.sample_seed, num_fewshot=ev.num_fewshot,
        builtin_tasks=ev.builtin_tasks, methods=tuple(config.space.methods), seed=config.space.seed,
        kernels=config.models.kernels,
    )


def study_space(config: StudyConfig, spec: WorkerSpec) -> SearchSpace:
    """The study's search space, over the absolute model paths the workers use."""
    from merging.checkpoint import resolve_model_dir

    space = build_space(config, resolve_model_dir(config.models.base))
    return SearchSpace(**{**space.__dict__, "base": spec.base, "model_paths": spec.finetunes})


def trial_recipe(config: StudyConfig, trial: optuna.trial.FrozenTrial):
    """The MergeRecipe a finished trial scored, rebuilt from its stored params."""
    return recipe_from_params(trial.params, study_space(config, worker_spec(config)))


def _search_part(snapshot: dict) -> dict:
    """The parts of a config that define the study (budget, workers and merge kernels may change on resume)."""
    part = {k: v for k, v in snapshot.items() if k not in ("budget", "workers")}
    part["study"] = {k: v for k, v in part.get("study", {}).items() if k != "output_dir"}
    part["models"] = {k: v for k, v in part.get("models", {}).items() if k != "kernels"}
    return part


def _count_trials(storage: Any, name: str) -> int:
    try:
        return len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        return 0


def requeue_stale(study: optuna.Study, grace_s: float = OWNERLESS_GRACE_S) -> list[int]:
    """Trials left RUNNING by a dead run on this host: mark them failed and queue their params again.

    A trial without a runner attr comes from a run that died between ask and recording itself, or
    from a live runner recording itself right now: wait until such trials are `grace_s` old rather
    than take a live runner's trial. A runner with this process's pid is a former run (a restarted
    container reuses pids), since this run has asked for nothing yet.
    """
    host, me = socket.gethostname(), os.getpid()
    while young := [_age_s(t) for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if not t.user_attrs.get("runner") and _age_s(t) < grace_s]:
        time.sleep(grace_s - min(young) + 0.1)
    stale = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("runner")
        if owner and (owner.get("host") != host or (owner.get("pid") != me and pid_alive(owner.get("pid")))):
            continue
        _fail_and_requeue(study, t, "the run was stopped while this trial ran; its params were queued again")
        stale.append(t.number)
    return stale


def _age_s(t: optuna.trial.FrozenTrial) -> float:
    return (dt.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else math.inf


def _fail_and_requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial | optuna.trial.Trial, reason: str) -> None:
    """Fail a trial that will not finish and queue its params again, as a retry linked by retry_of."""
    t = study._storage.get_trial(trial._trial_id)
    study._storage.set_trial_user_attr(t._trial_id, "error", reason)
    study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    attrs = {k: v for k, v in t.user_attrs.items() if k == "baseline"} | {"retry_of": t.number}
    # fixed_params: an enqueued trial (a baseline, a retry) asked but killed before its params were suggested
    study.enqueue_trial({**t.system_attrs.get("fixed_params", {}), **t.params}, user_attrs=attrs)


def sync_records(study: optuna.Study, folder: Path, space: SearchSpace) -> None:
    """Write the record of any finished trial that has none (a run killed between tell and write)."""
    have = {int(p.stem) for p in (folder / "trials").glob("*.json")}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        if t.number not in have:
            try:
                recipe = recipe_to_dict(recipe_from_params(t.params, space))
            except Exception:  # a proposal that never became a recipe
                recipe = None
            records.write_trial_record(folder, _record(t, recipe, None, t.user_attrs.get("error")))


def _record(t: optuna.trial.FrozenTrial | optuna.trial.Trial, recipe: dict | None, wall: float | None,
            error: str | None, traceback: str | None = None) -> dict[str, Any]:
    attrs = t.user_attrs
    return {
        "number": t.number, "state": "COMPLETE" if error is None else "FAIL", "baseline": attrs.get("baseline"),
        "retry_of": attrs.get("retry_of"), "params": t.params, "recipe": recipe, "metrics": attrs.get("metrics"),
        "values": getattr(t, "values", None), "merge_s": attrs.get("merge_s"), "eval_s": attrs.get("eval_s"),
        "wall_s": wall, "worker": attrs.get("worker"), "error": error, "traceback": traceback,
    }


def run_study(config: StudyConfig, *, resume: bool = False, progress: bool = True,
              worker_cls: type | None = None) -> optuna.Study:
    """Run (or resume) the study until its budget is spent; returns the Optuna study.

    `worker_cls` replaces `CandidateWorker` (same constructor and `run`), e.g. for benchmarks.
    """
    s = setup_study(config, resume=resume)
    pool = WorkerPool(s.spec, config.workers.count, gpus_per_worker=config.workers.gpus_per_worker,
                      address=config.workers.address, worker_cls=worker_cls)
    in_flight: dict[Any, Flight] = {}
    try:
        _loop(s, pool, in_flight, progress)
    finally:
        try:
            for flight in in_flight.values():  # interrupted (Ctrl-C, an error): no candidate is lost
                _fail_and_requeue(s.study, flight.trial, "interrupted before the candidate finished; its params were queued again")
        finally:
            pool.shutdown()
    return s.study


def _budget_left(s: StudySetup, started: float, elapsed_before: float) -> bool:
    """Time left, and fewer finished plus running trials (of every live runner) than n_trials."""
    budget = s.config.budget
    if budget.timeout is not None and elapsed_before + time.perf_counter() - started >= budget.timeout:
        return False
    if budget.n_trials is None:
        return True
    trials = s.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    return sum(t.state == TrialState.COMPLETE or _running_live(t) for t in trials) < budget.n_trials


def _running_live(t: optuna.trial.FrozenTrial) -> bool:
    """A running trial that a live runner will finish (one of a dead runner here is requeued later)."""
    owner = t.user_attrs.get("runner")
    return not owner or owner.get("host") != socket.gethostname() or pid_alive(owner.get("pid"))


def _claim(s: StudySetup, runner: dict[str, Any], budget_left: Callable[[], bool]) -> optuna.trial.Trial | None:
    """Ask for the next trial if the budget allows one, recording its runner.

    Check and ask happen under the study folder's lock, so two runners on one machine cannot both
    take the last trial of the budget. (Runners on several machines sharing one database storage
    lock only their own folders: there the budget can be overshot by up to one trial per worker.)
    """
    with records.study_lock(s.folder):
        if not budget_left():
            return None
        trial = s.study.ask()
        trial.set_user_attr("runner", runner)
        return trial


def _loop(s: StudySetup, pool: WorkerPool, in_flight: dict[Any, Flight], progress: bool) -> None:
    study, cfg = s.study, s.config
    started, elapsed_before = time.perf_counter(), float(study.user_attrs.get("elapsed_s", 0.0))
    n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    bar = tqdm(total=cfg.budget.n_trials, initial=n_done, desc=cfg.study.name, unit="trial", disable=not progress)
    free, recent = list(range(cfg.workers.count))[::-1], []
    runner = {"host": socket.gethostname(), "pid": os.getpid()}
    finished: list = []

    def more() -> bool:
        return _budget_left(s, started, elapsed_before) and not _failing(recent, cfg.workers.count)

    while True:
        # only a worker that is up: one being (re)started would refuse the candidate
        while ((worker := next((w for w in free if pool.available(w)), None)) is not None
               and (trial := _claim(s, runner, more)) is not None):
            try:
                params = suggest(trial, s.space)
                recipe = recipe_to_dict(recipe_from_params(params, s.space))
            except Exception as exc:  # a bad proposal fails its trial, not the study
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
                study.tell(trial, state=TrialState.FAIL)
                continue
            free.remove(worker)
            in_flight[pool.submit(worker, recipe)] = Flight(trial, worker, params, recipe)
        # bookkeeping once the workers are busy again, not between a result and the next dispatch
        study.set_user_attr("elapsed_s", elapsed_before + time.perf_counter() - started)
        if finished:
            bar.set_postfix_str(_postfix(s), refresh=True)
        if not in_flight and not more():  # (with budget left and no worker up yet: wait for one)
            break
        finished = pool.wait(list(in_flight), timeout=POLL_S)
        for ref in finished:
            flight = in_flight.pop(ref)
            free.append(flight.worker)
            ok = _finish(s, flight, pool.result(ref))
            recent.append(ok)
            bar.update(1 if ok else 0)
        _stop_overdue(s, pool, in_flight)
    bar.close()
    if _failing(recent, cfg.workers.count):
        raise RuntimeError(f"stopped: the last {len(recent[-_window(cfg.workers.count):])} candidates all failed; "
                           f"see the error in {s.folder / 'trials'}")


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
    """Tell Optuna and write the trial's record; True when the candidate completed."""
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
                error, values = f"the objective values {values} are not finite (NaN or inf): the candidate is broken", None
    trial.set_user_attr("worker", result.get("worker"))
    if error is None:
        trial.set_user_attr("metrics", result["metrics"])
        trial.set_user_attr("merge_s", result["merge_s"])
        trial.set_user_attr("eval_s", result["eval_s"])
        s.study.tell(trial, values)
    else:
        trial.set_user_attr("error", error)
        s.study.tell(trial, state=TrialState.FAIL)
    record = _record(trial, flight.recipe, wall, error, result.get("traceback"))
    record["values"] = values
    records.write_trial_record(s.folder, record)
    return error is None


def _postfix(s: StudySetup) -> str:
    trials = s.study.get_trials(deepcopy=False)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return f"failed={failed}"
    if len(s.directions) == 1 or s.config.objectives.mode == "single":
        return f"failed={failed} best={s.study.best_value:.4f}"
    return f"failed={failed} front={len(s.study.best_trials)}"


def load_study_folder(folder: str | Path) -> tuple[StudyConfig, optuna.Study]:
    """The config and Optuna study of an existing study folder."""
    folder = Path(folder)
    try:
        snapshot = records.read_config_snapshot(folder)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    config = config_from_dict(snapshot, str(folder / records.CONFIG_FILE))
    try:
        storage = records.open_storage(folder, config.study.storage)
        return config, optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        raise ConfigError(f"{folder}: its storage holds no study named '{config.study.name}'; "
                          f"was it moved? start it again with `basin run CONFIG`") from None
    except Exception as exc:  # status, pareto, export: the same redacted message as run
        raise _storage_error(config.study.storage or str(folder / records.JOURNAL_FILE), exc) from None
