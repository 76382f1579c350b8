"""Many-machine scenarios on real servers: runners on their own folders sharing a PostgreSQL study
(tests/support/postgres.py), a runner that dies among them, and a Ray cluster that loses a node
(tests/support/ray_cluster.py). Each "host" is a `basin run` with its own study folder and its own
Ray, as on separate machines; only the database (or the cluster) is shared.

tests/test_postgres.py and tests/test_cluster.py assert on these reports;
tests/benchmarks/reliability.py prints them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tests.support.fault_zoo import FaultZoo, study_config, write_config
from tests.support.ray_cluster import ray_cluster
from tests.support.runs import kill_tree, start_basin, tail, wait_for, wait_runs
from tests.support.views import integrity_problems, records_view, storage_view


def runner_pids(url: str, name: str) -> Counter:
    """Trials per runner pid in the study (empty before the study exists)."""
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return Counter()
    return Counter(
        (t.user_attrs.get("runner") or {}).get("pid") for t in study.get_trials(deepcopy=False)
    )


def _hosts(
    zoo: FaultZoo,
    root: Path,
    url: str,
    name: str,
    n: int,
    n_trials: int,
    sections: dict | None = None,
    **study: object,
) -> tuple[list, list, list]:
    folders = [root / f"host{i}" for i in range(n)]
    configs = [
        write_config(
            root / f"host{i}.yaml",
            study_config(
                zoo,
                folders[i],
                name=name,
                hooked=True,
                budget={"n_trials": n_trials},
                study={"name": name, "output_dir": str(folders[i]), "storage": url, **study},
                **(sections or {}),
            ),
        )
        for i in range(n)
    ]
    return folders, configs, [root / f"host{i}.log" for i in range(n)]


def _start_holding(zoo: FaultZoo, configs: list, logs: list, url: str, name: str) -> list:
    """Start the runners; evaluations wait until every runner holds a trial, so all take part."""
    zoo.set_mode("hold")
    procs = [start_basin(["run", str(c)], log) for c, log in zip(configs, logs)]
    for proc, log in zip(procs, logs):
        wait_for(
            lambda p=proc: runner_pids(url, name)[p.pid] > 0,
            proc,
            f"run {proc.pid} to ask",
            log,
            poll_s=0.2,
        )
    return procs


@dataclass
class SharedReport:
    hosts: int = 0
    rcs: tuple = ()
    budget: int = 0
    complete: int = 0
    by_runner: dict[int, int] = field(default_factory=dict)  # pid -> COMPLETE trials
    numbers_ok: bool = False  # trial numbers 0..n-1, each once
    # params completed twice, baselines queued twice
    duplicates: list[str] = field(default_factory=list)
    # trials whose record is not (only) in its runner's folder
    records_elsewhere: list[int] = field(default_factory=list)
    integrity: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def overshoot(self) -> int:
        return self.complete - self.budget


def shared_study(
    zoo: FaultZoo,
    root: Path,
    url: str,
    *,
    hosts: int = 2,
    n_trials: int = 14,
    name: str = "shared-pg",
    sections: dict | None = None,
) -> SharedReport:
    """`hosts` runners, each on its own folder and Ray, share one PostgreSQL study until its
    budget; `sections` update the config's sections (study_config)."""
    t0 = time.monotonic()
    folders, configs, logs = _hosts(zoo, root, url, name, hosts, n_trials, sections)
    try:
        procs = _start_holding(zoo, configs, logs, url, name)
        zoo.set_mode("sleep 0.01")
        rcs, leaked = wait_runs(procs, folders[0])
    finally:
        zoo.set_mode("ok")
    report = SharedReport(hosts=hosts, rcs=rcs, budget=n_trials, leaked=leaked)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    report.numbers_ok = [t.number for t in trials] == list(range(len(trials)))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    report.complete = len(complete)
    report.by_runner = dict(Counter(t.user_attrs["runner"]["pid"] for t in complete))
    report.duplicates = [
        f"params {p} completed {n} times"
        for p, n in Counter(str(t.params) for t in complete).items()
        if n > 1
    ]
    baselines = Counter(
        t.user_attrs.get("baseline")
        for t in trials
        if t.user_attrs.get("baseline") and t.user_attrs.get("retry_of") is None
    )
    report.duplicates += [f"baseline {b} queued {n} times" for b, n in baselines.items() if n > 1]
    by_pid = {p.pid: f for p, f in zip(procs, folders)}
    recs = {f: records_view(f) for f in folders}
    for t in complete:
        own = by_pid.get(t.user_attrs["runner"]["pid"])
        if (
            own is None
            or recs[own].get(t.number, {}).get("values") != list(t.values)
            or any(t.number in recs[f] for f in folders if f != own)
        ):
            report.records_elsewhere.append(t.number)
    merged = {n: r for f in folders for n, r in recs[f].items()}
    report.integrity = integrity_problems(storage_view(folders[0]), merged)
    report.seconds = time.monotonic() - t0
    if any(rcs):
        report.integrity.append("a runner failed:\n" + "\n".join(tail(log) for log in logs))
    return report


@dataclass
class SilentReport:
    rc: int | None = None
    heartbeat_s: int = 0
    grace_s: float = 0.0  # Optuna's grace period: twice the heartbeat interval
    held: list[int] = field(default_factory=list)  # trials the killed runner held
    # from each held trial's last heartbeat to its failure as silent
    requeue_s: list[float] = field(default_factory=list)
    retries: dict[int, int] = field(default_factory=dict)  # held trial -> its retries
    # held trials failed for another reason, or not at all
    not_silent: list[str] = field(default_factory=list)
    complete: int = 0
    budget: int = 0
    running_left: int = 0
    numbers_ok: bool = False
    seconds: float = 0.0


def silent_runner(
    zoo: FaultZoo,
    root: Path,
    url: str,
    *,
    heartbeat_s: int = 2,
    n_trials: int = 12,
    name: str = "silent-pg",
) -> SilentReport:
    """Runner A is SIGKILLed (with its Ray) while it holds a trial; runner B, on its own folder,
    must find the trial's heartbeat silent past the grace period and requeue it, whatever A's
    host."""
    t0 = time.monotonic()
    folders, configs, logs = _hosts(zoo, root, url, name, 2, n_trials, heartbeat_s=heartbeat_s)
    report = SilentReport(heartbeat_s=heartbeat_s, grace_s=2.0 * heartbeat_s, budget=n_trials)
    try:
        procs = _start_holding(zoo, configs, logs, url, name)
        study = optuna.load_study(study_name=name, storage=url)
        held = {
            t.number: t._trial_id
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("runner", {}).get("pid") == procs[0].pid
        }
        report.held = sorted(held)
        if kill_tree(procs[0]):
            raise RuntimeError("the killed runner left processes behind")
        killed_at, silent_at_kill = dt.datetime.now(), _silence_s(url, held)
        zoo.set_mode("sleep 0.02")
        (report.rc,), _ = wait_runs(procs[1:], folders[1])
    finally:
        zoo.set_mode("ok")
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    report.numbers_ok = [t.number for t in trials] == list(range(len(trials)))
    report.complete = sum(t.state == TrialState.COMPLETE for t in trials)
    report.running_left = sum(t.state == TrialState.RUNNING for t in trials)
    for number in report.held:
        dead = trials[number]
        report.retries[number] = sum(t.user_attrs.get("retry_of") == number for t in trials)
        if dead.state != TrialState.FAIL or "no heartbeat" not in dead.user_attrs.get("error", ""):
            report.not_silent.append(
                f"trial {number}: {dead.state.name} {dead.user_attrs.get('error')}"
            )
        elif dead.datetime_complete is not None:
            report.requeue_s.append(
                silent_at_kill[number] + (dead.datetime_complete - killed_at).total_seconds()
            )
    report.seconds = time.monotonic() - t0
    if report.rc:
        report.not_silent.append("the surviving runner failed:\n" + tail(logs[1]))
    return report


def _silence_s(url: str, trials: dict[int, int]) -> dict[int, float]:
    """Seconds since each trial's last heartbeat (number -> trial id in, number -> seconds out), by
    the database's clock, which is the clock Optuna's heartbeats and their grace period use."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text(
        "SELECT EXTRACT(EPOCH FROM (now() - heartbeat)) FROM trial_heartbeats WHERE trial_id = :id"
    )
    with engine.connect() as conn:
        return {n: float(conn.execute(query, {"id": i}).scalar_one()) for n, i in trials.items()}


@dataclass
class NodeLossReport:
    rc: int | None = None
    budget: int = 0
    complete: int = 0
    # node names that completed trials before the loss
    nodes_before: set = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)  # trial -> error
    # lost trial -> node name its retry completed on
    retried_on: dict[int, str | None] = field(default_factory=dict)
    # node names of trials completed after the loss
    after_on: Counter = field(default_factory=Counter)
    integrity: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    seconds: float = 0.0


def node_loss(zoo: FaultZoo, root: Path, *, n_trials: int = 12) -> NodeLossReport:
    """A study with two workers on a two-node Ray cluster (`basin run --address`); once both nodes
    have completed trials and each worker holds a candidate, the second node is SIGKILLed."""
    t0, folder, log = time.monotonic(), root / "study", root / "run.log"
    config = write_config(
        root / "cluster.yaml",
        study_config(
            zoo,
            folder,
            name="cluster",
            hooked=True,
            baselines=False,
            budget={"n_trials": n_trials},
            workers={"count": 2},
        ),
    )
    report = NodeLossReport(budget=n_trials)
    with ray_cluster(("node_head", "node_b")) as cluster:
        name_of = {node: name for name, node in cluster.ids.items()}
        zoo.set_mode("sleep 0.01")
        try:
            proc = start_basin(["run", str(config), "--address", cluster.address], log)

            def nodes_done() -> set:
                return {
                    name_of.get(r.get("node"))
                    for r in records_view(folder).values()
                    if r["state"] == "COMPLETE"
                }

            wait_for(
                lambda: set(cluster.ids) <= nodes_done(),
                proc,
                "trials completed on both nodes",
                log,
                poll_s=0.5,
            )
            zoo.set_mode("hang")  # every worker's next candidate stays in flight
            wait_for(
                lambda: zoo.blocked() == 2,  # (RUNNING trials include those proposed ahead)
                proc,
                "a candidate in flight on each worker",
                log,
                poll_s=0.5,
            )
            report.nodes_before = nodes_done()
            before = set(records_view(folder))
            report.leaked = cluster.kill("node_b")
            zoo.set_mode("sleep 0.01")
            (report.rc,), leaked = wait_runs([proc], folder)
            report.leaked += leaked
        finally:
            zoo.set_mode("ok")
    recs, trials = records_view(folder), storage_view(folder)
    report.integrity = integrity_problems(trials, recs)
    report.complete = sum(r["state"] == "COMPLETE" for r in recs.values())
    report.failed = {n: r["error"] for n, r in recs.items() if r["state"] == "FAIL"}
    for number in report.failed:
        retry = next((t for t in trials if t.retry_of == number), None)
        report.retried_on[number] = (
            name_of.get(recs.get(retry.number, {}).get("node")) if retry else None
        )
    report.after_on = Counter(
        name_of.get(r.get("node"))
        for n, r in recs.items()
        if r["state"] == "COMPLETE" and n not in before
    )
    report.seconds = time.monotonic() - t0
    if report.rc:
        report.integrity.append("the run failed:\n" + tail(log))
    return report
