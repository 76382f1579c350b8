"""Proposals made while the workers work (search/proposals.py), the journal writes a proposal
gathers into one append (search/compat.batched_writes), and a study whose budget ends with a
proposal made ahead (real tiny models, real lm-eval, real Optuna journal)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import attrs, compat, records
from search.config import config_from_dict
from search.folder import load_study_folder
from search.loop import run_study
from search.pool import InProcessPool, Ref
from search.proposals import Ahead, InOrder
from search.summary import print_status

WAIT_S = 120.0  # an upper bound for events that come in milliseconds, on a loaded machine


class Gated:
    """A propose function: each call takes one pass from `gate`, then returns the next number, or
    None once `stop` numbers are made; `calls` counts the calls begun."""

    def __init__(self, stop: int = 1000) -> None:
        self.gate, self.calls, self.made, self.stop = threading.Semaphore(0), 0, 0, stop
        self.changed = threading.Condition()

    def __call__(self) -> int | None:
        with self.changed:
            self.calls += 1
            self.changed.notify_all()
        assert self.gate.acquire(timeout=WAIT_S)
        with self.changed:
            self.changed.notify_all()
            if self.made >= self.stop:
                return None
            self.made += 1
            return self.made - 1

    def wait_for(self, calls: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.calls >= calls, timeout=WAIT_S)


def test_proposals_ahead_wait_while_the_depth_is_full():
    propose = Gated()
    ahead = Ahead(propose, depth=2)
    propose.gate.release(3)
    propose.wait_for(2)
    # two are made and wait; the thread begins no third until one is taken
    with propose.changed:
        propose.changed.wait_for(lambda: propose.made == 2, timeout=WAIT_S)
    assert ahead.pending() == [0, 1]
    assert ahead.take() == 0  # the first made, the first taken
    propose.wait_for(3)  # a place freed: the third is begun at once
    assert ahead.take() == 1
    assert ahead.take() == 2  # waits for it: made while the loop waited
    propose.gate.release(10)  # (the thread goes on to fill the depth: let it, then close)
    ahead.close()


def test_take_says_none_when_the_budget_allows_no_proposal_until_a_trial_is_told():
    propose = Gated(stop=1)
    ahead = Ahead(propose, depth=3)
    propose.gate.release(2)
    assert ahead.take() == 0
    assert ahead.take() is None  # the second call found no budget: none to come for now
    assert ahead.spent()
    propose.stop = 2  # a told trial frees budget
    propose.gate.release(10)
    ahead.told()
    assert ahead.take() == 1
    ahead.close()


def test_an_error_while_proposing_is_raised_on_the_loop_s_thread():
    def propose() -> int:
        raise RuntimeError("the storage is gone")

    ahead = Ahead(propose, depth=1)
    with pytest.raises(RuntimeError, match="the storage is gone"):
        ahead.take()
    ahead.close()


def test_close_finishes_the_proposal_being_made_and_keeps_it():
    propose = Gated()
    ahead = Ahead(propose, depth=1)
    propose.wait_for(1)  # being made, held at the gate
    closer = threading.Thread(target=ahead.close)
    closer.start()
    propose.gate.release(1)
    closer.join(timeout=WAIT_S)
    assert not closer.is_alive()
    assert ahead.pending() == [0]  # the loop queues it again


def test_in_order_proposals_are_made_on_the_caller_s_thread_one_per_told_trial():
    made = []

    def propose() -> int:
        made.append(threading.current_thread())
        return len(made) - 1

    in_order = InOrder(propose, first=2)
    assert [in_order.take(), in_order.take(), in_order.take()] == [0, 1, None]
    in_order.told()
    assert in_order.take() == 2
    assert set(made) == {threading.current_thread()}


# --- the journal writes of a proposal, in one append ---------------------------------------------


def _journal_study(folder: Path) -> optuna.Study:
    storage = records.open_storage(folder, None)
    return optuna.create_study(
        study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0)
    )


def _lines(folder: Path) -> int:
    return len((folder / records.JOURNAL_FILE).read_bytes().splitlines())


def test_a_trial_s_params_reach_the_journal_in_one_append_at_the_end_of_the_block(tmp_path):
    study = _journal_study(tmp_path)
    trial = study.ask()
    before = _lines(tmp_path)
    other = records.open_storage(tmp_path, None)  # another runner's view of the journal
    with compat.batched_writes(study):
        values = [trial.suggest_float(f"p{i}", 0.0, 1.0) for i in range(20)]
        trial.set_user_attr("runner", {"pid": 1})
        assert _lines(tmp_path) == before  # nothing written yet
        assert trial.params == {f"p{i}": v for i, v in enumerate(values)}  # the trial holds them
        assert other.get_all_trials(0)[0].params == {}
    assert _lines(tmp_path) == before + 21  # one line per write, in one append
    seen = other.get_all_trials(0)[0]
    assert seen.params == trial.params and seen.user_attrs == {"runner": {"pid": 1}}
    study.tell(trial, 1.0)  # the study goes on as without the block
    assert study.trials[0].state == TrialState.COMPLETE


def test_a_write_to_a_trial_another_runner_finished_fails_at_the_end_of_the_block(tmp_path):
    study = _journal_study(tmp_path)
    trial = study.ask()
    # another runner found it silent and failed it
    other = optuna.load_study(study_name="s", storage=records.open_storage(tmp_path, None))
    other.tell(trial.number, state=TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError), compat.batched_writes(study):
        trial.set_user_attr("worker", "w")
    # raised in this thread, at the block's end; the storage reads on, and the journal holds the
    # trial as the other runner left it
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]
    (kept,) = records.open_storage(tmp_path, None).get_all_trials(0)
    assert kept.state == TrialState.FAIL and "worker" not in kept.user_attrs


def test_batched_writes_reach_any_other_storage_as_they_are_made():
    study = optuna.create_study()  # in memory
    trial = study.ask()
    with compat.batched_writes(study):
        trial.suggest_float("x", 0.0, 1.0)
        assert "x" in study.trials[0].params


# --- a budget that ends with a proposal made ahead ------------------------------------------------


class AheadPool(InProcessPool):
    """The study's two workers in this process; a result is handed back only once the loop has
    proposed a candidate ahead for each worker (RUNNING trials no worker holds), so that every run
    ends with two proposals that no worker took."""

    folder: Path

    def wait(self, refs: list[Ref], timeout: float | None) -> list[Ref]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            _, study = load_study_folder(self.folder)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if len(running) >= len(refs) + self.count:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("no proposal was made ahead")
        return super().wait(refs, timeout)


def _config(zoo, folder: Path, proposers: int = 0, **budget):
    from tests.support.fault_zoo import study_config

    return config_from_dict(
        study_config(
            zoo,
            folder,
            name=folder.name,
            sampler={"name": "random", "seed": 3, "proposers": proposers},
            budget=budget,
            workers={"count": 2},
            baselines=False,
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("proposers", [0, 2], ids=["thread", "processes"])
def test_proposals_the_budget_left_untaken_are_queued_and_run_first_on_resume(
    fault_zoo, tmp_path, capsys, proposers
):
    folder = tmp_path / "ahead"

    def pool(spec, workers, worker_cls=None):
        made = AheadPool(spec, workers.count, worker_cls)
        made.folder = folder
        return made

    run_study(_config(fault_zoo, folder, proposers, items=1), progress=False, pool=pool)
    _, study = load_study_folder(folder)
    states = [t.state for t in study.trials]
    # two ran (one per worker), two were proposed ahead while they ran, and the budget ended
    assert states == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2
    ahead, queued = study.trials[2:4], study.trials[4:]
    for t in ahead:
        assert "the budget ended before a worker took it" in t.user_attrs[attrs.ERROR]
    assert [t.user_attrs["retry_of"] for t in queued] == [t.number for t in ahead]
    per_trial = study.trials[0].user_attrs[attrs.ITEMS]
    print_status(folder)  # not counted as failed: said apart, with the way on
    out = capsys.readouterr().out
    assert "failed 0," in out and "2 proposed ahead but not run" in out and "basin resume" in out

    # resumed with room for more: the queued ones run first, with the params proposed ahead
    more = _config(fault_zoo, folder, proposers, items=2 * per_trial + 1)
    run_study(more, resume=True, progress=False, pool=pool)
    _, study = load_study_folder(folder)
    ran = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in ran] == [0, 1, *(t.number for t in queued)]
    assert [t.params for t in ran[2:]] == [t.params for t in ahead] and ran[2].params
    # this run too ended with two proposals ahead: those are said, not the first two (which ran)
    not_run = [t for t in study.trials if t.user_attrs.get(attrs.NOT_RUN)]
    assert len(not_run) == 4
    print_status(folder)
    assert "; 2 proposed ahead but not run" in capsys.readouterr().out


# --- proposals made by processes of their own (search/proposers.py) ------------------------------


@pytest.mark.slow
def test_proposal_processes_propose_for_the_run_each_from_its_own_stream(fault_zoo, tmp_path):
    folder = tmp_path / "procs"
    study = run_study(
        _config(fault_zoo, folder, proposers=2, n_trials=8),
        progress=False,
        pool=lambda spec, workers, cls=None: InProcessPool(spec, workers.count, cls),
    )
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    # each claimed for this run (a run that dies leaves them to be found silent, as its own)
    import os

    assert {t.user_attrs[attrs.RUNNER]["pid"] for t in trials} == {os.getpid()}
    # the run and its two processes each opened the study with a seed of its own
    assert study.user_attrs[attrs.RUNS] == 3
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8
    assert {p.name for p in (folder / "trials").glob("*.json")} == {f"{n}.json" for n in range(8)}
    # each records how long its worker stood free before it, and how much of that went on waiting
    # for the proposal (part of it); a worker's first candidate of the run followed no other
    times = [t.user_attrs[attrs.WORKER_TIME] for t in trials]
    assert all(x["busy_s"] > 0 and 0 <= x["free_for_proposal_s"] <= x["free_s"] for x in times)
    assert sum(x["free_s"] == 0 for x in times) >= 2 and not any(x["in_order"] for x in times)


class KillsAProposer(InProcessPool):
    """Kills the run's first proposal process (as the kernel's OOM killer would) at the first wait
    for a result."""

    def wait(self, refs: list[Ref], timeout: float | None) -> list[Ref]:
        import multiprocessing

        for proc in multiprocessing.active_children():
            if proc.name == "basin-proposer-0" and proc.is_alive():
                proc.kill()
                proc.join(WAIT_S)
        return super().wait(refs, timeout)


@pytest.mark.slow
def test_a_proposal_process_that_dies_stops_the_run_with_its_way_on(fault_zoo, tmp_path):
    from search.proposers import ProposerError

    folder = tmp_path / "killed"
    with pytest.raises(ProposerError, match=r"basin-proposer-0 died .*basin resume"):
        run_study(
            _config(fault_zoo, folder, proposers=2, n_trials=6),
            progress=False,
            pool=lambda spec, workers, cls=None: KillsAProposer(spec, workers.count, cls),
        )
    # nothing is lost: the run's candidates and proposals are queued again, and a run without
    # proposal processes finishes the budget
    study = run_study(
        _config(fault_zoo, folder, n_trials=6),
        resume=True,
        progress=False,
        pool=lambda spec, workers, cls=None: InProcessPool(spec, workers.count, cls),
    )
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len(done) == 6
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def test_proposal_processes_and_trial_order_exclude_each_other(tmp_path):
    from search.config import ConfigError

    with pytest.raises(
        (ConfigError, ValueError), match="proposers: 0 keeps the study reproducible"
    ):
        config_from_dict(
            {
                "study": {"name": "x", "output_dir": str(tmp_path)},
                "models": {"base": "b", "finetunes": ["a"]},
                "evaluator": {"tasks": ["t"]},
                "sampler": {"proposers": 2, "reproducible": True},
            }
        )


# --- what the workers waited for (search/summary.py driver_line) ---------------------------------


def _trials(*specs: tuple) -> list[optuna.trial.FrozenTrial]:
    """Finished trials with worker times (busy_s, free_s, free_for_proposal_s[, in_order])."""
    made = []
    for number, (busy, free, proposal, *in_order) in enumerate(specs):
        times = {"busy_s": busy, "free_s": free, "free_for_proposal_s": proposal}
        trial = optuna.trial.create_trial(
            value=0.5, user_attrs={attrs.WORKER_TIME: {**times, "in_order": bool(in_order)}}
        )
        trial.number = number
        made.append(trial)
    return made


def test_the_driver_line_says_what_the_workers_waited_for_and_what_to_do():
    from search.summary import driver_line

    assert driver_line(_trials()) is None  # a study from before the times were recorded
    # 1% free: said, without advice
    assert driver_line(_trials(*[(0.99, 0.01, 0.005)] * 10)) == (
        "workers stood free 1.0% of their time between candidates (0.5% waiting for proposals)"
    )
    # most of it waiting for proposals: the sampler is the bottleneck
    line = driver_line(_trials(*[(0.8, 0.2, 0.15)] * 10))
    assert line.startswith("workers stood free 20.0% of their time between candidates (15.0%")
    assert "sampler.proposers: N" in line
    # free, but not for proposals: the run's own work between candidates
    line = driver_line(_trials(*[(0.8, 0.2, 0.01)] * 10))
    assert "the run's own work between candidates" in line and "proposers" not in line
    # both over 5%: the larger part names the way out
    line = driver_line(_trials(*[(0.6, 0.4, 0.1)] * 10))
    assert "(10.0% waiting" in line and "the run's own work" in line and "proposers" not in line
    # proposals in trial order: why, not a remedy that does not apply
    line = driver_line(_trials(*[(0.8, 0.2, 0.15, True)] * 10))
    assert "in trial order" in line and "proposers" not in line


def test_a_long_study_s_driver_line_also_gives_its_latest_window():
    from search.summary import RECENT, driver_line

    # the first candidates ran without waiting; the latest wait for the sampler (it grows)
    trials = _trials(*[(1.0, 0.0, 0.0)] * RECENT, *[(0.5, 0.5, 0.5)] * RECENT)
    line = driver_line(trials)
    assert "free 25.0% of their time" in line  # 50 s of 200
    assert f"over the last {RECENT}: 50.0% (50.0%)" in line
    assert "sampler.proposers: N" in line  # the advice reads the latest window
    # with the windows the other way round, the latest say nothing is wrong
    trials = _trials(*[(0.5, 0.5, 0.5)] * RECENT, *[(1.0, 0.0, 0.0)] * RECENT)
    assert driver_line(trials).endswith(f"over the last {RECENT}: 0.0% (0.0%)")
