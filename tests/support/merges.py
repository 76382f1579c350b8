"""Recipes that set every number a method reads, and a live model's merged tensors: shared by the
tests that compare merges made different ways (LoRA adapters, placements)."""

from __future__ import annotations

from pathlib import Path

import torch

from merging import ResidentMerger, recipe_from_dict
from merging.catalog import METHOD_TABLE

TWO = ("slerp", "nuslerp")  # methods of exactly two models


def method_recipe(method: str, base: Path, paths: list[Path]) -> dict:
    """A recipe of `method` over `paths` (at most three) that sets every number the method
    reads."""
    spec = METHOD_TABLE[method]
    values = {
        "weight": [0.6, 0.9, 0.4],
        "density": [0.5, 0.7, 0.3],
        "gamma": [0.05, 0.02, 0.1],
        "epsilon": [0.1, 0.05, 0.1],
    }
    models = [
        {"path": str(p), **{k: v[i] for k, v in values.items() if spec.uses(k)}}
        for i, p in enumerate(paths)
    ]
    parameters = {k: v for k, v in (("lambda", 1.1), ("t", 0.3)) if spec.uses(k)}
    return {"method": method, "base": str(base), "models": models, "parameters": parameters}


def live_merge(merger: ResidentMerger, live, data: dict) -> dict[str, torch.Tensor]:
    """The recipe `data` merged into the live model in place; its merged tensors, copied."""
    merger.apply(recipe_from_dict(data), live)
    state = live.state_dict()
    return {n: state[n].clone() for n in merger.names}
