"""Shared fixtures: tiny real transformers models saved once per session, and the toy zoo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.fault_zoo import FaultZoo, shared_fault_zoo
from tests.support.tiny import ModelSet, build_model_set, gpt2_config, llama_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cache_dir() -> Path:
    """Where the suite keeps what outlives a session (the toy zoo): $BASIN_TEST_CACHE, else
    ~/.cache/basin-tests; never the checkout (its .zoo/ is the demo's)."""
    return Path(
        os.environ.get("BASIN_TEST_CACHE") or Path.home() / ".cache" / "basin-tests"
    ).expanduser()


@pytest.fixture(scope="session")
def zoo():
    """The toy zoo of seed 0: built on first use (a few minutes), reused from the cache
    afterwards."""
    from evaluators.zoo import build_zoo

    return build_zoo(cache_dir() / "zoo" / "seed0", seed=0, progress=False)


@pytest.fixture(scope="session")
def fault_zoo(tmp_path_factory) -> FaultZoo:
    """Tiny models and tasks with a fault hook (tests/support/fault_zoo.py), not the toy zoo."""
    return shared_fault_zoo(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def llama_set(tmp_path_factory) -> ModelSet:
    return build_model_set(
        tmp_path_factory.mktemp("llama"), llama_config(positions=64), n_finetunes=3
    )


@pytest.fixture(scope="session")
def gpt2_set(tmp_path_factory) -> ModelSet:
    return build_model_set(tmp_path_factory.mktemp("gpt2"), gpt2_config(), n_finetunes=2)
