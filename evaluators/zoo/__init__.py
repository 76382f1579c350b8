"""A toy model zoo where merging matters: a tiny Llama base, per-skill fine-tunes, lm-eval tasks.

``build_zoo(out_dir, seed)`` builds it deterministically in a few minutes on a
laptop CPU (or reuses an earlier build); ``load_zoo(out_dir)`` opens a built one.
"""

from .build import FinetuneSettings, Settings, build_zoo
from .manifest import Zoo, load_zoo

__all__ = ["FinetuneSettings", "Settings", "Zoo", "build_zoo", "load_zoo"]
