"""The study folder: config snapshot, storage, one JSON record per finished trial.

results/<study>/
  config.yaml        the validated config the study was created with
  journal.log        Optuna's journal storage (unless a storage URL is configured)
  trials/<n>.json    params, recipe, metrics, objective values, timings, worker, error
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

CONFIG_FILE = "config.yaml"
JOURNAL_FILE = "journal.log"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
    os.replace(tmp, path)


def write_trial_record(folder: Path, record: dict[str, Any]) -> Path:
    path = folder / "trials" / f"{record['number']}.json"
    write_json_atomic(path, record)
    return path


def read_trial_records(folder: Path) -> dict[int, dict[str, Any]]:
    out = {}
    for path in sorted((folder / "trials").glob("*.json")):
        out[int(path.stem)] = json.loads(path.read_text())
    return out




def redact(url: str) -> str:
    """A storage URL safe to print: the password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def open_storage(folder: Path, configured: str | None):
    """Optuna storage: the configured URL, or a journal file in the study folder (no server)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if configured:
        return optuna.storages.get_storage(configured) if "://" in configured else configured
    folder.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))


def write_config_snapshot(folder: Path, config_dict: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config_dict, sort_keys=False))


def read_config_snapshot(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a study folder (no {CONFIG_FILE}); give the folder `basin run` created")
    return yaml.safe_load(path.read_text())
