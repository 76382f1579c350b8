"""Reliability scenarios on the real command line: kills, worker faults, concurrent runners, export.

Each drives `basin` in subprocesses on a FaultZoo and returns a report of what it saw; the tests
assert on the reports and tests/benchmarks/reliability.py prints them. Every step waits for an
event (a journal line, a record, a file, a process exit), never for a fixed time, so a loaded
machine makes a scenario slower, not wrong.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.fault_zoo import FaultZoo, study_config, study_with_one_trial, write_config
from tests.support.runs import (
    COMPLETE_OP,
    HANG_S,
    PROMOTED_OP,
    journal_text,
    kill_tree,
    process_alive,
    ray_exposure,
    runner_mark,
    start_basin,
    tail,
    wait_for,
    wait_runs,
    worker_pid,
)
from tests.support.views import (
    DONE,
    TrialView,
    changed_complete,
    integrity_problems,
    records_view,
    storage_view,
)


def start_runners_together(
    zoo: FaultZoo, config: Path, folder: Path, logs: list[Path], *, then: str = "ok"
) -> list[subprocess.Popen]:
    """`basin run CONFIG` once per log, every evaluation held until each run has asked for a trial;
    then the hook is set to `then`. (Unheld, a run whose Ray starts first can spend the whole budget
    before the other has a worker up, most of all on a busy machine.)"""
    zoo.set_mode("hold")
    procs = [start_basin(["run", str(config)], log) for log in logs]
    text = journal_text(folder)  # (before they can ask: a pid may be that of an earlier run)
    seen = [text.count(runner_mark(p.pid)) for p in procs]
    try:
        for proc, n, log in zip(procs, seen, logs):
            wait_for(
                lambda p=proc, n=n: journal_text(folder).count(runner_mark(p.pid)) > n,
                proc,
                f"run {proc.pid} to ask for a trial",
                log,
                poll_s=0.2,
            )
    except BaseException:
        for proc in procs:
            kill_tree(proc)
        raise
    finally:
        zoo.set_mode(then)
    return procs


# --- fault 1: SIGKILL `basin run` / `basin resume` at random moments ------------------------------


@dataclass
class KillReport:
    kills: int = 0
    moments: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # COMPLETE trials changed or gone after a kill
    leaked: list[str] = field(default_factory=list)  # processes alive after kill_tree
    integrity: list[str] = field(default_factory=list)
    requeued: int = 0  # trials failed as stopped and queued again
    held: list[int] = field(default_factory=list)  # trials RUNNING right after a kill
    # "rung" kills that left a candidate RUNNING with a rung's value reported
    held_between_rungs: int = 0
    # held trials not failed and queued again in the end
    not_requeued: list[int] = field(default_factory=list)
    complete: int = 0  # COMPLETE or PRUNED
    pruned: int = 0
    budget: int = 0
    final_rc: int | None = None  # of the last run (the worst of them, with final_runners=2)
    # COMPLETE trials per final runner
    final_by_runner: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0


ALL_MOMENTS = ("early", "asked", "completing")


MF_OBJECTIVES = {
    "mode": "single",
    "items": [{"task": "toy_pair", "weight": 0.5}, {"task": "toy_next", "weight": 0.5}],
}
MF_RUNGS = {"rungs": [8, 16]}  # of the fault zoo's 30 items per task


def kill_and_resume(
    zoo: FaultZoo,
    root: Path,
    *,
    kills: int = 10,
    n_trials: int = 60,
    seed: int = 0,
    moments: tuple[str, ...] = ALL_MOMENTS,
    early_s: tuple[float, float] = (0.5, 8.0),
    final_runners: int = 1,
    fidelity: dict | None = None,
    say: Callable[[str], None] = lambda s: None,
) -> KillReport:
    """Start the study, SIGKILL it (and its Ray) at a random moment, resume, ... `kills` times, then
    let the last resume finish. Kill moments rotate through `moments`: early (a random time in
    `early_s` after the start: imports, setup, Ray starting), soon after this run asked its first
    trial (its worker is up), soon after it completed one (trials being told and recorded).
    With final_runners=2 the study is finished by two `basin run` of its config at once, each
    holding a trial before any candidate is scored, so that both take part. With `fidelity` the
    study is a single-objective multi-fidelity one (kills land between rungs too), and PRUNED
    trials count as finished."""
    rng, t0 = random.Random(seed), time.monotonic()
    folder, log = root / "study", root / "kills.log"
    extra = {} if fidelity is None else {"fidelity": fidelity, "objectives": MF_OBJECTIVES}
    config = write_config(
        root / "kills.yaml",
        study_config(
            zoo, folder, name="kills", hooked=True, budget={"n_trials": n_trials}, **extra
        ),
    )
    zoo.set_mode("ok")
    report, ever_complete = KillReport(budget=n_trials), {}
    attempt = 0
    while report.kills < kills:
        mode = moments[attempt % len(moments)]
        attempt += 1
        if attempt > 2 * kills + 5:
            raise RuntimeError(f"only {report.kills} kills in {attempt} attempts\n{tail(log)}")
        before, before_recs = storage_view(folder), records_view(folder)
        ever_complete.update({t.number: t for t in before if t.state in DONE})
        args = (
            ["resume", str(folder)] if (folder / "config.yaml").is_file() else ["run", str(config)]
        )
        proc = start_basin(
            [*args, "--set", f"budget.n_trials={report.budget}"] if args[0] == "resume" else args,
            log,
        )
        started, text = time.monotonic(), journal_text(folder)
        n_asked, n_complete = text.count(runner_mark(proc.pid)), text.count(COMPLETE_OP)
        if mode == "early":
            delay = rng.uniform(*early_s)
            alive = wait_for(
                lambda: time.monotonic() - started >= delay,  # noqa: B023
                proc,
                "the kill moment",
                log,
            )
        elif mode == "asked":
            alive = wait_for(
                lambda: journal_text(folder).count(runner_mark(proc.pid)) > n_asked,  # noqa: B023
                proc,
                "the first ask",
                log,
            )
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)  # a random moment after the event, not a wait for one
        elif mode == "rung":
            # multi-fidelity: just after a promotion, the candidate held between rungs
            n_promoted = text.count(PROMOTED_OP)
            alive = wait_for(
                lambda: journal_text(folder).count(PROMOTED_OP) > n_promoted,  # noqa: B023
                proc,
                "a promotion",
                log,
            )
            delay = 0.0
        else:
            alive = wait_for(
                lambda: journal_text(folder).count(COMPLETE_OP) > n_complete,  # noqa: B023
                proc,
                "the first completed trial",
                log,
            )
            delay = rng.uniform(0.0, 1.0)
            time.sleep(delay)
        if not alive or proc.poll() is not None:
            # it finished the budget before the kill: raise the budget
            if proc.wait() != 0:
                raise RuntimeError(f"basin {args[0]} failed (rc {proc.returncode})\n{tail(log)}")
            report.budget += 20
            continue
        report.leaked += kill_tree(proc)
        report.kills += 1
        report.moments.append(f"{mode}+{delay:.2f}s@{time.monotonic() - started:.1f}s")
        say(f"kill {report.kills}: {report.moments[-1]}")
        after, after_recs = storage_view(folder), records_view(folder)
        report.lost += changed_complete(before, before_recs, after, after_recs)
        report.held += [t.number for t in after if t.state == "RUNNING"]
        report.held_between_rungs += mode == "rung" and any(
            t.state == "RUNNING" and t.rungs for t in after
        )
    try:
        if final_runners == 1:
            procs = [
                start_basin(
                    ["resume", str(folder), "--set", f"budget.n_trials={report.budget}"], log
                )
            ]
        else:  # `basin run CONFIG` on an existing study resumes it; budget as raised above
            write_config(
                config,
                study_config(
                    zoo,
                    folder,
                    name="kills",
                    hooked=True,
                    budget={"n_trials": report.budget},
                    **extra,
                ),
            )
            procs = start_runners_together(
                zoo, config, folder, [root / f"final-{i}.log" for i in range(final_runners)]
            )
        rcs, leaked = wait_runs(procs, folder)
    finally:
        zoo.set_mode("ok")
    report.final_rc, report.leaked = max(rcs), report.leaked + leaked
    final, final_recs = storage_view(folder), records_view(folder)
    report.final_by_runner = {
        p.pid: sum(t.state in DONE and t.runner == p.pid for t in final) for p in procs
    }
    ever: list[TrialView] = list(ever_complete.values())
    report.lost += changed_complete(ever, {}, final, final_recs)
    report.integrity = integrity_problems(final, final_recs)
    report.integrity += [
        f"trial {t.number} is still RUNNING" for t in final if t.state == "RUNNING"
    ]
    requeued = {t.number for t in final if t.state == "FAIL" and "queued again" in (t.error or "")}
    report.requeued = len(requeued)
    report.not_requeued = [n for n in report.held if n not in requeued]
    report.complete = sum(t.state in DONE for t in final)
    report.pruned = sum(t.state == "PRUNED" for t in final)
    report.seconds = time.monotonic() - t0
    return report


# --- fault 2: a worker killed mid-candidate, an evaluation that raises, a candidate past its
#     time limit, NaN merges: one study, driven phase by phase through the hooked tasks ---------


@dataclass
class FaultReport:
    rc: int | None = None
    seconds: float = 0.0
    killed_pid: int | None = None
    timed_out_pid: int | None = None
    errors: dict[str, list[int]] = field(default_factory=dict)  # kind -> trial numbers
    workers: list[str] = field(default_factory=list)  # worker field of COMPLETE trials, in order
    complete: int = 0
    budget: int = 0
    unexpected: list[str] = field(default_factory=list)  # failures of no injected kind
    integrity: list[str] = field(default_factory=list)
    # (process, address) of the run's servers
    listening: list[tuple[str, str]] = field(default_factory=list)
    # node addresses on the Ray processes' command lines
    node_ips: set[str] = field(default_factory=set)
    output: str = ""  # what the run printed (its terminal)
    ray_log: str = ""  # what Ray's processes wrote, kept in the study folder


FAULT_KINDS = {  # error text -> kind
    "injected evaluation failure": "raised",
    "worker died": "worker_died",
    "candidate_timeout": "timeout",
    "NaN or inf": "nan",
}
# With the loud fine-tune, task vectors scaled by lambda ~1e38 overflow float32: every
# task_arithmetic candidate is non-finite (NonFiniteMergeError in the worker), while linear
# (normalized weights) stays finite. The random sampler's draws are fixed by its seed; with this one
# no long run of task_arithmetic draws can stop the study as "all failing".
FAULT_SPACE = {
    "methods": ["linear", "task_arithmetic"],
    "weight": [0.5, 1.0],
    "lambda": [1.0e38, 3.0e38],
}
FAULT_SAMPLER = {"name": "random", "seed": 8}
# The candidate time limit: only the candidate held on purpose may reach it, so it sits far above
# what a candidate (well under a second here) takes on a loaded machine.
CANDIDATE_TIMEOUT_S = 20.0


def worker_faults(
    zoo: FaultZoo,
    root: Path,
    *,
    n_trials: int = 14,
    timeout_s: float = CANDIDATE_TIMEOUT_S,
    say: Callable[[str], None] = lambda s: None,
) -> FaultReport:
    t0, folder, log = time.monotonic(), root / "faults", root / "faults.log"
    config = write_config(
        root / "faults.yaml",
        study_config(
            zoo,
            folder,
            name="faults",
            hooked=True,
            space=FAULT_SPACE,
            sampler=FAULT_SAMPLER,
            baselines=False,
            models={"finetunes": [str(zoo.loud), *map(str, zoo.finetunes[1:])]},
            budget={"n_trials": n_trials},
            workers={"count": 1, "candidate_timeout": timeout_s},
        ),
    )
    zoo.set_mode("ok")
    zoo.busy.unlink(missing_ok=True)
    report = FaultReport(budget=n_trials)
    proc = start_basin(["run", str(config)], log)

    def failed_with(text: str) -> bool:
        return any(text in (r.get("error") or "") for r in records_view(folder).values())

    def completed_by_another(pid: int) -> bool:  # a COMPLETE trial from a worker other than pid
        return any(
            r["state"] == "COMPLETE" and worker_pid(r["worker"]) != pid
            for r in records_view(folder).values()
        )

    def wait(predicate: Callable[[], bool], what: str) -> None:
        wait_for(predicate, proc, what, log, poll_s=0.1)

    try:
        # a completed trial names its worker "host:pid/index": that pid is the one to kill later
        wait(
            lambda: any(r["state"] == "COMPLETE" for r in records_view(folder).values()),
            "a first COMPLETE trial",
        )
        first = next(
            r
            for r in sorted(records_view(folder).values(), key=lambda r: r["number"])
            if r["state"] == "COMPLETE"
        )
        first_worker = worker_pid(first["worker"])
        report.listening, report.node_ips = ray_exposure(proc.pid)
        say(f"worker pid {first_worker}; the next evaluation raises")
        zoo.set_mode("raise")
        wait(lambda: failed_with("injected evaluation failure"), "the raising evaluation")
        say("next: a worker SIGKILLed in the middle of a candidate")
        zoo.set_mode("hang")
        wait(zoo.busy.exists, "a candidate in evaluation")
        report.killed_pid = int(zoo.busy.read_text())
        assert report.killed_pid == first_worker, (report.killed_pid, first_worker)
        os.kill(first_worker, signal.SIGKILL)
        zoo.set_mode("ok")
        zoo.busy.unlink()
        wait(lambda: failed_with("worker died"), "the dead worker's trial to fail")
        # (the hook also runs while a worker loads its evaluator: wait for the new one to be at
        # work)
        wait(lambda: completed_by_another(first_worker), "a trial completed by the new worker")
        say("next: a candidate past workers.candidate_timeout")
        zoo.set_mode("hang")
        wait(zoo.busy.exists, "a candidate on the new worker")
        report.timed_out_pid = int(zoo.busy.read_text())
        wait(lambda: not process_alive(report.timed_out_pid), "the timeout to stop the worker")
        zoo.set_mode("ok")
        wait(lambda: failed_with("candidate_timeout"), "the timed-out trial to fail")
        wait(
            lambda: (
                completed_by_another(first_worker)
                and any(
                    r["state"] == "COMPLETE"
                    and worker_pid(r["worker"]) not in (first_worker, report.timed_out_pid)
                    for r in records_view(folder).values()
                )
            ),
            "a trial completed by the worker restarted after the timeout",
        )
        say("waiting for the study to finish its budget")
        (report.rc,), _ = wait_runs([proc], folder)
    finally:
        zoo.set_mode("ok")
        if proc.poll() is None:
            kill_tree(proc)
    recs = records_view(folder)
    for n, r in sorted(recs.items()):
        if r["state"] == "COMPLETE":
            report.workers.append(r["worker"])
            continue
        kinds = [k for text, k in FAULT_KINDS.items() if text in (r["error"] or "")]
        if kinds:
            report.errors.setdefault(kinds[0], []).append(n)
        else:
            report.unexpected.append(f"trial {n}: {r['error']}")
    report.complete = sum(r["state"] == "COMPLETE" for r in recs.values())
    report.integrity = integrity_problems(storage_view(folder), recs)
    report.output = log.read_text(errors="replace")
    ray_log = folder / "ray.log"
    report.ray_log = ray_log.read_text(errors="replace") if ray_log.is_file() else ""
    report.seconds = time.monotonic() - t0
    return report


# --- fault 3: two runners on one study at once ----------------------------------------------------


@dataclass
class ConcurrentReport:
    rcs: tuple = ()
    by_runner: dict[int, int] = field(default_factory=dict)  # runner pid -> COMPLETE trials
    complete: int = 0
    budget: int = 0
    integrity: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    seconds: float = 0.0


def concurrent_runners(
    zoo: FaultZoo, root: Path, *, n_trials: int = 16, pace_s: float = 0.01
) -> ConcurrentReport:
    """Two `basin run` of one config started together, both holding a trial before any candidate is
    scored; then candidates paced (pace_s per item) so that their turns interleave."""
    t0, folder = time.monotonic(), root / "shared"
    config = write_config(
        root / "shared.yaml",
        study_config(zoo, folder, name="shared", hooked=True, budget={"n_trials": n_trials}),
    )
    report = ConcurrentReport(budget=n_trials)
    try:
        procs = start_runners_together(
            zoo,
            config,
            folder,
            [root / f"shared-{i}.log" for i in range(2)],
            then=f"sleep {pace_s}",
        )
        report.rcs, report.leaked = wait_runs(procs, folder)
    finally:
        zoo.set_mode("ok")
    trials, recs = storage_view(folder), records_view(folder)
    report.by_runner = dict(Counter(t.runner for t in trials if t.state == "COMPLETE"))
    report.complete = sum(t.state == "COMPLETE" for t in trials)
    report.integrity = integrity_problems(trials, recs)
    report.integrity += [
        f"trial {t.number} is still {t.state}" for t in trials if t.state in ("RUNNING",)
    ]
    baselines = Counter(t.baseline for t in trials if t.baseline and t.retry_of is None)
    report.integrity += [f"baseline {b} queued {n} times" for b, n in baselines.items() if n > 1]
    report.seconds = time.monotonic() - t0
    return report


# --- fault 4: `basin export` killed in the middle -------------------------------------------------


@dataclass
class ExportKillReport:
    killed_after_s: float = 0.0
    target_exists: bool = True
    # the temporary folder a SIGKILL cannot remove
    partial_left: list[str] = field(default_factory=list)
    clean_export_s: float = 0.0
    clean_export_ok: bool = False
    # what the next export did not sweep
    partial_after_clean: list[str] = field(default_factory=list)


def export_killed(big: FaultZoo, root: Path, *, clean: bool = True) -> ExportKillReport:
    """Kill `basin export` while its partial folder exists; the target must not appear. Then (clean)
    export again, uninterrupted, to show the study is still exportable."""
    folder, number = study_with_one_trial(big, root / "exp-study")
    target, log = root / "exported", root / "export.log"
    report = ExportKillReport()
    proc = start_basin(["export", str(folder), "--trial", str(number), "--out", str(target)], log)
    started = time.monotonic()
    partial = lambda: list(root.glob(f".{target.name}.partial-*"))  # noqa: E731
    if wait_for(lambda: bool(partial()), proc, "the export's partial folder", log, poll_s=0.005):
        # stopped the moment its partial folder is seen, so the kill lands while it is there
        # however long the kill itself takes on a busy machine
        os.killpg(proc.pid, signal.SIGSTOP)
    report.killed_after_s = time.monotonic() - started
    kill_tree(proc)
    report.target_exists = target.exists()
    report.partial_left = [p.name for p in partial()]
    if not clean:
        return report
    started = time.monotonic()
    proc = start_basin(["export", str(folder), "--trial", str(number), "--out", str(target)], log)
    report.clean_export_ok = proc.wait(timeout=HANG_S) == 0 and (target / "config.json").is_file()
    report.clean_export_s = time.monotonic() - started
    report.partial_after_clean = [p.name for p in partial()]
    return report
