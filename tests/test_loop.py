"""The study loop's edges: proposals that never become recipes, the report's choice on a Pareto
front, and the demo config built in code (real tiny Llama, real Ray, real Optuna storage)."""

from __future__ import annotations

import json
import os
import socket

import optuna
import pytest
import yaml
from optuna.trial import TrialState, create_trial

import search.loop as loop_mod
from search.demo import demo_config, load_demo_config
from search.folder import load_study_folder
from search.loop import retry_lost
from search.pool import in_process_pool
from search.recovery import queue_again
from search.report import chosen_trial
from search.result import WorkerResult
from tests.support.runs import REPO
from tests.support.tiny import write_text_corpus


@pytest.mark.slow
def test_a_proposal_that_never_becomes_a_recipe_ends_the_study_instead_of_looping(
    llama_set, tmp_path, monkeypatch
):
    """Such failures used to count toward neither the failure window nor the budget: the loop asked
    forever."""

    def broken(params, space):
        raise ValueError("this proposal cannot be merged")

    monkeypatch.setattr(loop_mod, "recipe_from_params", broken)
    folder = tmp_path / "broken"
    config = {
        "study": {"name": "broken", "output_dir": str(folder)},
        "models": {"base": str(llama_set.base), "finetunes": [str(p) for p in llama_set.finetunes]},
        "space": {"methods": ["task_arithmetic"], "weight": [0.0, 1.0]},
        "evaluator": {
            "kind": "perplexity",
            "text": str(write_text_corpus(tmp_path / "t.txt")),
            "window": 16,
        },
        "objectives": {"items": [{"task": "perplexity", "metric": "nll"}]},
        "budget": {"n_trials": 50},
        "workers": {"count": 1},
        "baselines": False,
    }
    from search.config import config_from_dict

    with pytest.raises(RuntimeError, match="the last 10 candidates all failed"):
        loop_mod.run_study(config_from_dict(config), progress=False, pool=in_process_pool)
    _, study = load_study_folder(folder)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 10 and len(study.trials) == 10
    assert all("this proposal cannot be merged" in t.user_attrs["error"] for t in failed)
    assert sorted(int(p.stem) for p in (folder / "trials").glob("*.json")) == [
        t.number for t in failed
    ]


def test_the_report_picks_the_front_trial_best_on_the_mean_of_signed_objectives():
    """With one objective minimised, the largest plain sum is the worst choice, not the best."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for values in ([0.9, 0.1], [0.95, 0.9], [0.5, 0.05]):
        study.add_trial(create_trial(values=values, params={"x": 0.5}, distributions=dist))
    assert {t.number for t in study.best_trials} == {0, 1, 2}
    assert chosen_trial(study, None).number == 0  # 0.9 - 0.1 beats 0.95 - 0.9 and 0.5 - 0.05
    assert chosen_trial(study, 1).number == 1


def test_the_demo_config_is_built_in_code_and_equals_configs_demo_yaml():
    assert yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()) == demo_config()


def test_the_demo_keeps_both_its_folder_and_the_set_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: nothing is read from configs/
    config = load_demo_config(str(tmp_path / "mine"), ["budget.n_trials=3", "workers.count=1"])
    assert config.study.folder == tmp_path / "mine"
    assert (config.budget.n_trials, config.workers.count) == (3, 1)
    assert config.models.base == ".zoo/seed0/base" and config.objectives.mode == "pareto"


def test_the_generative_demo_config_is_built_in_code_and_equals_configs_demo_generative_yaml():
    assert yaml.safe_load((REPO / "configs" / "demo-generative.yaml").read_text()) == demo_config(
        generative=True
    )


def test_cpu_workers_split_the_cores_but_one_between_them():
    from search.pool import cpu_threads

    assert [cpu_threads(n, cores=16) for n in (1, 2, 4, 8, 16, 32)] == [15, 7, 3, 1, 1, 1]
    assert [cpu_threads(n, cores=2) for n in (1, 2, 3)] == [1, 1, 1]
    assert cpu_threads(1, cores=1) == 1


def test_a_cpu_worker_process_waits_passively_unless_the_user_chose_a_policy(monkeypatch):
    from search.pool import worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    assert worker_env(3) == {
        "OMP_WAIT_POLICY": "PASSIVE",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "3",
        "MKL_NUM_THREADS": "3",
    }
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env(None) == {"OMP_WAIT_POLICY": "ACTIVE", "TOKENIZERS_PARALLELISM": "false"}


def test_a_dead_workers_candidate_runs_once_more_unless_it_timed_out_or_is_such_a_retry_already():
    study = optuna.create_study()
    lost = WorkerResult(error="worker died during the candidate", worker_lost=True)
    first, timed_out = study.ask(), study.ask()
    timed_out.set_user_attr("timed_out", True)
    assert retry_lost(first, lost)
    assert not retry_lost(first, WorkerResult(error="ValueError: a broken merge"))
    assert not retry_lost(timed_out, lost)
    study.tell(first, state=TrialState.FAIL)
    queue_again(study, study.trials[first.number], lost_worker_retry=True)
    retry = study.ask()
    assert retry.user_attrs == {"retry_of": first.number, "lost_worker_retry": True}
    # the candidate itself may kill its worker: not a third time
    assert not retry_lost(retry, lost)


@pytest.mark.slow
def test_the_loop_runs_a_study_on_the_in_process_pool_as_on_ray(fault_zoo, tmp_path):
    """The pool interface's second implementation: the same loop finishes the budget exactly, with
    the baselines first and a record per trial, every candidate scored in this very process."""
    from search.config import config_from_dict
    from search.folder import study_space
    from search.space import baseline_params
    from tests.support.fault_zoo import study_config

    folder = tmp_path / "local"
    config = config_from_dict(study_config(fault_zoo, folder, budget={"n_trials": 7}))
    study = loop_mod.run_study(config, progress=False, pool=in_process_pool)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 7 and len(study.trials) == 7
    baselines = [t for t in complete if t.user_attrs.get("baseline")]
    queued = [name for name, _ in baseline_params(study_space(config))]
    assert sorted(t.user_attrs["baseline"] for t in baselines) == sorted(queued)
    assert {t.number for t in baselines} == set(range(len(queued)))  # queued first
    records = {int(p.stem): json.loads(p.read_text()) for p in (folder / "trials").glob("*.json")}
    assert sorted(records) == list(range(7))
    here = f"{socket.gethostname()}:{os.getpid()}/0"
    assert all(r["worker"] == here and r["state"] == "COMPLETE" for r in records.values())
    assert all(len(r["values"]) == 2 and r["eval_s"] > 0 for r in records.values())


def test_the_report_shows_the_best_searched_trial_not_a_baseline_by_default():
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for directions in (["maximize"], ["maximize", "maximize"]):
        study = optuna.create_study(directions=directions)
        rows = [([0.9] * len(directions), "uniform"), ([0.8] * len(directions), None)]
        rows.append(([0.1, 0.95][: len(directions)], None))
        for values, baseline in rows:
            attrs = {"baseline": baseline} if baseline else {}
            study.add_trial(
                create_trial(values=values, params={"x": 0.5}, distributions=dist, user_attrs=attrs)
            )
        assert chosen_trial(study, None).number == 1  # the baseline 0 is better on every value
        assert chosen_trial(study, 0).number == 0  # asked for by number: shown
