"""Tiny models and tasks for the reliability scenarios, with a fault hook inside lm-eval.

The hooked tasks' doc_to_text obeys a control file, so a scenario can make the next evaluation
raise, hang, hold until released, or go slowly, from outside the `basin` processes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.tiny import build_model, build_tasks, task_config


@dataclass(frozen=True)
class FaultZoo:
    """A base, three fine-tunes of its shape, the tiny tasks, and the same tasks with a fault
    hook."""

    root: Path
    base: Path
    finetunes: tuple[Path, ...]
    tasks: Path
    hooked: Path  # tasks whose doc_to_text obeys `control` (see HOOKS)
    # the first fine-tune with its lm_head scaled by 1000 (task vectors that overflow)
    loud: Path | None = None

    @property
    def control(self) -> Path:
        return self.hooked / "control"

    @property
    def busy(self) -> Path:
        return self.hooked / "busy"

    def blocked(self) -> int:
        """Processes blocked by the current mode (each marks itself: busy.<pid>.pid)."""
        return len(list(self.hooked.glob("busy.*.pid")))

    def set_mode(self, mode: str) -> None:
        """ok | raise (the next call raises) | hang (every call blocks) | hold (evaluations block,
        loading a task does not) | sleep S (per item)."""
        for marker in self.hooked.glob("busy.*.pid"):  # those blocked by the mode before
            marker.unlink(missing_ok=True)
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(mode)
        os.replace(tmp, self.control)


# The hook runs inside lm-eval, once per item: in the worker evaluating a candidate, and also where
# a task is loaded (lm-eval renders one item then: the runner's setup and a starting worker).
HOOKS = '''"""Fault injection for the reliability tests: doc_to_text obeys the file CONTROL."""
import os
import sys
import time

CONTROL = {control!r}
BUSY = {busy!r}


def _mode():
    try:
        with open(CONTROL) as f:
            return f.read().strip()
    except FileNotFoundError:
        return "ok"


def _evaluating():
    frame = sys._getframe(1)
    while frame is not None:  # lm-eval renders the items of an evaluation in build_all_requests
        if frame.f_code.co_name == "build_all_requests":
            return True
        frame = frame.f_back
    return False


def _block(mode):
    tmp = BUSY + "." + str(os.getpid()) + ".tmp"  # one per process: several block at once
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, BUSY)
    open(BUSY + "." + str(os.getpid()) + ".pid", "w").close()
    while _mode() == mode:
        time.sleep(0.05)


def doc_to_text(doc):
    mode = _mode()
    if mode == "raise":
        tmp = CONTROL + ".raised"
        with open(tmp, "w") as f:
            f.write("ok")
        os.replace(tmp, CONTROL)
        raise RuntimeError("injected evaluation failure")
    if mode == "hang" or (mode == "hold" and _evaluating()):
        _block(mode)
    elif mode.startswith("sleep "):
        time.sleep(float(mode.split()[1]))
    return doc["context"].strip()
'''


def build_fault_zoo(root: Path, *, n_items: int = 30) -> FaultZoo:
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(root / "base", seed=0)
    finetunes = tuple(build_model(root / f"ft{i}", seed=i + 1) for i in range(3))
    tasks = build_tasks(root / "tasks", n_items=n_items)
    hooked = root / "hooked"
    hooked.mkdir(exist_ok=True)
    (hooked / "hooks.py").write_text(
        HOOKS.format(control=str(hooked / "control"), busy=str(hooked / "busy"))
    )
    for name in tasks.names:
        text = yaml.safe_dump(task_config(name, tasks.data_files[name]), sort_keys=False)
        text = text.replace(
            "doc_to_text: '{{context.strip()}}'", "doc_to_text: !function hooks.doc_to_text"
        )
        assert "!function" in text, text
        (hooked / f"{name}.yaml").write_text(text)
    zoo = FaultZoo(
        root, base, finetunes, tasks.folder, hooked, loud=_loud_copy(finetunes[0], root / "loud")
    )
    zoo.set_mode("ok")
    return zoo


def shared_fault_zoo(base: Path) -> FaultZoo:
    """build_fault_zoo into base/reliability-zoo once (test modules share it within a pytest
    session)."""
    root, done = base / "reliability-zoo", base / "reliability-zoo" / ".built"
    if done.exists():
        return FaultZoo(
            root,
            root / "base",
            tuple(root / f"ft{i}" for i in range(3)),
            root / "tasks",
            root / "hooked",
            root / "loud",
        )
    zoo = build_fault_zoo(root)
    done.touch()
    return zoo


def _loud_copy(model: Path, out: Path) -> Path:
    """`model` with lm_head x1000: its task vector times lambda ~1e38 overflows float32 (a real
    NaN/inf merge), while a linear merge that includes it stays finite."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1000
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def build_big_zoo(root: Path) -> FaultZoo:
    """Models large enough (~20 MB each) that an export lasts a moment."""
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(root / "base", seed=0, hidden=256, layers=8)
    finetunes = tuple(
        build_model(root / f"ft{i}", seed=i + 1, hidden=256, layers=8) for i in range(3)
    )
    tasks = build_tasks(root / "tasks", n_items=4)
    return FaultZoo(root, base, finetunes, tasks.folder, tasks.folder)


def study_config(
    zoo: FaultZoo, folder: Path, *, name: str = "night", hooked: bool = False, **sections: Any
) -> dict:
    """A study over the zoo (one CPU worker, two objectives); `sections` update whole sections."""
    data: dict[str, Any] = {
        "study": {"name": name, "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes]},
        "space": {"methods": ["ties", "task_arithmetic", "dare_ties"], "lambda": [0.5, 1.5]},
        "evaluator": {
            "tasks": ["toy_pair", "toy_next"],
            "include_path": str(zoo.hooked if hooked else zoo.tasks),
            "builtin_tasks": False,
        },
        "objectives": {"mode": "pareto", "items": [{"task": "toy_pair"}, {"task": "toy_next"}]},
        "budget": {"n_trials": 12},
        "workers": {"count": 1},
    }
    for key, value in sections.items():
        data[key] = (
            {**data[key], **value}
            if isinstance(value, dict) and isinstance(data.get(key), dict)
            else value
        )
    return data


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def study_with_one_trial(zoo: FaultZoo, folder: Path, **sections: Any) -> tuple[Path, int]:
    """A study folder holding one COMPLETE trial, made in-process without workers (for export)."""
    from search.config import config_from_dict
    from search.setup import setup_study
    from search.space import suggest

    setup = setup_study(
        config_from_dict(study_config(zoo, folder, baselines=False, **sections)), resume=False
    )
    trial = setup.study.ask()
    suggest(trial, setup.space)
    setup.study.tell(trial, [0.5, 0.5])
    return folder, trial.number
