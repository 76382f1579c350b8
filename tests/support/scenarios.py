"""Reliability scenarios on the real command line: kills, worker faults, concurrent runners, export.

Each drives `basin` in subprocesses on a FaultZoo and returns a report of what it saw; the tests
assert on the reports and tests/benchmarks/reliability.py prints them.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.fault_zoo import FaultZoo, study_config, study_with_one_trial, write_config
from tests.support.runs import (
    COMPLETE_OP,
    journal_text,
    kill_tree,
    process_alive,
    ray_exposure,
    start_basin,
    tail,
    wait_for,
    wait_runs,
    worker_pid,
)
from tests.support.views import changed_complete, integrity_problems, records_view, storage_view

# --- fault 1: SIGKILL `basin run` / `basin resume` at random moments --------------------------------------

@dataclass
class KillReport:
    kills: int = 0
    moments: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # COMPLETE trials changed or gone after a kill
    leaked: list[str] = field(default_factory=list)  # processes alive after kill_tree
    integrity: list[str] = field(default_factory=list)
    requeued: int = 0  # trials failed as stopped and queued again
    complete: int = 0
    budget: int = 0
    final_rc: int | None = None  # of the last run (the worst of them, with final_runners=2)
    final_by_runner: dict[int, int] = field(default_factory=dict)  # COMPLETE trials per final runner
    seconds: float = 0.0


ALL_MOMENTS = ("early", "asked", "completing")


def kill_and_resume(zoo: FaultZoo, root: Path, *, kills: int = 10, n_trials: int = 60, seed: int = 0,
                    moments: tuple[str, ...] = ALL_MOMENTS, early_s: tuple[float, float] = (0.5, 8.0),
                    final_runners: int = 1, say: Callable[[str], None] = lambda s: None) -> KillReport:
    """Start the study, SIGKILL it (and its Ray) at a random moment, resume, ... `kills` times, then
    let the last resume finish. Kill moments rotate through `moments`: early (a random time in
    `early_s` after the start: imports, setup, Ray starting), soon after this run asked its first
    trial (its worker is up), soon after it completed one (trials being told and recorded).
    With final_runners=2 the study is finished by two `basin run` of its config at once, candidates
    paced so that both take part."""
    rng, t0 = random.Random(seed), time.monotonic()
    folder, log = root / "study", root / "kills.log"
    config = write_config(root / "kills.yaml", study_config(zoo, folder, name="kills", hooked=True,
                                                            budget={"n_trials": n_trials}))
    zoo.set_mode("ok")
    report, ever_complete = KillReport(budget=n_trials), {}
    attempt = 0
    while report.kills < kills:
        mode = moments[attempt % len(moments)]
        attempt += 1
        if attempt > 2 * kills + 5:
            raise RuntimeError(f"only {report.kills} kills in {attempt} attempts\n{tail(log)}")
        before, before_recs = storage_view(folder), records_view(folder)
        ever_complete.update({t.number: t for t in before if t.state == "COMPLETE"})
        args = ["resume", str(folder)] if (folder / "config.yaml").is_file() else ["run", str(config)]
        proc = start_basin([*args, "--set", f"budget.n_trials={report.budget}"] if args[0] == "resume" else args, log)
        started, pid_mark = time.monotonic(), f'"pid":{proc.pid}}}'
        n_complete = journal_text(folder).count(COMPLETE_OP)
        if mode == "early":
            delay = rng.uniform(*early_s)
            alive = wait_for(lambda: time.monotonic() - started >= delay, proc, 60, "the kill moment", log)  # noqa: B023
        elif mode == "asked":
            alive = wait_for(lambda: pid_mark in journal_text(folder), proc, 180, "the first ask", log)  # noqa: B023
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
        else:
            alive = wait_for(lambda: journal_text(folder).count(COMPLETE_OP) > n_complete, proc, 180,  # noqa: B023
                          "the first completed trial", log)
            delay = rng.uniform(0.0, 1.0)
            time.sleep(delay)
        if not alive or proc.poll() is not None:  # it finished the budget before the kill: raise the budget
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
    if final_runners > 1:  # `basin run CONFIG` on an existing study resumes it; budget as raised above
        write_config(config, study_config(zoo, folder, name="kills", hooked=True, budget={"n_trials": report.budget}))
        zoo.set_mode("sleep 0.005")
    procs = [start_basin(["resume", str(folder), "--set", f"budget.n_trials={report.budget}"], log)] if final_runners == 1 \
        else [start_basin(["run", str(config)], root / f"final-{i}.log") for i in range(final_runners)]
    rcs, leaked = wait_runs(procs, zoo)
    report.final_rc, report.leaked = max(rcs), report.leaked + leaked
    final, final_recs = storage_view(folder), records_view(folder)
    report.final_by_runner = {p.pid: sum(t.state == "COMPLETE" and t.runner == p.pid for t in final) for p in procs}
    ever = [t for t in ever_complete.values()]
    report.lost += changed_complete(ever, {}, final, final_recs)
    report.integrity = integrity_problems(final, final_recs)
    report.integrity += [f"trial {t.number} is still RUNNING" for t in final if t.state == "RUNNING"]
    report.requeued = sum(t.state == "FAIL" and "queued again" in (t.error or "") for t in final)
    report.complete = sum(t.state == "COMPLETE" for t in final)
    report.seconds = time.monotonic() - t0
    return report


# --- fault 2: a worker killed mid-candidate, an evaluation that raises, a candidate past its time limit,
#     NaN merges: one study, driven phase by phase through the hooked tasks ---------------------------

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
    listening: list[tuple[str, str]] = field(default_factory=list)  # (process, address) of the run's servers
    node_ips: set[str] = field(default_factory=set)  # node addresses on the Ray processes' command lines


FAULT_KINDS = {  # error text -> kind
    "injected evaluation failure": "raised", "worker died": "worker_died",
    "candidate_timeout": "timeout", "NaN or inf": "nan",
}
# With the loud fine-tune, task vectors scaled by lambda ~1e38 overflow float32: every task_arithmetic
# candidate is non-finite (NonFiniteMergeError in the worker), while linear (normalized weights) stays
# finite. The random sampler's draws are fixed by its seed; with this one no long run of
# task_arithmetic draws can stop the study as "all failing".
FAULT_SPACE = {"methods": ["linear", "task_arithmetic"], "weight": [0.5, 1.0], "lambda": [1.0e38, 3.0e38]}
FAULT_SAMPLER = {"name": "random", "seed": 8}


def worker_faults(zoo: FaultZoo, root: Path, *, n_trials: int = 14, timeout_s: float = 4.0,
                  say: Callable[[str], None] = lambda s: None) -> FaultReport:
    from search.records import read_trial_records

    t0, folder, log = time.monotonic(), root / "faults", root / "faults.log"
    config = write_config(root / "faults.yaml", study_config(
        zoo, folder, name="faults", hooked=True, space=FAULT_SPACE, sampler=FAULT_SAMPLER, baselines=False,
        models={"finetunes": [str(zoo.loud), *map(str, zoo.finetunes[1:])]},
        budget={"n_trials": n_trials}, workers={"count": 1, "candidate_timeout": timeout_s}))
    zoo.set_mode("ok")
    zoo.busy.unlink(missing_ok=True)
    report = FaultReport(budget=n_trials)
    proc = start_basin(["run", str(config)], log)

    def failed_with(text: str) -> bool:
        return any(text in (r.get("error") or "") for r in records_view(folder).values())

    def completed_by_another(pid: int) -> bool:  # a COMPLETE trial from a worker other than pid
        return any(r["state"] == "COMPLETE" and worker_pid(r["worker"]) != pid for r in records_view(folder).values())

    try:
        # a completed trial names its worker "host:pid/index": that pid is the one to kill later
        wait_for(lambda: any(r["state"] == "COMPLETE" for r in records_view(folder).values()), proc, 240, "a first COMPLETE trial", log)
        first = next(r for r in sorted(records_view(folder).values(), key=lambda r: r["number"]) if r["state"] == "COMPLETE")
        first_worker = worker_pid(first["worker"])
        report.listening, report.node_ips = ray_exposure(proc.pid)
        say(f"worker pid {first_worker}; the next evaluation raises")
        zoo.set_mode("raise")
        wait_for(lambda: failed_with("injected evaluation failure"), proc, 60, "the raising evaluation", log)
        say("next: a worker SIGKILLed in the middle of a candidate")
        zoo.set_mode("hang")
        wait_for(zoo.busy.exists, proc, 60, "a candidate in evaluation", log)
        report.killed_pid = int(zoo.busy.read_text())
        assert report.killed_pid == first_worker, (report.killed_pid, first_worker)
        os.kill(first_worker, signal.SIGKILL)
        zoo.set_mode("ok")
        zoo.busy.unlink()
        wait_for(lambda: failed_with("worker died"), proc, 60, "the dead worker's trial to fail", log)
        # (the hook also runs while a worker loads its evaluator: wait for the new one to be at work)
        wait_for(lambda: completed_by_another(first_worker), proc, 120, "a trial completed by the new worker", log)
        say("next: a candidate past workers.candidate_timeout")
        zoo.set_mode("hang")
        wait_for(zoo.busy.exists, proc, 120, "a candidate on the new worker", log)
        report.timed_out_pid = int(zoo.busy.read_text())
        wait_for(lambda: not process_alive(report.timed_out_pid), proc, 10 * timeout_s, "the timeout to stop the worker", log)
        zoo.set_mode("ok")
        wait_for(lambda: failed_with("candidate_timeout"), proc, 60, "the timed-out trial to fail", log)
        wait_for(lambda: completed_by_another(first_worker) and any(
            r["state"] == "COMPLETE" and worker_pid(r["worker"]) not in (first_worker, report.timed_out_pid)
            for r in records_view(folder).values()), proc, 120, "a trial completed by the worker restarted after the timeout", log)
        say("waiting for the study to finish its budget")
        report.rc = proc.wait(timeout=240)
    finally:
        zoo.set_mode("ok")
        if proc.poll() is None:
            kill_tree(proc)
    recs = read_trial_records(folder)
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
    report.seconds = time.monotonic() - t0
    return report


# --- fault 3: two runners on one study at once ---------------------------------------------------------

@dataclass
class ConcurrentReport:
    rcs: tuple = ()
    by_runner: dict[int, int] = field(default_factory=dict)  # runner pid -> COMPLETE trials
    complete: int = 0
    budget: int = 0
    integrity: list[str] = field(default_factory=list)
    leaked: list[str] = field(default_factory=list)
    seconds: float = 0.0


def concurrent_runners(zoo: FaultZoo, root: Path, *, n_trials: int = 16, pace_s: float = 0.01) -> ConcurrentReport:
    """Two `basin run` of one config started together; candidates paced (pace_s per item) so that both
    have their workers up before the budget is spent."""
    t0, folder = time.monotonic(), root / "shared"
    config = write_config(root / "shared.yaml", study_config(zoo, folder, name="shared", hooked=True,
                                                               budget={"n_trials": n_trials}))
    zoo.set_mode(f"sleep {pace_s}")
    procs = [start_basin(["run", str(config)], root / f"shared-{i}.log") for i in range(2)]
    report = ConcurrentReport(budget=n_trials)
    report.rcs, report.leaked = wait_runs(procs, zoo)
    trials, recs = storage_view(folder), records_view(folder)
    report.by_runner = dict(Counter(t.runner for t in trials if t.state == "COMPLETE"))
    report.complete = sum(t.state == "COMPLETE" for t in trials)
    report.integrity = integrity_problems(trials, recs)
    report.integrity += [f"trial {t.number} is still {t.state}" for t in trials if t.state in ("RUNNING",)]
    baselines = Counter(t.baseline for t in trials if t.baseline and t.retry_of is None)
    report.integrity += [f"baseline {b} queued {n} times" for b, n in baselines.items() if n > 1]
    report.seconds = time.monotonic() - t0
    return report


# --- fault 4: `basin export` killed in the middle ------------------------------------------------------


@dataclass
class ExportKillReport:
    killed_after_s: float = 0.0
    target_exists: bool = True
    partial_left: list[str] = field(default_factory=list)  # the temporary folder a SIGKILL cannot remove
    clean_export_s: float = 0.0
    clean_export_ok: bool = False
    partial_after_clean: list[str] = field(default_factory=list)  # what the next export did not sweep


def export_killed(big: FaultZoo, root: Path, *, clean: bool = True) -> ExportKillReport:
    """Kill `basin export` while its partial folder exists; the target must not appear. Then (clean)
    export again, uninterrupted, to show the study is still exportable."""
    folder, number = study_with_one_trial(big, root / "exp-study")
    target, log = root / "exported", root / "export.log"
    report = ExportKillReport()
    proc = start_basin(["export", str(folder), "--trial", str(number), "--out", str(target)], log)
    started = time.monotonic()
    partial = lambda: list(root.glob(f".{target.name}.partial-*"))  # noqa: E731
    if wait_for(lambda: bool(partial()), proc, 120, "the export's partial folder", log):
        time.sleep(0.05)
    report.killed_after_s = time.monotonic() - started
    kill_tree(proc)
    report.target_exists = target.exists()
    report.partial_left = [p.name for p in partial()]
    if not clean:
        return report
    started = time.monotonic()
    proc = start_basin(["export", str(folder), "--trial", str(number), "--out", str(target)], log)
    report.clean_export_ok = proc.wait(timeout=300) == 0 and (target / "config.json").is_file()
    report.clean_export_s = time.monotonic() - started
    report.partial_after_clean = [p.name for p in partial()]
    return report
