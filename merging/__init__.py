"""The merge engine: recipes, merge methods, layer mapping, checkpoints, export."""
