"""Every failure speaks basin's language: one `basin: error:` line that names the cause and the way
out, a non-zero exit, no Python traceback, and nothing half-made left behind.

The scenarios live in tests/support/failures.py (tests/benchmarks/reliability.py prints their
figures); these tests assert on what they saw."""

from __future__ import annotations

import pytest

from tests.support.failures import (
    Said,
    can_mount,
    damaged_finetune,
    full_disk_merge,
    full_disk_study,
    sigterm_run,
)


def speaks(said: Said, code: int) -> None:
    assert said.rc == code, said.text
    assert said.error_lines == 1, said.text
    assert not said.traceback, said.text
    assert not said.missing, f"{said.missing} not in: {said.text}"


def needs_root() -> None:
    if not can_mount():
        pytest.skip("mounting a small tmpfs needs root")


@pytest.mark.slow
def test_a_fine_tune_with_nan_is_refused_by_validate_and_by_run_before_any_trial(
    fault_zoo, tmp_path
):
    r = damaged_finetune(fault_zoo, tmp_path)
    speaks(r.validate, 2)
    assert r.headers_only.rc == 0, r.headers_only.text  # headers are fine
    speaks(r.run, 2)
    assert not r.folder_left
    assert r.run.shown == [], r.run.text


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_and_resume_finishes_the_budget(fault_zoo, tmp_path):
    """What a scheduler's SIGTERM does: the candidate in flight is queued again, finished trials
    stay, exit 143 with the folder's own path, no stack dump; `basin resume` then finishes exactly
    the budget."""
    r = sigterm_run(fault_zoo, tmp_path, n_trials=3)
    assert r.in_flight, f"no candidate in flight before the run ended\n{r.run.text[-3000:]}"
    assert r.run.rc == 143, r.run.text[-3000:]
    assert r.run.missing == [], r.run.text
    assert not r.run.traceback and r.run.shown == [], r.run.text
    ((stopped, error),) = r.stopped.items()
    assert "interrupted" in error
    assert r.requeued == [stopped]

    assert r.resumed.rc == 0, r.resumed.text
    assert r.complete == 3


@pytest.mark.slow
def test_a_full_disk_during_an_export_names_the_path_and_leaves_nothing(fault_zoo, tmp_path):
    needs_root()
    r = full_disk_merge(fault_zoo, tmp_path)
    speaks(r.merge, 1)
    assert r.left == []  # no half-written output, no temporary folder


@pytest.mark.slow
def test_a_full_disk_during_a_study_keeps_the_finished_trials_and_resume_goes_on(
    fault_zoo, tmp_path
):
    """The disk fills while a candidate is in flight: the run ends with the folder and the way on,
    and once space is freed `basin resume` finishes exactly the budget."""
    needs_root()
    r = full_disk_study(fault_zoo, tmp_path, n_trials=4)
    assert r.in_flight, f"no candidate in flight before the run ended\n{r.run.text[-3000:]}"
    assert r.run.rc == 1, r.run.text[-3000:]
    assert r.run.error_lines == 1 and not r.run.traceback, r.run.text
    assert r.run.missing == [], r.run.text
    assert r.resumed.rc == 0, r.resumed.text
    assert r.complete == 4
    assert r.records == r.trials
