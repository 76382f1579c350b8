"""Shared fixtures: tiny real transformers models saved once per session."""

from __future__ import annotations

import os

import pytest

from tests.support.tiny import ModelSet, build_model_set, gpt2_config, llama_config

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def llama_set(tmp_path_factory) -> ModelSet:
    return build_model_set(tmp_path_factory.mktemp("llama"), llama_config(positions=64), n_finetunes=3)


@pytest.fixture(scope="session")
def gpt2_set(tmp_path_factory) -> ModelSet:
    return build_model_set(tmp_path_factory.mktemp("gpt2"), gpt2_config(), n_finetunes=2)
