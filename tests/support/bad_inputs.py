"""Bad input: a catalogue of mistakes, each of which must give exit 2 and one message naming it.

Every case runs through `search.cli.main` in-process, with workers made impossible, so a mistake
that slips through setup is caught before any model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.fault_zoo import FaultZoo, study_config, study_with_one_trial
from tests.support.tiny import build_model


@dataclass(frozen=True)
class BadInput:
    name: str
    words: tuple[str, ...]  # the message must name these (case-insensitive)
    argv: Callable[[BadInputEnv], list[str]]
    absent: tuple[str, ...] = ()  # ... and must not show these (a password)


@dataclass
class BadInputEnv:
    """Files the cases point at, made once: the zoo, a pickle-only model, a model of another shape,
    a model folder without config.json, an existing study."""

    zoo: FaultZoo
    root: Path

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.pickled = self.root / "pickled"
        if not self.pickled.exists():
            shutil.copytree(self.zoo.finetunes[0], self.pickled)
            (self.pickled / "model.safetensors").unlink()
            model = AutoModelForCausalLM.from_pretrained(self.zoo.finetunes[0])
            torch.save(model.state_dict(), self.pickled / "pytorch_model.bin")
        self.wider = self.root / "wider"
        if not self.wider.exists():
            build_model(self.wider, seed=9, hidden=48)
        self.no_config = self.root / "no_config"
        if not self.no_config.exists():
            shutil.copytree(self.zoo.finetunes[1], self.no_config)
            (self.no_config / "config.json").unlink()
        self.study = self.root / "existing"
        if not (self.study / "config.yaml").exists():
            self.study, self.trial = study_with_one_trial(self.zoo, self.study)

    def config(self, name: str, text: str | None = None, **sections: Any) -> list[str]:
        """argv of `basin run` on a config file holding `text`, or the valid config with
        `sections`."""
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            text = yaml.safe_dump(
                study_config(self.zoo, self.out(name), **sections), sort_keys=False
            )
        path.write_text(text)
        return ["run", str(path)]

    def out(self, name: str) -> Path:
        return self.root / "out" / name


PASSWORD = "s3cr3t-Pa55"


def _models(
    env: BadInputEnv, base: Path | str | None = None, finetunes: list | None = None, **extra: Any
) -> dict:
    return {
        "base": str(base or env.zoo.base),
        "finetunes": [str(p) for p in (finetunes or env.zoo.finetunes)],
        **extra,
    }


BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput(
        "malformed YAML",
        ("not valid YAML",),
        lambda e: e.config("malformed", "study: {name: x\nmodels: [a, b\n"),
    ),
    BadInput(
        "config is not a mapping",
        ("must be a YAML mapping",),
        lambda e: e.config("list", "- a\n- b\n"),
    ),
    BadInput(
        "config file missing",
        ("config file not found",),
        lambda e: ["run", str(e.root / "nowhere.yaml")],
    ),
    BadInput(
        "unknown key",
        ("sampler.nmae", "unknown key", "did you mean 'name'"),
        lambda e: e.config("unknown_key", sampler={"nmae": "tpe"}),
    ),
    BadInput(
        "unknown section",
        ("budgett", "unknown key", "did you mean 'budget'"),
        lambda e: e.config("unknown_section", budgett={"n_trials": 3}),
    ),
    BadInput(
        "wrong type",
        ("budget.n_trials", "valid integer", "many"),
        lambda e: e.config("wrong_type", budget={"n_trials": "many"}),
    ),
    BadInput(
        "out of range density",
        ("density", "(0, 1]"),
        lambda e: e.config("density", space={"methods": ["ties"], "density": [0.0, 1.5]}),
    ),
    BadInput(
        "reversed range",
        ("lam", "above high"),
        lambda e: e.config("reversed", space={"lambda": [2.0, 1.0]}),
    ),
    BadInput(
        "zero workers",
        ("workers.count", "greater than or equal to 1"),
        lambda e: e.config("zero_workers", workers={"count": 0}),
    ),
    BadInput(
        "unknown merge method",
        ("space.methods", "tie", "'ties'"),
        lambda e: e.config("method", space={"methods": ["tie"]}),
    ),
    BadInput(
        "no budget",
        ("give n_trials, timeout or items",),
        lambda e: e.config("no_budget", budget={"n_trials": None}),
    ),
    BadInput(
        "bad study name",
        ("study.name", "pattern"),
        lambda e: e.config("name", study={"name": "a/b"}),
    ),
    BadInput(
        "fine-tune listed twice",
        ("listed twice",),
        lambda e: e.config("twice", models=_models(e, finetunes=[e.zoo.finetunes[0]] * 2)),
    ),
    BadInput(
        "pareto with one objective",
        ("pareto needs at least two",),
        lambda e: e.config(
            "pareto1", objectives={"mode": "pareto", "items": [{"task": "toy_pair"}]}
        ),
    ),
    BadInput(
        "objective on a task not evaluated",
        ("toy_pari", "did you mean 'toy_pair'"),
        lambda e: e.config(
            "objective_task",
            objectives={"mode": "pareto", "items": [{"task": "toy_pari"}, {"task": "toy_next"}]},
        ),
    ),
    BadInput(
        "slerp with three models",
        ("slerp", "exactly two"),
        lambda e: e.config("slerp", space={"methods": ["slerp"]}),
    ),
    BadInput(
        "empty search space",
        ("nothing to search",),
        lambda e: e.config(
            "empty_space", space={"methods": ["ties"], "weight": 0.5, "density": 0.5, "lambda": 1.0}
        ),
    ),
    BadInput(
        "missing model folder",
        ("model folder not found", "no_such_model"),
        lambda e: e.config("missing_model", models=_models(e, base=e.root / "no_such_model")),
    ),
    BadInput(
        "model folder without config.json",
        ("config.json",),
        lambda e: e.config(
            "no_config", models=_models(e, finetunes=[e.no_config, *e.zoo.finetunes[1:]])
        ),
    ),
    BadInput(
        "incompatible models",
        ("differ in the shape", "identical shapes"),
        lambda e: e.config(
            "incompatible", models=_models(e, finetunes=[e.wider, *e.zoo.finetunes[1:]])
        ),
    ),
    BadInput(
        "pickle-only model",
        ("pickle", "allow_pickle"),
        lambda e: e.config(
            "pickle", models=_models(e, finetunes=[e.pickled, *e.zoo.finetunes[1:]])
        ),
    ),
    BadInput(
        "unknown task",
        ("unknown task", "toy_nxt", "toy_next"),
        lambda e: e.config(
            "unknown_task",
            evaluator={"tasks": ["toy_pair", "toy_nxt"]},
            objectives={"mode": "pareto", "items": [{"task": "toy_pair"}, {"task": "toy_nxt"}]},
        ),
    ),
    BadInput(
        "unknown metric",
        ("f1", "acc"),
        lambda e: e.config(
            "unknown_metric",
            objectives={
                "mode": "pareto",
                "items": [{"task": "toy_pair", "metric": "f1"}, {"task": "toy_next"}],
            },
        ),
    ),
    BadInput(
        "storage server not reachable",
        ("cannot be opened", "***", "leave study.storage empty"),
        lambda e: e.config(
            "postgres",
            study={
                "name": "pg",
                "output_dir": str(e.out("postgres")),
                "storage": f"postgresql://basin:{PASSWORD}@127.0.0.1:1/studies",
            },
        ),
        absent=(PASSWORD,),
    ),
    BadInput(
        "storage file in a missing folder",
        ("cannot be opened", "sqlite"),
        lambda e: e.config(
            "sqlite",
            study={
                "name": "sq",
                "output_dir": str(e.out("sqlite")),
                "storage": f"sqlite:///{e.root}/no/such/dir/study.db",
            },
        ),
    ),
    BadInput(
        "existing study, different config",
        ("different config", "differs in: baselines, space", "basin resume", "study.name"),
        lambda e: e.config(
            "different",
            study={"name": "night", "output_dir": str(e.study)},
            space={"methods": ["ties"]},
        ),
    ),
    BadInput(
        "resume of a folder that is no study",
        ("not a study folder",),
        lambda e: ["resume", str(e.root / "configs")],
    ),
    BadInput(
        "bad --set override",
        ("key.sub=value",),
        lambda e: [*e.config("override"), "--set", "budget.n_trials"],
    ),
    BadInput(
        "export of a trial that is not complete",
        ("not a complete trial", "pick one of"),
        lambda e: ["export", str(e.study), "--trial", "999", "--out", str(e.out("export"))],
    ),
    BadInput(
        "export --force into the study folder itself",
        ("is a study", "never a study", "Choose another --out"),
        lambda e: [
            "export",
            str(e.study),
            "--trial",
            str(e.trial),
            "--out",
            str(e.study),
            "--force",
        ],
    ),
    BadInput(
        "export --force into a folder holding a study",
        ("holds the study folder", "never a study"),
        lambda e: [
            "export",
            str(e.study),
            "--trial",
            str(e.trial),
            "--out",
            str(e.root),
            "--force",
        ],
    ),
    BadInput(
        "merge --force into one of its own inputs",
        ("is an input of this merge", "never a model the merge reads"),
        lambda e: ["merge", str(_self_recipe(e)), "--out", str(e.root / "own-input"), "--force"],
    ),
    BadInput(
        "export under a regular file",
        ("is a file, not a folder",),
        lambda e: [
            "export",
            str(e.study),
            "--trial",
            str(e.trial),
            "--out",
            str(_blocker(e) / "model"),
        ],
    ),
    BadInput(
        "study.output_dir under a regular file",
        ("study.output_dir", "is a file, not a folder"),
        lambda e: e.config(
            "under_file", study={"name": "uf", "output_dir": str(_blocker(e) / "studies")}
        ),
    ),
    BadInput(
        "a wrong --set value",
        ("budget.n_trials", "from --set budget.n_trials=0", "fix the --set values"),
        lambda e: [*e.config("set_value"), "--set", "budget.n_trials=0"],
    ),
    BadInput(
        "status with an unreachable password URL",
        ("cannot be opened", "***"),
        lambda e: ["status", str(_password_study(e))],
        absent=(PASSWORD,),
    ),
)


def _blocker(env: BadInputEnv) -> Path:
    """A regular file where a folder would be needed."""
    path = env.root / "blocker"
    path.write_text("a file, not a folder")
    return path


def _self_recipe(env: BadInputEnv) -> Path:
    """A recipe whose fine-tune is a copy of the zoo's, at the path the case passes as --out."""
    own = env.root / "own-input"
    if not own.exists():
        shutil.copytree(env.zoo.finetunes[0], own)
    recipe = env.root / "configs" / "self.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    models = [{"path": str(own), "weight": 1.0}]
    recipe.write_text(
        yaml.safe_dump({"method": "task_arithmetic", "base": str(env.zoo.base), "models": models})
    )
    return recipe


def _password_study(env: BadInputEnv) -> Path:
    """A study folder whose snapshot points at a password-protected server that is not there."""
    folder = env.root / "pg_study"
    folder.mkdir(exist_ok=True)
    data = study_config(env.zoo, folder, name="pg")
    data["study"]["storage"] = f"postgresql://basin:{PASSWORD}@127.0.0.1:1/studies"
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    return folder


@dataclass
class BadInputResult:
    case: BadInput
    rc: int | None
    message: str
    leftovers: list[str]  # output folders created and left behind

    @property
    def problems(self) -> list[str]:
        out = [] if self.rc == 2 else [f"exit code {self.rc}, expected 2"]
        low = self.message.lower()
        out += [f"message lacks {w!r}" for w in self.case.words if w.lower() not in low]
        out += [f"message shows {w!r}" for w in self.case.absent if w in self.message]
        if self.message.count("basin: error:") != 1:
            out.append("not exactly one error message")
        if "Traceback" in self.message:
            out.append("a traceback")
        return out + [f"left {p}" for p in self.leftovers]


def run_bad_input(case: BadInput, env: BadInputEnv) -> BadInputResult:
    """Run one case through search.cli.main in this process (no worker may start: the pool is
    replaced by one that fails the case)."""
    import search.loop
    from search.cli import main

    argv = case.argv(env)
    outs = [p for p in (env.root / "out").glob("*")] if (env.root / "out").exists() else []
    before = {p: p.exists() for p in outs}
    existing = (env.study / "config.yaml").read_text()
    err = io.StringIO()

    class NoWorkers:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise AssertionError(f"{case.name}: the study started; the bad input was not caught")

    saved, search.loop.ray_pool = search.loop.ray_pool, NoWorkers
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        search.loop.ray_pool = saved
    leftovers = (
        [str(p) for p in (env.root / "out").glob("*") if not before.get(p, False)]
        if (env.root / "out").exists()
        else []
    )
    if (env.study / "config.yaml").read_text() != existing:
        leftovers.append(f"{env.study}/config.yaml changed")
    return BadInputResult(case, rc, err.getvalue(), leftovers)
