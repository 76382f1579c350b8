"""Held-out scoring runs its worker as a study's CPU worker runs (its share of the cores as torch
threads, the workers' environment) and builds only the report role's evaluator; where that worker
needs a process of its own (more than one thread, an OpenMP wait policy this process did not start
with) it gets a one-worker Ray pool. Real tiny models and tasks; no timings (see
tests/benchmarks/bench_report.py for those)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import search.heldout as heldout_mod
import search.pool as pool_mod
from search.config import config_from_dict
from search.folder import load_study_folder, trial_recipe, worker_spec
from search.heldout import heldout_pool, read_heldout, score_heldout
from search.pool import InProcessPool, RayPool, in_process_pool
from search.workers import CandidateWorker, WorkerSpec
from tests.support.fault_zoo import study_config


@pytest.fixture(scope="module")
def finished(fault_zoo, tmp_path_factory) -> tuple[Path, WorkerSpec, dict[int, dict]]:
    """A finished study of three workers (their count must not matter to held-out scoring), run
    in this process; its spec and the recipes of its trials."""
    from optuna.trial import TrialState

    from merging.recipe import recipe_to_dict
    from search.loop import run_study

    folder = tmp_path_factory.mktemp("heldout") / "study"
    data = study_config(fault_zoo, folder, budget={"n_trials": 3}, workers={"count": 3})
    run_study(config_from_dict(data), progress=False, pool=in_process_pool)
    config, study = load_study_folder(folder)
    done = study.get_trials(states=(TrialState.COMPLETE,))  # (the other baselines wait)
    recipes = {t.number: recipe_to_dict(trial_recipe(config, t)) for t in done}
    assert len(recipes) == 3
    return folder, worker_spec(config), recipes


@pytest.fixture(scope="module")
def spec(fault_zoo, tmp_path_factory) -> WorkerSpec:
    """The worker spec of a study of three workers over tiny models (no study is run)."""
    folder = tmp_path_factory.mktemp("spec") / "study"
    return worker_spec(config_from_dict(study_config(fault_zoo, folder, workers={"count": 3})))


class Recording(CandidateWorker):
    """A CandidateWorker that keeps itself, and what it reported and saw as it scored."""

    built: list[Recording] = []

    def __init__(self, spec: WorkerSpec, index: int = 0) -> None:
        super().__init__(spec, index)
        self.seen: list[dict[str, Any]] = []
        Recording.built.append(self)

    def run(self, recipe, role="search", items=None, rung=False):
        self.seen.append(
            {**self.info(), "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM")}
        )
        return super().run(recipe, role, items, rung)


@pytest.mark.slow  # a study and held-out scores of real tiny models, in this process
def test_held_out_scores_come_from_a_report_only_worker_with_a_cpu_workers_threads(
    finished, monkeypatch
):
    import torch

    folder, spec, recipes = finished
    split = "test"
    monkeypatch.setattr(pool_mod, "cpu_slots", lambda: 2)  # a 2-core machine: 1 thread a worker
    monkeypatch.setattr(pool_mod, "CandidateWorker", Recording)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.setattr(Recording, "built", [])
    threads_before = torch.get_num_threads()
    scores = score_heldout(folder, spec, recipes, split, progress=False)

    assert sorted(scores) == sorted(recipes) and scores == read_heldout(folder, split)
    (worker,) = Recording.built  # one worker in this process, whatever workers.count says
    assert len(worker.seen) == len(recipes)
    for seen in worker.seen:
        # the threads and runtime environment a CPU worker gets (search.pool.worker_env)
        assert seen["threads"] == pool_mod.cpu_threads(1) == 1
        assert seen["tokenizers_parallelism"] == "false"
        assert seen["evaluators"] == ["report"]  # built at start, before the first finalist
    assert set(worker.evaluators) == {"report"}  # never a search evaluator
    # what the worker set for this process is undone once the scores are in
    assert torch.get_num_threads() == threads_before
    assert "TOKENIZERS_PARALLELISM" not in os.environ


@pytest.mark.slow  # real tiny models
def test_a_report_only_worker_builds_no_search_evaluator_and_a_search_worker_builds_its_own(
    finished,
):
    folder, spec, recipes = finished
    recipe = next(iter(recipes.values()))
    report_only = CandidateWorker(replace(spec, roles=("report",)))
    assert report_only.start_error is None and set(report_only.evaluators) == {"report"}
    assert report_only.run(recipe, "report").ok
    assert set(report_only.evaluators) == {"report"}
    assert report_only.info()["evaluators"] == ["report"]
    # a study's worker builds its search evaluator at start (a task error stops the study there)
    default = CandidateWorker(spec)
    assert spec.roles == ("search",) and set(default.evaluators) == {"search"}


def test_the_held_out_worker_runs_here_only_where_this_process_can_run_it_as_a_worker(
    spec, monkeypatch
):
    """No worker is built: which pool, and the spec its worker would be built from."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(heldout_mod, "RayPool", lambda spec, count: ("ray", spec, count))
    monkeypatch.setattr(pool_mod, "cpu_slots", lambda: 2)
    here = heldout_pool(spec)  # one thread: no OpenMP team, so the wait policy cannot matter
    assert isinstance(here, InProcessPool)
    assert (here.spec.threads, here.spec.roles) == (1, ("report",))

    monkeypatch.setattr(pool_mod, "cpu_slots", lambda: 9)  # one core left over, as for workers
    assert heldout_pool(spec) == ("ray", replace(spec, threads=8, roles=("report",)), 1)
    assert heldout_pool(replace(spec, threads=1)).spec.threads == 1  # workers.threads: 1
    # a process started with the policy a worker gets needs no process of its own
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert heldout_pool(spec).spec.threads == 8
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice: the workers' too
    assert isinstance(heldout_pool(spec), InProcessPool)
    # a GPU does the work: here, with the threads a GPU worker has (torch's default)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(heldout_mod, "resolve_device", lambda device: "cuda")
    on_gpu = heldout_pool(spec)
    assert isinstance(on_gpu, InProcessPool) and on_gpu.spec.threads is None


@pytest.mark.slow  # a local Ray and a worker process
def test_a_held_out_worker_of_more_threads_runs_on_ray_with_a_workers_environment(
    finished, monkeypatch
):
    """Two threads (workers.threads: 2) need OpenMP's passive wait policy, which this process,
    started without it, cannot get: the worker runs in a process of its own, as a study's does."""
    folder, spec, recipes = finished
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    split = "ray-test"  # the folder the scores are kept in: apart from the in-process test's
    pool = heldout_pool(replace(spec, threads=2))
    assert isinstance(pool, RayPool)
    try:
        (info,) = pool.ready()
        assert (info["threads"], info["omp_wait_policy"]) == (2, "PASSIVE")
        assert info["evaluators"] == ["report"] and info["pid"] != os.getpid()
        scores = score_heldout(folder, spec, recipes, split, progress=False, pool=pool)
    finally:
        pool.shutdown()
    assert sorted(scores) == sorted(recipes) and scores == read_heldout(folder, split)
