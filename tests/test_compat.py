"""The patches of other libraries' internals: pinned where they were checked, guarded where they
touch, and no import of basin changes another library's global state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from importlib.metadata import version

import optuna
import pytest

from evaluators import EvaluatorError
from evaluators import compat as lm_compat
from search import compat
from tests.support.runs import REPO


def _pins() -> dict[str, str]:
    """The exact pins among pyproject.toml's dependencies ("name==version" strings)."""
    return dict(
        re.findall(r'"([A-Za-z0-9_.-]+)==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    )


def test_the_patched_libraries_are_pinned_to_the_versions_their_patches_were_checked_against():
    pins = _pins()
    assert pins.get("lm-eval") == lm_compat.TESTED_LM_EVAL
    assert {k: pins.get(k) for k in compat.TESTED} == compat.TESTED
    # and the environment the tests run in is that one
    assert version("lm_eval") == lm_compat.TESTED_LM_EVAL
    assert {k: version(k) for k in compat.TESTED} == compat.TESTED


def test_importing_basin_leaves_optuna_matplotlib_and_warnings_as_they_were():
    code = (
        # their own filters
        "import warnings, optuna, matplotlib, torch, transformers, lm_eval.evaluator, ray, tqdm\n"
        "before = (optuna.logging.get_verbosity(), list(warnings.filters))\n"
        "import search.loop, search.report, search.cli, search.setup, evaluators.harness\n"
        "after = (optuna.logging.get_verbosity(), list(warnings.filters))\n"
        "print(before == after, matplotlib.get_backend())\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "svg"], out.stderr


def test_quiet_optuna_restores_the_verbosity_and_the_warning_filters():
    level, filters = optuna.logging.get_verbosity(), list(warnings.filters)
    with compat.quiet_optuna():
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            optuna.samplers.TPESampler(group=True, multivariate=True)
        assert not [
            w for w in seen if issubclass(w.category, optuna.exceptions.ExperimentalWarning)
        ]
    assert optuna.logging.get_verbosity() == level and list(warnings.filters) == filters


class _OtherTask:
    """A task of an lm-eval version without per-split doc methods."""

    eval_docs: list = []


def test_selecting_items_on_a_task_without_split_methods_refuses_with_the_version_to_install():
    with pytest.raises(EvaluatorError, match=f"install lm-eval=={lm_compat.TESTED_LM_EVAL}"):
        lm_compat.pin_docs(_OtherTask(), "validation", [])


def test_a_tokenizer_wrapper_of_another_shape_is_left_alone_with_one_warning():
    class OtherLM:
        def tok_encode(self, text, special=None):  # another signature: the memo must not guess
            return [len(text)]

    lm = OtherLM()
    lm_compat._warned.discard("tokenization memo")
    with pytest.warns(RuntimeWarning, match="tokenization memo patch .* is skipped"):
        lm_compat.memoise_tok_encode(lm)
    assert "tok_encode" not in vars(lm) and lm.tok_encode("abc") == [3]


def test_setting_an_attr_on_another_runners_trial_needs_the_storage_and_says_what_to_install():
    with pytest.raises(compat.CompatError, match=f"optuna=={compat.TESTED['optuna']}"):
        compat.set_user_attr_of(object(), object(), "error", "x")
    study = optuna.create_study()
    asked = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    compat.set_user_attr_of(study, frozen, "error", "its runner died")
    assert study.trials[asked.number].user_attrs["error"] == "its runner died"
