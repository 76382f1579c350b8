"""The merge engine: recipes, merge methods, layer mapping, checkpoints, export."""

from merging.checkpoint import Checkpoint, check_compatible
from merging.engine import NonFiniteMergeError
from merging.errors import MergeError
from merging.export import export_merge
from merging.mergekit_yaml import from_mergekit, to_mergekit
from merging.recipe import (
    METHODS,
    LayerParam,
    MergeRecipe,
    ModelEntry,
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from merging.resident import MergedWeights, ResidentMerger, load_live_model

__all__ = [
    "METHODS",
    "Checkpoint",
    "LayerParam",
    "MergeError",
    "MergeRecipe",
    "ModelEntry",
    "NonFiniteMergeError",
    "MergedWeights",
    "ResidentMerger",
    "check_compatible",
    "dump_recipe",
    "export_merge",
    "from_mergekit",
    "load_live_model",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "to_mergekit",
]
