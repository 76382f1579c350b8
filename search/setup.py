"""Everything before the first candidate: checks, the study folder, storage, sampler, baselines.

The way back into an existing study folder (status, pareto, report, export) is search/folder.py.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from search import attrs, records
from search.config import (
    ConfigError,
    ModelsSection,
    SamplerSection,
    StudyConfig,
    config_from_dict,
    config_to_dict,
)
from search.fidelity import Rungs, make_pruner
from search.folder import storage_error, study_space, worker_spec
from search.objectives import resolve_directions, study_directions
from search.outputs import check_writable_under
from search.recovery import requeue_stale, sync_records
from search.sampler_view import SearchedOnly
from search.space import SearchSpace, baseline_params
from search.user_recipes import (
    UserRecipe,
    describe,
    enqueue_user_recipes,
    read_user_recipes,
)
from search.workers import WorkerSpec


@dataclass
class StudySetup:
    config: StudyConfig
    folder: Path
    study: optuna.Study
    space: SearchSpace
    directions: list[str]
    spec: WorkerSpec
    sizes: dict[str, int]  # search items per task (after carve and limit)
    rungs: Rungs | None  # multi-fidelity: the rungs and the promotion rule; None when off
    created: bool = False  # this run made the study folder


def _tpe(cfg: SamplerSection, seed: int | None) -> optuna.samplers.BaseSampler:
    # multivariate, group and constant_liar are "experimental" in Optuna; basin pins its version
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.n_startup_trials,
            multivariate=True,
            group=True,
            constant_liar=True,
        )


_SAMPLERS: dict[str, Callable[[SamplerSection, int | None], optuna.samplers.BaseSampler]] = {
    "tpe": _tpe,
    "cmaes": lambda cfg, seed: optuna.samplers.CmaEsSampler(
        seed=seed, n_startup_trials=cfg.n_startup_trials, warn_independent_sampling=False
    ),
    "nsga2": lambda cfg, seed: optuna.samplers.NSGAIISampler(seed=seed),
    "gp": lambda cfg, seed: optuna.samplers.GPSampler(
        seed=seed, n_startup_trials=cfg.n_startup_trials
    ),
    "random": lambda cfg, seed: optuna.samplers.RandomSampler(seed=seed),
}


def make_sampler(cfg: SamplerSection, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The configured sampler; its seed moved by `offset` (a resumed or second run must not
    replay the draws of the first). It learns from the searched trials only (a user's recipe
    outside the space is hidden from it: search/sampler_view.py)."""
    return SearchedOnly(_SAMPLERS[cfg.name](cfg, None if cfg.seed is None else cfg.seed + offset))


def own_sampler(
    cfg: SamplerSection, study: optuna.Study, existing: int
) -> optuna.samplers.BaseSampler:
    """The sampler of one more run (or proposal process) of a study that holds `existing` trials.

    Every run of the study (first, resumed, one more runner, each proposal process) draws from its
    own stream: runs that open the study while it holds the same trials (the baselines, say) would
    otherwise propose the same params. Call under the runners' lock, so no two get the same number.
    """
    runs = int(study.user_attrs.get(attrs.RUNS, 0))
    study.set_user_attr(attrs.RUNS, runs + 1)
    return make_sampler(cfg, offset=existing + runs * 1_000_003)


def setup_study(config: StudyConfig, *, resume: bool) -> StudySetup:
    """Check the config against its models and tasks, then create or load the study.

    Every check that can fail on bad input runs before the study folder is created, and a folder
    this call created is removed again if setup fails, so a mistake leaves nothing half-made.
    """
    folder = config.study.folder
    check_writable_under(folder, "study.output_dir")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(
            f"study folder {folder} is a file; choose another study.output_dir or study.name"
        )
    created = not folder.exists()
    try:
        config = _check_resumable(config, folder, resume)
        directions, split_sizes, config = check_models_and_tasks(config)
        _check_memory(config)
        sizes = search_sizes(config, split_sizes)
        if config.fidelity_by_default() and Rungs.plan(config, sizes, directions) is None:
            config = config.model_copy(update={"fidelity": None})  # (a search set too small)
        space = study_space(config)
        # a new study's recipes are read before anything is made; a resumed or shared one (another
        # runner of a database study) reads them only if they were never queued
        users = read_user_recipes(config, space) if created and not config.study.storage else None
        if (overlap := config.evaluator.overlap()) is not None:
            print(f"basin: warning: {overlap}", file=sys.stderr)
        # a wrong URL or password fails here, with its message, before any lock
        if config.study.storage:
            reach_storage(config.study.storage)
        # runners starting at once (here or, with a database, anywhere) set the study up one
        # after the other
        with records.study_lock(folder, config.study.storage, config.study.name):
            records.write_carve(folder, config.evaluator, split_sizes)
            study = _open_study(config, folder, directions)
            _store_config(config, folder, study)
            if study.user_attrs.get(attrs.SEARCH_ITEMS) != sizes:
                study.set_user_attr(attrs.SEARCH_ITEMS, sizes)
            if study.user_attrs.get(attrs.SPLIT_SIZES) != split_sizes:
                study.set_user_attr(attrs.SPLIT_SIZES, split_sizes)
            if study.user_attrs.get(attrs.NUM_LAYERS) != space.num_layers:
                study.set_user_attr(attrs.NUM_LAYERS, space.num_layers)
            _enqueue_baselines(config, study, space, users)
            requeue_stale(study)
            sync_records(study, folder, space)
    except BaseException:
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    rungs = Rungs.plan(config, sizes, directions)
    spec = worker_spec(config)
    return StudySetup(config, folder, study, space, directions, spec, sizes, rungs, created)


def _store_config(config: StudyConfig, folder: Path, study: optuna.Study) -> None:
    """Keep the config this run searches with in the study folder, unless its budget runs nothing
    more: a resume must not rewrite what it does not run (status would read "done 10 of 3")."""
    from search.budget import Budget

    snapshot = folder / records.CONFIG_FILE
    budget = Budget(study, config.budget)
    if snapshot.is_file() and not budget.left():
        finished = budget.finished()
        print(
            f"basin: the budget is spent ({finished} finished trials): nothing to run, and "
            f"{snapshot} is left as it was; extend the budget with "
            f"`basin resume {folder} --set budget.n_trials=N`",
            file=sys.stderr,
        )
        return
    records.write_config_snapshot(folder, config_to_dict(config))


def search_sizes(config: StudyConfig, split_sizes: dict[str, int]) -> dict[str, int]:
    """Items per task the search scores: the split, carved, then limited."""
    section = config.evaluator
    carve = section.carve("search")
    out = {}
    for task, n in split_sizes.items():
        n = len(carve.ids(n, task)) if carve is not None else n
        out[task] = min(n, section.limit) if section.limit else n
    return out


def _check_resumable(config: StudyConfig, folder: Path, resume: bool) -> StudyConfig:
    """Refuse to go on with a study under another config; returns the config to run it with:
    multi-fidelity left to basin stays as basin chose it when the study began (older studies, and
    those whose search set was too small, run at full fidelity)."""
    if (folder / records.CONFIG_FILE).is_file():
        # through the config model, so a snapshot from before a new default field compares equal
        begun = config_from_dict(records.read_config_snapshot(folder), str(folder))
        if config.fidelity_by_default():
            config = config.model_copy(update={"fidelity": begun.fidelity})
        previous = config_to_dict(begun)
        if differ := _differing(_search_part(previous), _search_part(config_to_dict(config))):
            raise ConfigError(
                f"{folder} holds a study with a different config (it differs in: "
                f"{', '.join(differ)}); resume it as it is with `basin resume {folder}` (with "
                "--set for the budget and workers), or choose another study.name / "
                "study.output_dir"
            )
    elif resume:
        raise ConfigError(f"{folder} holds no study to resume; start one with `basin run CONFIG`")
    return config


def check_models_and_tasks(
    config: StudyConfig,
) -> tuple[list[str], dict[str, int], StudyConfig]:
    """Read the models' headers, check the task definitions, then load the tasks' data; returns each
    objective's direction, the number of items in each task's search split, and the config as the
    study runs it (multi-fidelity left to basin is turned off for objectives that are not means of
    per-item scores, with a note; asked for, it is refused).

    Incompatible models, unknown tasks, missing splits and unknown metrics fail here, before any
    worker starts, with the messages `basin validate` gives.
    """
    from evaluators import EvaluatorError, build_evaluator

    check_models(config)
    directions = check_tasks(config).directions
    try:
        # the data, one item scored
        probe = build_evaluator(config.evaluator.resolved(), "search", limit=1)
        if config.fidelity is not None:
            try:
                probe.check_item_means([o.key for o in config.objectives.items])
            except EvaluatorError as exc:
                if not config.fidelity_by_default():
                    raise
                print(f"basin: note: multi-fidelity is off by default here: {exc}", file=sys.stderr)
                config = config.model_copy(update={"fidelity": None})
    except EvaluatorError as exc:
        raise ConfigError(f"evaluator: {exc}") from None
    return directions, dict(probe.split_sizes), config


def _check_memory(config: StudyConfig) -> None:
    """Refuse a study whose workers cannot hold their models on the GPU they have.

    Nothing is checked when that GPU's memory is not known.
    """
    from search.memory import check_fits, gpu_capacity, memory_plan

    capacity, source = gpu_capacity(config)
    if capacity is None or unreachable_hub_models(config):
        return
    if (warning := check_fits(memory_plan(config, capacity, source))) is not None:
        print(f"basin: warning: {warning}", file=sys.stderr)


def check_models(config: StudyConfig) -> None:
    """Same architecture, tensor names, shapes and vocabulary, from the models' headers.

    No weights are read.
    """
    from merging import Checkpoint, check_compatible

    models = config.models.resolved()
    check_compatible(
        {
            p: Checkpoint(p, allow_pickle=models.allow_pickle, where=where)
            for p, where in _fields(models)
        }
    )


def _fields(models: ModelsSection) -> list[tuple[str, str]]:
    """Each model's path and the config field that names it, for messages."""
    return [(models.base, "models.base")] + [
        (p, f"models.finetunes[{i}]") for i, p in enumerate(models.finetunes)
    ]


def check_values(config: StudyConfig, progress: bool = True) -> int:
    """Every floating-point tensor of every model is finite: read once, tensor by tensor (NaN or
    inf names the model and the tensor). Returns the number of tensors read."""
    from tqdm.auto import tqdm

    from merging import Checkpoint

    models = config.models.resolved()
    checkpoints = [
        Checkpoint(p, allow_pickle=models.allow_pickle, where=where) for p, where in _fields(models)
    ]
    todo = [(c, n) for c in checkpoints for n in c.names if c.dtype(n).is_floating_point]
    for checkpoint, name in tqdm(todo, desc="checking values", unit="tensor", disable=not progress):
        checkpoint.read(name)  # raises MergeError on NaN or inf
    return len(todo)


def unreachable_hub_models(config: StudyConfig) -> list[str]:
    """The models named by a hub id that this machine can neither find locally nor fetch."""
    from merging import MergeError
    from merging.checkpoint import resolve_model_dir

    models, out = config.models.resolved(), []
    for spec in (models.base, *models.finetunes):
        if not Path(spec).exists():
            try:
                resolve_model_dir(spec)
            except MergeError:
                out.append(spec)
    return out


@dataclass(frozen=True)
class TaskCheck:
    directions: list[str]  # each objective's, from the config or the metric's own
    hub_datasets: dict[str, str]  # task -> the hub dataset its data comes from


def check_tasks(config: StudyConfig) -> TaskCheck:
    """The tasks' definitions, without their data.

    Refuses unknown tasks, a missing split and unknown metrics.
    """
    from evaluators import EvaluatorError

    section, keys = config.evaluator.resolved(), [o.key for o in config.objectives.items]
    try:
        found = section.check_tasks(keys)
    except EvaluatorError as exc:
        raise ConfigError(f"evaluator: {exc}") from None
    directions = resolve_directions(config.objectives, found.higher_is_better.__getitem__)
    return TaskCheck(directions, found.hub_datasets)


def reach_storage(url: str) -> None:
    """Open the storage once: a wrong URL or password fails here with its message, and a fresh
    database gets Optuna's tables, under the database's lock so that runners starting together
    do not create them twice (the second would fail on a type that already exists)."""
    try:
        with records.database_lock(url, "basin-schema"):
            records.open_storage(Path("."), url)
    except Exception as exc:
        raise storage_error(url, exc) from None


def _open_study(config: StudyConfig, folder: Path, directions: list[str]) -> optuna.Study:
    journal = folder / records.JOURNAL_FILE
    had_journal = journal.exists()
    try:
        storage = records.open_storage(folder, config.study.storage, config.study.heartbeat_s)
        existing = _count_trials(storage, config.study.name)
    except ConfigError:  # a damaged journal: its own message, not the storage's
        raise
    except Exception as exc:
        raise storage_error(config.study.storage or str(journal), exc) from None
    # the records only, not their contents: a storage that lost its trials must not start over
    kept = list((folder / "trials").glob("*.json")) if existing == 0 else []
    if kept:
        if not config.study.storage and not had_journal:
            journal.unlink(missing_ok=True)  # opening it made an empty one: leave nothing new
        where = config.study.storage and records.redact(config.study.storage) or str(journal)
        raise ConfigError(
            f"{folder} holds {len(kept)} trial records but the study's storage ({where}) holds "
            f"no trial of study '{config.study.name}' (was it deleted or moved?); running would "
            "start the study over and overwrite those records. Restore the storage and resume, "
            f"or move {folder / 'trials'} away to start afresh"
        )
    try:
        study = optuna.create_study(
            study_name=config.study.name,
            storage=storage,
            load_if_exists=True,
            directions=study_directions(config.objectives, directions),
            sampler=optuna.samplers.RandomSampler(),
            pruner=make_pruner(config.fidelity),
        )
        study.sampler = own_sampler(config.sampler, study, existing)
    except Exception as exc:
        raise storage_error(config.study.storage or str(journal), exc) from None
    if attrs.DIRECTIONS not in study.user_attrs:
        study.set_user_attr(attrs.DIRECTIONS, directions)
        study.set_user_attr(attrs.OBJECTIVE_KEYS, [o.key for o in config.objectives.items])
    if study.metric_names is None:  # so optuna-dashboard and optuna.visualization name the axes
        with warnings.catch_warnings():  # "experimental" in Optuna; basin pins its version
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metric_names(config))
    check_same_study(config, study)
    return study


def metric_names(config: StudyConfig) -> list[str]:
    """What Optuna's tools call the study's values: each objective's key, or the weighted score."""
    keys = [o.key for o in config.objectives.items]
    if config.objectives.mode == "single":
        return keys if len(keys) == 1 else [f"weighted score of {', '.join(keys)}"]
    return keys


def check_same_study(config: StudyConfig, study: optuna.Study) -> None:
    """The first runner stores its config in the study; a runner joining it later (from any machine,
    with its own folder) must search the same space on the same models and tasks."""
    mine = config_to_dict(config)
    stored = study.user_attrs.get(attrs.CONFIG)
    if stored is None:
        study.set_user_attr(attrs.CONFIG, mine)
        return
    theirs, ours = _shared_part(config_to_dict(config_from_dict(stored))), _shared_part(mine)
    if differ := _differing(theirs, ours):
        raise ConfigError(
            f"study '{config.study.name}' in its storage was created with a different config (it "
            f"differs in: {', '.join(differ)}); join it with the config it was created with "
            "(`basin attach` writes it into a study folder here), or choose another study.name"
        )


def _differing(a: dict, b: dict) -> list[str]:
    """The sections (top-level keys) in which two config snapshots differ."""
    return sorted(k for k in {*a, *b} if a.get(k) != b.get(k))


def _shared_part(snapshot: dict) -> dict:
    """What every runner of one study must agree on: its search part, less what is each runner's own
    (where it keeps the study, its device, its evaluation batch size)."""
    part = _search_part(snapshot)
    part["study"] = {k: v for k, v in part["study"].items() if k not in ("storage", "heartbeat_s")}
    part["models"] = {k: v for k, v in part["models"].items() if k != "device"}
    part["evaluator"] = {k: v for k, v in part.get("evaluator", {}).items() if k != "batch_size"}
    return part


def _enqueue_baselines(
    config: StudyConfig,
    study: optuna.Study,
    space: SearchSpace,
    users: list[UserRecipe] | None,
) -> None:
    # Until the flag is set, not "no trials yet": a run killed halfway through enqueuing must
    # not lose the remaining baselines (skip_if_exists leaves out those already queued or run).
    if study.user_attrs.get(attrs.BASELINES_ENQUEUED):
        return
    if users is None:
        users = read_user_recipes(config, space)
    for user in users:
        for note in user.notes:
            print(f"basin: note: {note}", file=sys.stderr)
        print(f"basin: baselines.recipes: {describe(user)}", file=sys.stderr)
    if config.baselines.builtin:
        for name, params in baseline_params(space):
            study.enqueue_trial(params, user_attrs={attrs.BASELINE: name}, skip_if_exists=True)
    enqueue_user_recipes(study, users)
    study.set_user_attr(attrs.BASELINES_ENQUEUED, True)


def _search_part(snapshot: dict) -> dict:
    """The parts of a config that define the study.

    Budget, workers, proposal processes and merge kernels may change on resume, so they are
    left out.
    """
    part = {k: v for k, v in snapshot.items() if k not in ("budget", "workers")}
    part["study"] = {k: v for k, v in part.get("study", {}).items() if k != "output_dir"}
    part["models"] = {k: v for k, v in part.get("models", {}).items() if k != "kernels"}
    part["sampler"] = {k: v for k, v in part.get("sampler", {}).items() if k != "proposers"}
    return part


def _count_trials(storage: Any, name: str) -> int:
    try:
        return len(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
    except KeyError:
        return 0
