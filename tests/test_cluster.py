"""A study on a real two-node Ray cluster (tests/support/ray_cluster.py): `basin run --address`
spreads its workers over both nodes, records where each trial ran, and survives losing a node."""

from __future__ import annotations

import pytest

from tests.support.fault_zoo import shared_fault_zoo, study_config, write_config
from tests.support.ray_cluster import ray_cluster
from tests.support.runs import start_basin, tail, wait_for, wait_runs
from tests.support.views import integrity_problems, records_view, storage_view

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return shared_fault_zoo(tmp_path_factory.getbasetemp())


def test_a_study_spreads_over_two_nodes_and_finishes_on_the_head_when_the_other_node_dies(zoo, tmp_path):
    """Both nodes complete trials (each trial records its node); then, with a candidate in flight on
    each worker, the second node is SIGKILLed: only its candidate fails, as a lost worker, its params
    run again on the head, and the study finishes its budget there."""
    n_trials, folder, log = 12, tmp_path / "study", tmp_path / "run.log"
    config = write_config(tmp_path / "cluster.yaml", study_config(
        zoo, folder, name="cluster", hooked=True, baselines=False, budget={"n_trials": n_trials},
        workers={"count": 2}))
    with ray_cluster(("node_head", "node_b")) as cluster:
        head, other = cluster.ids["node_head"], cluster.ids["node_b"]
        zoo.set_mode("sleep 0.01")
        try:
            proc = start_basin(["run", str(config), "--address", cluster.address], log)

            def nodes_done() -> set:
                return {r.get("node") for r in records_view(folder).values() if r["state"] == "COMPLETE"}

            wait_for(lambda: {head, other} <= nodes_done(), proc, "trials completed on both nodes", log, poll_s=0.5)
            zoo.set_mode("hang")  # every worker's next candidate stays in flight
            wait_for(lambda: sum(t.state == "RUNNING" for t in storage_view(folder)) == 2 and zoo.busy.exists(),
                     proc, "a candidate in flight on each worker", log, poll_s=0.5)
            done_before = {n for n, r in records_view(folder).items()}
            assert cluster.kill("node_b") == []
            zoo.set_mode("sleep 0.01")
            rcs, leaked = wait_runs([proc], folder)
        finally:
            zoo.set_mode("ok")
    assert rcs == (0,) and leaked == [], tail(log)
    recs, trials = records_view(folder), storage_view(folder)
    assert integrity_problems(trials, recs) == []
    complete = {n: r for n, r in recs.items() if r["state"] == "COMPLETE"}
    assert len(complete) == n_trials
    failed = {n: r for n, r in recs.items() if r["state"] == "FAIL"}
    assert len(failed) == 1, failed  # the candidate in flight on the lost node, and nothing else
    (lost, rec), = failed.items()
    assert "worker died" in rec["error"] and "queued again" in rec["error"] and lost not in done_before
    retry = next(t for t in trials if t.retry_of == lost)
    assert complete[retry.number]["node"] == head and complete[retry.number]["params"] == rec["params"]
    after = [r for n, r in complete.items() if n not in done_before]
    assert after and all(r["node"] == head for r in after)  # the study went on, on the head alone
