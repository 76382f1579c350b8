"""Overnight reliability of `basin`: kills, worker faults, concurrent runners, many machines and
bad input.

Everything here drives the real command line in subprocesses (each `basin run` starts its own
local Ray, or joins a real two-node Ray cluster), on tiny real models and local lm-eval tasks,
with a real PostgreSQL server for the runners on separate "hosts" (own folder, own Ray), and
prints the figures:

    .venv/bin/python tests/benchmarks/reliability.py [--kills 10] [--keep DIR]

The scenarios live in tests/support/ (tests/test_reliability.py and tests/test_bad_input.py run
them too); this script runs them all once and prints what they saw.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    )
    print("all good" if ok else "PROBLEMS above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
