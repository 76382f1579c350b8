"""Bad input: every mistake in the catalogue gives one message naming the problem (and the way out),
exit code 2, and leaves no half-created study folder. The catalogue lives in
tests/support/bad_inputs.py (the reliability script counts it too)."""

from __future__ import annotations

import subprocess

import pytest

from tests.support.bad_inputs import BAD_INPUTS, BadInput, BadInputEnv, run_bad_input
from tests.support.runs import BASIN, ENV, HANG_S, REPO


@pytest.fixture(scope="module")
def env(fault_zoo, tmp_path_factory) -> BadInputEnv:
    return BadInputEnv(fault_zoo, tmp_path_factory.mktemp("bad"))


def test_the_valid_config_the_cases_change_gets_past_setup(env):
    """Most cases change one thing in a valid config; unchanged, it reaches the workers, so each
    refusal below comes from the case's own mistake."""
    valid = BadInput("valid config", (), lambda e: e.config("valid"))
    with pytest.raises(AssertionError, match="the study started"):
        run_bad_input(valid, env)


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name.replace(" ", "_") for c in BAD_INPUTS])
def test_bad_input_gives_one_message_exit_2_and_leaves_nothing(case, env):
    result = run_bad_input(case, env)
    assert result.problems == [], f"{case.name}: {result.message}"


def test_a_pickle_only_model_is_refused_by_the_real_command_line(env):
    """The console script itself, on the security default: pickle loading stays off unless
    allowed."""
    case = next(c for c in BAD_INPUTS if c.name == "pickle-only model")
    proc = subprocess.run(
        [str(BASIN), *case.argv(env)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("basin: error:") == 1 and "Traceback" not in proc.stderr
    assert "allow_pickle" in proc.stderr and "pickle" in proc.stderr
    assert not env.out("pickle").exists()
