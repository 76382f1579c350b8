"""The zoo's manifest (``zoo.json``): what a built zoo holds and where."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "zoo.json"
FORMAT_VERSION = 1
# Files every saved model folder must hold for the zoo to count as complete.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Zoo:
    """A built toy zoo: a base model, one fine-tune per skill and their lm-eval tasks."""

    root: Path
    base: Path  # base model folder
    finetunes: dict[str, Path]  # skill name -> fine-tune model folder, in a fixed order
    tasks_dir: Path  # lm-eval include path holding the task yamls
    tasks: list[str]  # lm-eval task names, same order as finetunes
    heldout_text: Path  # plain text for perplexity

    @property
    def generative_tasks(self) -> list[str]:
        """The generative (generate_until) task of each skill, same order as finetunes."""
        return [f"{task}_gen" for task in self.tasks]


def write_manifest(root: Path, record: dict) -> None:
    """Write zoo.json last, so its presence marks a finished build."""
    (root / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


def read_manifest(root: Path) -> dict:
    """The raw manifest; ValueError if it is missing or unreadable."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"no toy zoo at {root}: {MANIFEST} is missing (run build_zoo first)")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"unreadable {path}: {exc}") from exc
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {record.get('format_version')}, expected {FORMAT_VERSION}"
        )
    return record


def zoo_from_manifest(root: Path, record: dict) -> Zoo:
    root = Path(root).resolve()
    return Zoo(
        root=root,
        base=root / record["base"],
        finetunes={skill: root / folder for skill, folder in record["finetunes"].items()},
        tasks_dir=root / record["tasks_dir"],
        tasks=list(record["tasks"]),
        heldout_text=root / record["heldout_text"],
    )


def missing_files(zoo: Zoo, record: dict) -> list[str]:
    """Paths a complete zoo should hold but this one lacks (empty when complete)."""
    expected = [zoo.heldout_text, *(zoo.root / f for f in record.get("data_files", []))]
    expected += [zoo.tasks_dir / f"{task}.yaml" for task in zoo.tasks]
    for folder in (zoo.base, *zoo.finetunes.values()):
        expected += [folder / name for name in MODEL_FILES]
    return [str(p) for p in expected if not p.is_file()]


def load_zoo(out_dir: str | Path) -> Zoo:
    """Open a built zoo from its manifest; ValueError if it is missing or incomplete."""
    root = Path(out_dir).resolve()
    record = read_manifest(root)
    zoo = zoo_from_manifest(root, record)
    missing = missing_files(zoo, record)
    if missing:
        raise ValueError(f"incomplete toy zoo at {root}; missing: {', '.join(missing[:5])}")
    if Path(record.get("root", "")) != root:
        # The task YAMLs hold absolute data paths; a moved zoo needs them rewritten.
        raise ValueError(
            f"toy zoo at {root} was built at {record.get('root')}; "
            "call build_zoo on the new location to refresh its task files"
        )
    return zoo
