"""A study on a real two-node Ray cluster (tests/support/ray_cluster.py): `basin run --address`
spreads its workers over both nodes, records where each trial ran, and survives losing a node."""

from __future__ import annotations

import pytest

from tests.support.many_machines import node_loss

pytestmark = pytest.mark.slow


def test_a_study_spreads_over_two_nodes_and_finishes_on_the_head_when_the_other_node_dies(
    fault_zoo, tmp_path
):
    """Both nodes complete trials (each trial records its node); then, with a candidate in flight on
    each worker, the second node is SIGKILLed: only its candidate fails, as a lost worker, its
    params run again on the head, and the study finishes its budget there."""
    # a budget the study is still far from when the candidates start to hang: with proposals made
    # ahead, twelve trials can all be done by then
    r = node_loss(fault_zoo, tmp_path, n_trials=40)
    assert r.rc == 0 and r.leaked == [] and r.integrity == []
    assert r.nodes_before == {"node_head", "node_b"}
    assert r.complete == r.budget
    # the candidate in flight on the lost node, and nothing else
    assert len(r.failed) == 1, r.failed
    ((lost, error),) = r.failed.items()
    assert "worker died" in error and "queued again" in error
    assert r.retried_on == {lost: "node_head"}
    assert r.after_on and set(r.after_on) == {"node_head"}  # the study went on, on the head alone
