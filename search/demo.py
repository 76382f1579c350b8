"""The demo study, built in code so that `basin demo` runs wherever basin is installed.

configs/demo.yaml and configs/demo-generative.yaml are the same studies written out for
`basin run` from a checkout (a test keeps them equal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from search.config import StudyConfig

DEMO_ZOO = ".zoo/seed0"  # relative to the working directory, like results/
SKILLS = ("add", "succ", "rev", "sort")


def demo_config(zoo: str = DEMO_ZOO, *, generative: bool = False) -> dict[str, Any]:
    """A Pareto search over the toy zoo's four skills that finishes in about a minute on a laptop
    CPU.

    generative: instead, one score (the mean exact match of the four skills' generative tasks,
    answers written by the model), searched on part of the validation split with the rest held
    out for the report (a carve, as for leaderboard tasks that have one split).
    """
    if generative:
        return _generative_demo(zoo)
    return {
        "study": {"name": "demo"},
        "models": _models(zoo),
        "space": {
            "methods": ["ties", "dare_ties", "task_arithmetic"],
            "granularity": "model",
            "weight": [0.0, 1.0],
            "density": [0.2, 1.0],
            "lambda": [0.3, 1.5],
        },
        "evaluator": {
            "tasks": [f"zoo_{skill}" for skill in SKILLS],
            "include_path": f"{zoo}/tasks",
            "split": "validation",
            "report_split": "test",
            "batch_size": 64,
            "builtin_tasks": False,
        },
        "objectives": {
            "mode": "pareto",
            "items": [{"task": f"zoo_{skill}", "metric": "acc"} for skill in SKILLS],
        },
        "sampler": {"name": "nsga2", "seed": 0},
        "budget": {"n_trials": 40},
        "workers": {"count": 2},
    }


def _models(zoo: str) -> dict[str, Any]:
    return {
        "base": f"{zoo}/base",
        "finetunes": [f"{zoo}/ft_{skill}" for skill in SKILLS],
        "dtype": "float32",
        "device": "auto",
    }


def _generative_demo(zoo: str) -> dict[str, Any]:
    tasks = [f"zoo_{skill}_gen" for skill in SKILLS]
    return {
        "study": {"name": "demo-generative"},
        "models": _models(zoo),
        "space": {
            "methods": ["task_arithmetic", "ties"],
            "granularity": "model",
            "weight": [0.0, 1.0],
            "density": [0.2, 1.0],
            "lambda": [0.3, 1.5],
        },
        "evaluator": {
            "tasks": tasks,
            "include_path": f"{zoo}/tasks",
            "split": "validation",
            "holdout": 0.4,
            "holdout_seed": 0,
            "batch_size": 64,
            "builtin_tasks": False,
        },
        "objectives": {
            "mode": "single",
            "items": [
                {"task": task, "metric": "exact_match,answer", "weight": 0.25} for task in tasks
            ],
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 8},
        "budget": {"n_trials": 30},
        "workers": {"count": 2},
    }


def load_demo_config(
    out: str | None = None,
    overrides: list[str] | None = None,
    zoo: str = DEMO_ZOO,
    *,
    generative: bool = False,
) -> StudyConfig:
    """The demo study's validated config: `out` as its folder, then the `--set` overrides."""
    from search.config import apply_overrides, config_from_dict

    sets = [*([f"study.output_dir={out}"] if out else []), *(overrides or [])]
    return config_from_dict(
        apply_overrides(demo_config(zoo, generative=generative), sets), "the demo config"
    )
