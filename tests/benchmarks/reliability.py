"""Overnight reliability of `basin`: kills, worker faults, concurrent runners, many machines, bad
input, SIGTERM, a full disk and a damaged fine-tune.

Everything here drives the real command line in subprocesses (each `basin run` starts its own
local Ray, or joins a real two-node Ray cluster), on tiny real models and local lm-eval tasks,
with a real PostgreSQL server for the runners on separate "hosts" (own folder, own Ray), and
prints the figures:

    .venv/bin/python tests/benchmarks/reliability.py [--kills 10] [--keep DIR]

The scenarios live in tests/support/ (tests/test_reliability.py, tests/test_bad_input.py and
tests/test_failures_speak.py run them too); this script runs them all once and prints what they
saw. The full disks are small tmpfs mounts, so they need root; without it they are skipped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from tests.support.bad_inputs import BAD_INPUTS, BadInputEnv, run_bad_input  # noqa: E402
from tests.support.failures import (  # noqa: E402
    Said,
    can_mount,
    damaged_finetune,
    full_disk_merge,
    full_disk_study,
    sigterm_run,
)
from tests.support.fault_zoo import build_big_zoo, build_fault_zoo  # noqa: E402
from tests.support.many_machines import node_loss, shared_study, silent_runner  # noqa: E402
from tests.support.postgres import postgres_server  # noqa: E402
from tests.support.scenarios import (  # noqa: E402
    MF_RUNGS,
    concurrent_runners,
    export_killed,
    kill_and_resume,
    worker_faults,
)


def speech(said: Said, *, error_line: bool = True) -> str:
    problems = said.problems(error_line=error_line)
    return "message ok" if not problems else f"message BAD ({'; '.join(problems)})"


def resumed(said: Said | None, complete: int, budget: int) -> str:
    if said is None:
        return "not resumed"
    return f"resume {complete}/{budget} COMPLETE" + ("" if said.rc == 0 else f" (exit {said.rc})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="basin-reliability-"))
    say = lambda s: print(f"  [{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    try:
        zoo = build_fault_zoo(root / "zoo")
        print("bad input")
        env = BadInputEnv(zoo, root / "bad")
        results = [run_bad_input(c, env) for c in BAD_INPUTS]
        for r in results:
            message = " ".join(line.strip() for line in r.message.split("\n")).removeprefix(
                "basin: error: "
            )
            print(
                f"  {'ok ' if not r.problems else 'BAD'} {r.case.name}: {message[:150]}"
                + (f"  <- {r.problems}" if r.problems else "")
            )
        print(f"kill -9 of basin run/resume, {args.kills} times")
        kills = kill_and_resume(zoo, root / "kills", kills=args.kills, seed=args.seed, say=say)
        print(
            f"kill -9 of a multi-fidelity study (rungs {MF_RUNGS['rungs']}), {args.kills} times, "
            "between rungs too"
        )
        mf = kill_and_resume(
            zoo,
            root / "kills-mf",
            kills=args.kills,
            seed=args.seed,
            fidelity=MF_RUNGS,
            moments=("early", "rung", "asked", "rung", "completing"),
            say=say,
        )
        print("worker faults")
        faults = worker_faults(zoo, root / "faults", say=say)
        print("two runners at once")
        conc = concurrent_runners(zoo, root / "concurrent")
        print("kill -9 of basin export")
        exp = export_killed(build_big_zoo(root / "big"), root / "export")
        print("many machines: runners on their own folders and Rays sharing a PostgreSQL study")
        with postgres_server() as server:
            shared = [
                shared_study(zoo, root / f"pg-{h}", server.url(), hosts=h, name=f"pg-{h}")
                for h in (2, 3)
            ]
            silent = silent_runner(zoo, root / "pg-silent", server.url(), heartbeat_s=2)
        print("many machines: a two-node Ray cluster losing a node")
        lost = node_loss(zoo, root / "cluster")
        print("SIGTERM to basin run")
        term = sigterm_run(zoo, root / "sigterm")
        print("a full disk during a study and during a merge")
        disk_study = full_disk_study(zoo, root / "disk-study") if can_mount() else None
        disk_merge = full_disk_merge(zoo, root / "disk-merge") if can_mount() else None
        print("a fine-tune holding NaN")
        nan = damaged_finetune(zoo, root / "nan")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    passed = sum(not r.problems for r in results)
    print()
    print(f"kills survived        {kills.kills} (moments: {', '.join(kills.moments)})")
    print(
        f"trials lost           {len(kills.lost)}"
        f"{'  ' + '; '.join(kills.lost[:3]) if kills.lost else ''}"
    )
    print(
        f"integrity problems    {len(kills.integrity)}"
        f"{'  ' + '; '.join(kills.integrity[:3]) if kills.integrity else ''}"
    )
    print(f"requeued after kills  {kills.requeued} trials failed as stopped and queued again")
    print(
        f"budget                {kills.complete} COMPLETE of {kills.budget} "
        f"(final resume exit {kills.final_rc}), {kills.seconds:.0f} s"
    )
    print(
        f"leaked processes      {len(kills.leaked)}"
        f"{'  ' + ', '.join(kills.leaked) if kills.leaked else ''}"
    )
    print(
        f"multi-fidelity kills  {mf.kills} "
        f"({sum(m.startswith('rung') for m in mf.moments)} just after a promotion, "
        f"{mf.held_between_rungs} of them holding a candidate between rungs); "
        f"trials lost {len(mf.lost)}; integrity problems {len(mf.integrity)}; "
        f"requeued {mf.requeued} (held at a kill and not requeued: {len(mf.not_requeued)}); "
        f"{mf.complete} finished of {mf.budget} ({mf.pruned} of them PRUNED), "
        f"exit {mf.final_rc}, {mf.seconds:.0f} s"
    )
    print(
        "worker faults         "
        f"{', '.join(f'{k}: trials {v}' for k, v in sorted(faults.errors.items()))}; "
        f"unexpected failures {len(faults.unexpected)}; {faults.complete}/{faults.budget} "
        f"COMPLETE, exit {faults.rc}, {faults.seconds:.0f} s"
    )
    print(
        f"two runners           exits {conc.rcs}; "
        f"COMPLETE per runner {list(conc.by_runner.values())}; "
        f"{conc.complete} COMPLETE (budget {conc.budget}); "
        f"integrity problems {len(conc.integrity)}; {conc.seconds:.0f} s"
    )
    print(
        f"export killed         after {exp.killed_after_s:.1f} s: "
        f"target exists {exp.target_exists}; "
        f"partial folders left beside it {len(exp.partial_left)}; "
        f"clean export ok {exp.clean_export_ok} ({exp.clean_export_s:.1f} s), "
        f"partial folders left after it {len(exp.partial_after_clean)}"
    )
    for r in shared:
        print(
            f"runners x hosts       {r.hosts} x {r.hosts} on one PostgreSQL study: "
            f"exits {r.rcs}; COMPLETE per runner {sorted(r.by_runner.values())}; "
            f"{r.complete} COMPLETE of budget {r.budget} (overshoot {r.overshoot}); "
            f"duplicates {len(r.duplicates)}; "
            f"records outside their runner's folder {len(r.records_elsewhere)}; "
            f"integrity problems {len(r.integrity)}; {r.seconds:.0f} s"
        )
    print(
        f"runner killed         held trials {silent.held}; requeued by the other runner "
        f"{', '.join(f'{s:.1f} s' for s in silent.requeue_s)} after their last heartbeat "
        f"(grace period {silent.grace_s:.0f} s, heartbeat every {silent.heartbeat_s} s); "
        f"retries {list(silent.retries.values())}; "
        f"{silent.complete} COMPLETE of {silent.budget}, exit {silent.rc}; {silent.seconds:.0f} s"
    )
    print(
        f"node lost             nodes with trials before {sorted(lost.nodes_before)}; "
        f"failed {len(lost.failed)} "
        f"(retried on {sorted(set(map(str, lost.retried_on.values())))}); "
        f"trials after the loss on {dict(lost.after_on)}; "
        f"{lost.complete} COMPLETE of {lost.budget}, exit {lost.rc}; "
        f"integrity problems {len(lost.integrity)}; {lost.seconds:.0f} s"
    )
    print(
        f"bad inputs tried      {len(results)}, handled {passed} "
        "(exit 2, one message naming the problem, nothing left)"
    )
    stopped = (
        f"{term.requeued_in_flight} in flight requeued"
        + ("" if len(term.stopped) == 1 else f" ({len(term.stopped)} stopped)")
        if term.in_flight
        else "no candidate in flight before the run ended"
    )
    print(
        f"sigterm               exit {term.run.rc}, {speech(term.run, error_line=False)}, "
        f"{stopped}, {resumed(term.resumed, term.complete, term.budget)}, {term.seconds:.0f} s"
    )
    if disk_study is None:
        print("full disk (study)     skipped (needs root)")
    else:
        print(
            f"full disk (study)     exit {disk_study.run.rc}, {speech(disk_study.run)}, "
            + ("" if disk_study.in_flight else "no candidate in flight before the run ended, ")
            + f"{resumed(disk_study.resumed, disk_study.complete, disk_study.budget)}, "
            f"records {disk_study.records} of {disk_study.trials} trials, "
            f"{disk_study.seconds:.0f} s"
        )
    if disk_merge is None:
        print("full disk (merge)     skipped (needs root)")
    else:
        print(
            f"full disk (merge)     exit {disk_merge.merge.rc}, {speech(disk_merge.merge)}, "
            + (f"left {', '.join(disk_merge.left)}" if disk_merge.left else "nothing left")
            + f", {disk_merge.seconds:.0f} s"
        )
    print(
        f"damaged fine-tune     validate exit {nan.validate.rc} "
        f"(--headers-only exit {nan.headers_only.rc}), {speech(nan.validate)}; "
        f"run exit {nan.run.rc}, {speech(nan.run)}; "
        f"{'folder left' if nan.folder_left else 'no folder left'}, {nan.seconds:.0f} s"
    )
    ok = (
        not kills.lost
        and not kills.integrity
        and not kills.leaked
        and kills.final_rc == 0
        and kills.complete == kills.budget
        and not mf.lost
        and not mf.integrity
        and not mf.leaked
        and mf.final_rc == 0
        and mf.complete == mf.budget
        and faults.rc == 0
        and not faults.unexpected
        and not faults.integrity
        and conc.rcs == (0, 0)
        and not conc.integrity
        and conc.complete == conc.budget
        and not exp.target_exists
        and not exp.partial_after_clean
        and passed == len(results)
        and all(
            r.rcs == (0,) * r.hosts
            and r.overshoot == 0
            and not r.duplicates
            and not r.records_elsewhere
            and not r.integrity
            for r in shared
        )
        and silent.rc == 0
        and not silent.not_silent
        and all(s >= silent.grace_s for s in silent.requeue_s)
        and lost.rc == 0
        and not lost.integrity
        and len(lost.failed) == 1
        and lost.complete == lost.budget
        and term.in_flight
        and term.run.rc == 143
        and not term.run.problems(error_line=False)
        and len(term.requeued) == term.requeued_in_flight == len(term.stopped) == 1
        and term.resumed.rc == 0
        and term.complete == term.budget
        and (
            disk_study is None
            or (
                disk_study.in_flight
                and disk_study.run.rc == 1
                and not disk_study.run.problems()
                and disk_study.resumed.rc == 0
                and disk_study.complete == disk_study.budget
                and disk_study.records == disk_study.trials
            )
        )
        and (
            disk_merge is None
            or (
                disk_merge.merge.rc == 1 and not disk_merge.merge.problems() and not disk_merge.left
            )
        )
        and nan.validate.rc == 2
        and not nan.validate.problems()
        and nan.headers_only.rc == 0
        and nan.run.rc == 2
        and not nan.run.problems()
        and not nan.folder_left
    )
    print("all good" if ok else "PROBLEMS above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
