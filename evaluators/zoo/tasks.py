"""lm-eval task files for the zoo: jsonl data, and per skill a multiple-choice and a
generative YAML.

``zoo_<skill>`` scores the answer among four choices (log-likelihood); ``zoo_<skill>_gen`` asks
the model to write the answer (greedy, at most ``GEN_TOKENS`` new tokens, stopping where the next
example's skill word would begin), keeps the first run of digits (regex + take_first filter, named
``answer``) and scores it by exact match: metric ``exact_match,answer``. The generative task also
measures whether a model knows where its answer ends, which single-skill fine-tunes often forget.

Each task (``zoo_<skill>``) has separate ``validation`` and ``test`` splits of
local jsonl files. lm-eval 0.4.13 scores ``test_split`` whenever a task defines
one (``Task.eval_docs`` prefers test over validation), so the validation split is
only reachable through an override that sets ``test_split`` to null. Two group
files provide that without any code:

* ``zoo_validation``: all skills on the validation split (``test_split: null``
  is forwarded to every member as a task override);
* ``zoo_test``: all skills on the test split.

From code, ``task.set_config("test_split", None)`` on a loaded task does the same.

A dict spec such as ``{"task": "zoo_add", "test_split": None}`` does *not* work
in 0.4.13: it is treated as a new inline task, not as an override of the
registered YAML, so the dataset and prompt fields are lost.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .skills import Item

VALIDATION_GROUP = "zoo_validation"
TEST_GROUP = "zoo_test"


GEN_TOKENS = 4  # three answer digits and one to stop on
GEN_FILTER = "answer"


def task_name(skill: str) -> str:
    return f"zoo_{skill}"


def generative_task_name(skill: str) -> str:
    return f"zoo_{skill}_gen"


def write_jsonl(path: Path, items: list[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for item in items:
            fh.write(json.dumps(item.to_json()) + "\n")


def data_files(root: Path, skill: str) -> dict[str, Path]:
    """Where a skill's splits live inside the zoo folder ``root``."""
    return {split: root / "data" / f"{skill}_{split}.jsonl" for split in ("validation", "test")}


def write_task_files(root: Path, final_root: Path, skills: list[str]) -> Path:
    """Write one task YAML per skill and the two group YAMLs into ``root/tasks``.

    ``final_root`` is where the zoo will live once built: the YAMLs hold absolute
    data paths (lm-eval's json loader needs them) that must point there.
    """
    tasks_dir = root / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for skill in skills:
        files = data_files(final_root, skill)
        config = {
            "task": task_name(skill),
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
            "validation_split": "validation",
            "test_split": "test",
            "output_type": "multiple_choice",
            # Field names, not templates: lm-eval reads doc[field] directly.
            "doc_to_text": "prompt",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        _write(tasks_dir / f"{task_name(skill)}.yaml", config)
        _write(
            tasks_dir / f"{generative_task_name(skill)}.yaml", _generative(config, skill, skills)
        )
    names = [task_name(s) for s in skills]
    aggregate = [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]
    _write(
        tasks_dir / f"{VALIDATION_GROUP}.yaml",
        {
            "group": VALIDATION_GROUP,
            "task": names,
            # Not a group field, so lm-eval passes it on to every member task.
            "test_split": None,
            "aggregate_metric_list": aggregate,
            "metadata": {"version": 1.0},
        },
    )
    _write(
        tasks_dir / f"{TEST_GROUP}.yaml",
        {
            "group": TEST_GROUP,
            "task": names,
            "aggregate_metric_list": aggregate,
            "metadata": {"version": 1.0},
        },
    )
    return tasks_dir


def _generative(config: dict, skill: str, skills: list[str]) -> dict:
    """The generate_until form of a skill's multiple-choice task, over the same items."""
    out = {
        k: v
        for k, v in config.items()
        if k not in ("output_type", "doc_to_choice", "doc_to_target", "metric_list")
    }
    out.update(
        {
            "task": generative_task_name(skill),
            "output_type": "generate_until",
            "doc_to_target": "{{choices[label]}}",
            "generation_kwargs": {
                "until": list(skills),
                "max_gen_toks": GEN_TOKENS,
                "do_sample": False,
            },
            "filter_list": [
                {
                    "name": GEN_FILTER,
                    "filter": [
                        {"function": "regex", "regex_pattern": "([0-9](?: [0-9])*)"},
                        {"function": "take_first"},
                    ],
                }
            ],
            "metric_list": [
                {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}
            ],
        }
    )
    return out


def _write(path: Path, config: dict) -> None:
    """Write a task file unless it already holds this text (a reused zoo is left as it is)."""
    text = yaml.safe_dump(config, sort_keys=False)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
