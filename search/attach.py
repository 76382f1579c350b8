"""`basin attach`: a study folder on this machine for a study kept in a database.

Runners on several machines share one study through a database storage, each with its own
folder. The study's config and its split sizes are stored in the database by the first runner
(search/setup.py); from them any machine can rebuild a folder: the config snapshot (pointing at
the database), the carve of a held-out split, and one record per finished trial, rebuilt from the
storage. `basin status`, `pareto`, `report` and `export` then work on that folder as on a
runner's own, and `basin resume` on it joins the study as one more runner.

Rebuilt records hold what the storage holds (params, recipe, metrics, values, timings, worker,
error); a trial's traceback stays in the record of the runner that ran it.
"""

from __future__ import annotations

from pathlib import Path

import optuna

from search import attrs, records
from search.config import ConfigError, config_from_dict, config_to_dict
from search.folder import storage_error, study_space
from search.recovery import sync_records


def attach(url: str, name: str, folder: Path) -> tuple[Path, int]:
    """Write (or refresh) `folder` for study `name` in the storage at `url`; returns the folder and
    the number of records written."""
    if records.literal_password(url):
        raise ConfigError(
            "the storage URL holds a password, which would be written into the study folder's "
            "config.yaml; put it in an environment variable and pass the URL with it, e.g. "
            "'postgresql+psycopg://basin:${BASIN_DB_PASSWORD}@db/basin' (in single quotes)"
        )
    if "://" not in url:
        raise ConfigError(
            f"{url} is not a database URL; `basin attach` is for studies kept in a database "
            "(a journal-file study lives in its folder: copy the folder instead)"
        )
    try:
        storage = records.open_storage(folder, url)
        names = [
            s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        ]
    except Exception as exc:
        raise storage_error(url, exc) from None
    if name not in names:
        raise ConfigError(
            f"no study named '{name}' in {records.redact(url)}; "
            f"it holds {', '.join(sorted(names)) if names else 'no study yet'}"
        )
    study = optuna.load_study(study_name=name, storage=storage)
    stored = study.user_attrs.get(attrs.CONFIG)
    if stored is None:
        raise ConfigError(
            f"study '{name}' holds no config (it was created by an older basin); copy the config "
            "snapshot (config.yaml) from a runner's study folder instead"
        )
    data = config_to_dict(config_from_dict(stored))
    data["study"] = {**data["study"], "output_dir": str(folder), "storage": url}
    config = config_from_dict(data)
    if (folder / records.CONFIG_FILE).is_file():
        present = records.read_config_snapshot(folder).get("study", {})
        if (present.get("name"), records.storage_url(present.get("storage") or "")) != (
            name,
            records.storage_url(url),
        ):
            raise ConfigError(
                f"{folder} already holds another study ('{present.get('name')}'); "
                "choose another --out"
            )
    records.write_config_snapshot(folder, data)
    if (sizes := study.user_attrs.get(attrs.SPLIT_SIZES)) is not None:
        records.write_carve(folder, config.evaluator, sizes)
    before = len(list((folder / "trials").glob("*.json")))
    # no models needed
    sync_records(study, folder, study_space(config, study.user_attrs.get(attrs.NUM_LAYERS)))
    return folder, len(list((folder / "trials").glob("*.json"))) - before
