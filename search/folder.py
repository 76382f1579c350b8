"""The way back into a study folder: its config, its Optuna study, its space, its trials' recipes.

The reading side (status, pareto, report, export, attach) starts here; it needs neither the
models' weights nor the tasks' data, and nothing of what setting a study up checks.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from merging.recipe import MergeRecipe
from search import records
from search.config import ConfigError, StudyConfig, config_from_dict
from search.space import SearchSpace, build_space, recipe_from_params
from search.workers import WorkerSpec


def worker_spec(config: StudyConfig) -> WorkerSpec:
    """What every worker of this study builds: the config sections it needs, local paths made
    absolute."""
    return WorkerSpec(
        models=config.models.resolved(),
        evaluator=config.evaluator.resolved(),
        space=config.space,
        threads=config.workers.threads,
        fidelity_seed=config.fidelity.seed if config.fidelity is not None else None,
        gpu_memory_gib=config.workers.gpu_memory_gib,
        gpu_share=config.workers.gpus_per_worker or 1.0,
    )


def study_space(config: StudyConfig, num_layers: int | None = None) -> SearchSpace:
    """The study's search space, over the absolute model paths the workers use. The layer count
    comes from the base model's config unless given (the study stores it: attrs.NUM_LAYERS)."""
    from merging.checkpoint import resolve_model_dir

    models = config.models.resolved()
    base_dir = None if num_layers is not None else resolve_model_dir(config.models.base)
    space = build_space(config, base_dir, num_layers)
    return SearchSpace(
        **{**space.__dict__, "base": models.base, "model_paths": tuple(models.finetunes)}
    )


def trial_recipe(
    config: StudyConfig, trial: optuna.trial.FrozenTrial, space: SearchSpace | None = None
) -> MergeRecipe:
    """The MergeRecipe a finished trial scored: rebuilt from its stored params, or the recipe it
    stores (a user's recipe outside the space)."""
    from merging.recipe import recipe_from_dict
    from search.user_recipes import fixed_recipe

    if (fixed := fixed_recipe(trial)) is not None:
        return recipe_from_dict(fixed)
    return recipe_from_params(trial.params, space or study_space(config))


def storage_error(url: str, exc: Exception) -> ConfigError:
    """The message for a storage that cannot be opened, its password hidden."""
    reason = records.redact(str(exc))[:300]
    return ConfigError(
        f"study.storage {records.redact(url)} cannot be opened ({type(exc).__name__}: {reason}); "
        "check the URL, that the server runs and its driver is installed, or leave study.storage "
        "empty to use a journal file in the study folder"
    )


def load_study_folder(folder: str | Path) -> tuple[StudyConfig, optuna.Study]:
    """The config and Optuna study of an existing study folder."""
    folder = Path(folder)
    try:
        snapshot = records.read_config_snapshot(folder)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    config = config_from_dict(snapshot, str(folder / records.CONFIG_FILE))
    try:
        storage = records.open_storage(folder, config.study.storage, config.study.heartbeat_s)
        return config, optuna.load_study(study_name=config.study.name, storage=storage)
    except KeyError:
        raise ConfigError(
            f"{folder}: its storage holds no study named '{config.study.name}'; "
            f"was it moved? start it again with `basin run CONFIG`"
        ) from None
    except ConfigError:  # a damaged journal: its own message, not the storage's
        raise
    except Exception as exc:  # status, pareto, export: the same redacted message as run
        raise storage_error(
            config.study.storage or str(folder / records.JOURNAL_FILE), exc
        ) from None
