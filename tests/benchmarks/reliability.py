"""Overnight reliability of `basin`: kills, worker faults, concurrent runners and bad input.

Everything here drives the real command line in subprocesses (each `basin run` starts its own
local Ray), on tiny real models and local lm-eval tasks, and prints the figures:

    .venv/bin/python tests/benchmarks/reliability.py [--kills 10] [--keep DIR]

tests/test_reliability.py and tests/test_bad_input.py import these helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from tests.support.tiny import build_model, build_tasks, task_config  # noqa: E402

BASIN = Path(sys.executable).with_name("basin")
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
COMPLETE_OP = '"state":1,'  # a journal line that sets a trial COMPLETE (TrialState.COMPLETE == 1)


# --- fixtures: tiny models and tasks ---------------------------------------------------------------------

@dataclass(frozen=True)
class Zoo:
    """A base, three fine-tunes of its shape, the tiny tasks, and the same tasks with a fault hook."""

    root: Path
    base: Path
    finetunes: tuple[Path, ...]
    tasks: Path
    hooked: Path  # tasks whose doc_to_text obeys `control` (see HOOKS)
    loud: Path | None = None  # the first fine-tune with its lm_head scaled by 1000 (task vectors that overflow)

    @property
    def control(self) -> Path:
        return self.hooked / "control"

    @property
    def busy(self) -> Path:
        return self.hooked / "busy"

    def set_mode(self, mode: str) -> None:
        """ok | raise (the next evaluation raises) | hang (evaluations block) | sleep S (per item)."""
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(mode)
        os.replace(tmp, self.control)


# The hook runs inside lm-eval, in the worker, once per item: it can fail, stall or pace a candidate.
HOOKS = '''"""Fault injection for the reliability tests: doc_to_text obeys the file CONTROL."""
import os
import time

CONTROL = {control!r}
BUSY = {busy!r}


def _mode():
    try:
        with open(CONTROL) as f:
            return f.read().strip()
    except FileNotFoundError:
        return "ok"


def doc_to_text(doc):
    mode = _mode()
    if mode == "raise":
        tmp = CONTROL + ".raised"
        with open(tmp, "w") as f:
            f.write("ok")
        os.replace(tmp, CONTROL)
        raise RuntimeError("injected evaluation failure")
    if mode == "hang":
        with open(BUSY + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(BUSY + ".tmp", BUSY)
        while _mode() == "hang":
            time.sleep(0.05)
    elif mode.startswith("sleep "):
        time.sleep(float(mode.split()[1]))
    return doc["context"].strip()
'''


def build_zoo(root: Path, *, n_items: int = 30) -> Zoo:
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(root / "base", seed=0)
    finetunes = tuple(build_model(root / f"ft{i}", seed=i + 1) for i in range(3))
    tasks = build_tasks(root / "tasks", n_items=n_items)
    hooked = root / "hooked"
    hooked.mkdir(exist_ok=True)
    (hooked / "hooks.py").write_text(HOOKS.format(control=str(hooked / "control"), busy=str(hooked / "busy")))
    for name in tasks.names:
        text = yaml.safe_dump(task_config(name, tasks.data_files[name]), sort_keys=False)
        text = text.replace("doc_to_text: '{{context.strip()}}'", "doc_to_text: !function hooks.doc_to_text")
        assert "!function" in text, text
        (hooked / f"{name}.yaml").write_text(text)
    zoo = Zoo(root, base, finetunes, tasks.folder, hooked, loud=_loud_copy(finetunes[0], root / "loud"))
    zoo.set_mode("ok")
    return zoo


def shared_zoo(base: Path) -> Zoo:
    """build_zoo into base/reliability-zoo once (test modules share it within a pytest session)."""
    root, done = base / "reliability-zoo", base / "reliability-zoo" / ".built"
    if done.exists():
        return Zoo(root, root / "base", tuple(root / f"ft{i}" for i in range(3)), root / "tasks", root / "hooked", root / "loud")
    zoo = build_zoo(root)
    done.touch()
    return zoo


def _loud_copy(model: Path, out: Path) -> Path:
    """`model` with lm_head x1000: its task vector times lambda ~1e38 overflows float32 (a real NaN/inf
    merge), while a linear merge that includes it stays finite."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out, dirs_exist_ok=True)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1000
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def study_config(zoo: Zoo, folder: Path, *, name: str = "night", hooked: bool = False, **sections: Any) -> dict:
    """A study over the zoo (one CPU worker, two objectives); `sections` update whole sections."""
    data: dict[str, Any] = {
        "study": {"name": name, "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes]},
        "space": {"methods": ["ties", "task_arithmetic", "dare_ties"], "lambda": [0.5, 1.5]},
        "evaluator": {"tasks": ["toy_pair", "toy_next"], "include_path": str(zoo.hooked if hooked else zoo.tasks),
                      "builtin_tasks": False},
        "objectives": {"mode": "pareto", "items": [{"task": "toy_pair"}, {"task": "toy_next"}]},
        "budget": {"n_trials": 12},
        "workers": {"count": 1},
    }
    for key, value in sections.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


def write_config(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- processes ---------------------------------------------------------------------------------------

def start_basin(args: list[str], log: Path) -> subprocess.Popen:
    """`basin ARGS` in a session of its own, so it and all it starts (Ray) can be killed together."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([str(BASIN), *args, "--quiet"], cwd=REPO, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> list[str]:
    """SIGKILL a process started by start_basin and everything it started (Ray's gcs_server, raylet,
    agents, workers); returns the names of processes that still live afterwards (leaks)."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the session's group: basin and Ray's children
    proc.wait()
    for p in psutil.process_iter():  # whatever joined the session after the snapshot
        with contextlib.suppress(psutil.Error, OSError):
            if p not in family and os.getsid(p.pid) == proc.pid:
                family.append(p)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE:
                names.append(f"{p.name()}:{p.pid}")
    return names


def wait_runs(procs: list[subprocess.Popen], zoo: Any, timeout_s: float = 300) -> tuple[tuple[int, ...], list[str]]:
    """Wait for `basin` runs to end; then put the zoo's fault hook back to "ok" and kill any run
    still going. Returns (exit codes, processes that outlived their run)."""
    leaked: list[str] = []
    try:
        return tuple(p.wait(timeout=timeout_s) for p in procs), leaked
    finally:
        zoo.set_mode("ok")
        for p in procs:
            leaked += kill_tree(p) if p.poll() is None else []


def ray_exposure(pid: int) -> tuple[list[tuple[str, str]], set[str]]:
    """The listening sockets of a process tree (a `basin run` and its local Ray), and the node IP its
    Ray processes were started with."""
    listening, ips = [], set()
    for p in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
            for arg in p.cmdline():
                for flag in ("--node_ip_address=", "--node-ip-address="):
                    if arg.startswith(flag):
                        ips.add(arg[len(flag):])
    return listening, ips



def _alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pid(worker: str | None) -> int | None:
    """The pid in a record's worker field "host:pid/index"."""
    return int(worker.split(":")[1].split("/")[0]) if worker else None


LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _wait(predicate: Callable[[], bool], proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None) -> bool:
    """Poll until predicate(); False when proc exited first; raise on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{tail(log) if log else ''}")


def journal_text(folder: Path) -> str:
    path = folder / "journal.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- what the study holds ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialView:
    number: int
    state: str
    params: str  # JSON, keys sorted (the fixed params of a trial not yet asked)
    values: tuple | None
    baseline: str | None
    retry_of: int | None
    runner: int | None  # the pid of the run that asked it
    error: str | None


def storage_view(folder: Path) -> list[TrialView]:
    """Every trial in the study's storage, in number order ([] before the study exists)."""
    import optuna

    from search import records
    from search.config import config_from_dict

    if not (folder / records.CONFIG_FILE).is_file():
        return []
    config = config_from_dict(records.read_config_snapshot(folder))
    try:
        study = optuna.load_study(study_name=config.study.name, storage=records.open_storage(folder, config.study.storage))
    except KeyError:
        return []
    out = []
    for t in study.get_trials(deepcopy=False):
        params = t.params or t.system_attrs.get("fixed_params", {})
        out.append(TrialView(t.number, t.state.name, json.dumps(params, sort_keys=True),
                             tuple(t.values) if t.values else None, t.user_attrs.get("baseline"),
                             t.user_attrs.get("retry_of"), (t.user_attrs.get("runner") or {}).get("pid"),
                             t.user_attrs.get("error")))
    return out


def records_view(folder: Path) -> dict[int, dict]:
    from search.records import read_trial_records

    return read_trial_records(folder) if (folder / "trials").is_dir() else {}


def changed_complete(before: list[TrialView], before_records: dict[int, dict], after: list[TrialView],
                     after_records: dict[int, dict]) -> list[str]:
    """COMPLETE trials (storage or record) before that are missing or different after."""
    now = {t.number: t for t in after}
    problems = [f"trial {t.number} was COMPLETE and is now {now.get(t.number)}"
                for t in before if t.state == "COMPLETE" and now.get(t.number) != t]
    problems += [f"record {n} was COMPLETE and is now {after_records.get(n)}"
                 for n, r in before_records.items() if r["state"] == "COMPLETE" and after_records.get(n) != r]
    return problems


def integrity_problems(trials: list[TrialView], recs: dict[int, dict]) -> list[str]:
    """Numbers used once; no params completed twice; every requeued trial queued again exactly once;
    every finished trial's record agrees with storage."""
    problems = []
    numbers = [t.number for t in trials]
    if len(set(numbers)) != len(numbers) or numbers != list(range(len(numbers))):
        problems.append(f"trial numbers are not 0..n-1 used once: {numbers}")
    by_number = {t.number: t for t in trials}
    complete = [t for t in trials if t.state == "COMPLETE"]
    for params, n in Counter(t.params for t in complete).items():
        if n > 1:
            problems.append(f"{n} COMPLETE trials share params {params}: "
                            f"{[(t.number, t.retry_of) for t in complete if t.params == params]}")
    retries = Counter(t.retry_of for t in trials if t.retry_of is not None)
    for target, n in retries.items():
        original = by_number.get(target)
        if n != 1 or original is None or original.state != "FAIL":
            problems.append(f"trial {target} ({original}) has {n} retries")
    for t in trials:
        if t.state == "FAIL" and "queued again" in (t.error or ""):
            if retries.get(t.number) != 1:
                problems.append(f"trial {t.number} failed as interrupted but its params were not queued again once")
            retry = next((r for r in trials if r.retry_of == t.number), None)
            # a trial killed halfway through suggest passes on the params it had; the retry draws the rest
            if retry is not None and not json.loads(t.params).items() <= json.loads(retry.params).items():
                problems.append(f"retry {retry.number} of trial {t.number} has other params")
            if retry is not None and retry.baseline != t.baseline:
                problems.append(f"retry {retry.number} lost the baseline name of trial {t.number}")
    for t in trials:
        if t.state in ("COMPLETE", "FAIL"):
            r = recs.get(t.number)
            if r is None or r["state"] != t.state or json.dumps(r["params"], sort_keys=True) != t.params \
                    or (t.state == "COMPLETE" and tuple(r["values"]) != t.values):
                problems.append(f"record of trial {t.number} disagrees with storage: {r} vs {t}")
    problems += [f"record {n} has no finished trial in storage" for n in recs
                 if n not in by_number or by_number[n].state not in ("COMPLETE", "FAIL")]
    return problems


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


def kill_and_resume(zoo: Zoo, root: Path, *, kills: int = 10, n_trials: int = 60, seed: int = 0,
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
            alive = _wait(lambda: time.monotonic() - started >= delay, proc, 60, "the kill moment", log)  # noqa: B023
        elif mode == "asked":
            alive = _wait(lambda: pid_mark in journal_text(folder), proc, 180, "the first ask", log)  # noqa: B023
            delay = rng.uniform(0.0, 2.0)
            time.sleep(delay)
        else:
            alive = _wait(lambda: journal_text(folder).count(COMPLETE_OP) > n_complete, proc, 180,  # noqa: B023
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


def worker_faults(zoo: Zoo, root: Path, *, n_trials: int = 14, timeout_s: float = 4.0,
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
        return any(r["state"] == "COMPLETE" and _pid(r["worker"]) != pid for r in records_view(folder).values())

    try:
        # a completed trial names its worker "host:pid/index": that pid is the one to kill later
        _wait(lambda: any(r["state"] == "COMPLETE" for r in records_view(folder).values()), proc, 240, "a first COMPLETE trial", log)
        first = next(r for r in sorted(records_view(folder).values(), key=lambda r: r["number"]) if r["state"] == "COMPLETE")
        worker_pid = _pid(first["worker"])
        report.listening, report.node_ips = ray_exposure(proc.pid)
        say(f"worker pid {worker_pid}; the next evaluation raises")
        zoo.set_mode("raise")
        _wait(lambda: failed_with("injected evaluation failure"), proc, 60, "the raising evaluation", log)
        say("next: a worker SIGKILLed in the middle of a candidate")
        zoo.set_mode("hang")
        _wait(zoo.busy.exists, proc, 60, "a candidate in evaluation", log)
        report.killed_pid = int(zoo.busy.read_text())
        assert report.killed_pid == worker_pid, (report.killed_pid, worker_pid)
        os.kill(worker_pid, signal.SIGKILL)
        zoo.set_mode("ok")
        zoo.busy.unlink()
        _wait(lambda: failed_with("worker died"), proc, 60, "the dead worker's trial to fail", log)
        # (the hook also runs while a worker loads its evaluator: wait for the new one to be at work)
        _wait(lambda: completed_by_another(worker_pid), proc, 120, "a trial completed by the new worker", log)
        say("next: a candidate past workers.candidate_timeout")
        zoo.set_mode("hang")
        _wait(zoo.busy.exists, proc, 120, "a candidate on the new worker", log)
        report.timed_out_pid = int(zoo.busy.read_text())
        _wait(lambda: not _alive(report.timed_out_pid), proc, 10 * timeout_s, "the timeout to stop the worker", log)
        zoo.set_mode("ok")
        _wait(lambda: failed_with("candidate_timeout"), proc, 60, "the timed-out trial to fail", log)
        _wait(lambda: completed_by_another(worker_pid) and any(
            r["state"] == "COMPLETE" and _pid(r["worker"]) not in (worker_pid, report.timed_out_pid)
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


def concurrent_runners(zoo: Zoo, root: Path, *, n_trials: int = 16, pace_s: float = 0.01) -> ConcurrentReport:
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

def study_with_one_trial(zoo: Zoo, folder: Path, **sections: Any) -> tuple[Path, int]:
    """A study folder holding one COMPLETE trial, made in-process without workers (for export)."""
    from search.config import config_from_dict
    from search.space import suggest
    from search.study import setup_study

    setup = setup_study(config_from_dict(study_config(zoo, folder, baselines=False, **sections)), resume=False)
    trial = setup.study.ask()
    suggest(trial, setup.space)
    setup.study.tell(trial, [0.5, 0.5])
    return folder, trial.number


@dataclass
class ExportKillReport:
    killed_after_s: float = 0.0
    target_exists: bool = True
    partial_left: list[str] = field(default_factory=list)  # the temporary folder a SIGKILL cannot remove
    clean_export_s: float = 0.0
    clean_export_ok: bool = False
    partial_after_clean: list[str] = field(default_factory=list)  # what the next export did not sweep


def export_killed(big: Zoo, root: Path, *, clean: bool = True) -> ExportKillReport:
    """Kill `basin export` while its partial folder exists; the target must not appear. Then (clean)
    export again, uninterrupted, to show the study is still exportable."""
    folder, number = study_with_one_trial(big, root / "exp-study")
    target, log = root / "exported", root / "export.log"
    report = ExportKillReport()
    proc = start_basin(["export", str(folder), "--trial", str(number), "--out", str(target)], log)
    started = time.monotonic()
    partial = lambda: list(root.glob(f".{target.name}.partial-*"))  # noqa: E731
    if _wait(lambda: bool(partial()), proc, 120, "the export's partial folder", log):
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


def build_big_zoo(root: Path) -> Zoo:
    """Models large enough (~20 MB each) that an export lasts a moment."""
    root.mkdir(parents=True, exist_ok=True)
    base = build_model(root / "base", seed=0, hidden=256, layers=8)
    finetunes = tuple(build_model(root / f"ft{i}", seed=i + 1, hidden=256, layers=8) for i in range(3))
    tasks = build_tasks(root / "tasks", n_items=4)
    return Zoo(root, base, finetunes, tasks.folder, tasks.folder)


# --- bad input: one message, exit 2, nothing half-made -------------------------------------------------

@dataclass(frozen=True)
class BadInput:
    name: str
    words: tuple[str, ...]  # the message must name these (case-insensitive)
    argv: Callable[[BadInputEnv], list[str]]
    absent: tuple[str, ...] = ()  # ... and must not show these (a password)


@dataclass
class BadInputEnv:
    """Files the cases point at, made once: the zoo, a pickle-only model, a model of another shape,
    a model folder without config.json, an existing study."""

    zoo: Zoo
    root: Path

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.pickled = self.root / "pickled"
        if not self.pickled.exists():
            shutil.copytree(self.zoo.finetunes[0], self.pickled)
            (self.pickled / "model.safetensors").unlink()
            model = AutoModelForCausalLM.from_pretrained(self.zoo.finetunes[0])
            torch.save(model.state_dict(), self.pickled / "pytorch_model.bin")
        self.wider = self.root / "wider"
        if not self.wider.exists():
            build_model(self.wider, seed=9, hidden=48)
        self.no_config = self.root / "no_config"
        if not self.no_config.exists():
            shutil.copytree(self.zoo.finetunes[1], self.no_config)
            (self.no_config / "config.json").unlink()
        self.study = self.root / "existing"
        if not (self.study / "config.yaml").exists():
            self.study, self.trial = study_with_one_trial(self.zoo, self.study)

    def config(self, name: str, text: str | None = None, **sections: Any) -> list[str]:
        """argv of `basin run` on a config file holding `text`, or the valid config with `sections`."""
        path = self.root / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            text = yaml.safe_dump(study_config(self.zoo, self.out(name), **sections), sort_keys=False)
        path.write_text(text)
        return ["run", str(path)]

    def out(self, name: str) -> Path:
        return self.root / "out" / name


PASSWORD = "s3cr3t-Pa55"


def _models(env: BadInputEnv, base: Path | str | None = None, finetunes: list | None = None, **extra: Any) -> dict:
    return {"base": str(base or env.zoo.base), "finetunes": [str(p) for p in (finetunes or env.zoo.finetunes)], **extra}


BAD_INPUTS: tuple[BadInput, ...] = (
    BadInput("malformed YAML", ("not valid YAML",),
             lambda e: e.config("malformed", "study: {name: x\nmodels: [a, b\n")),
    BadInput("config is not a mapping", ("must be a YAML mapping",), lambda e: e.config("list", "- a\n- b\n")),
    BadInput("config file missing", ("config file not found",), lambda e: ["run", str(e.root / "nowhere.yaml")]),
    BadInput("unknown key", ("sampler.nmae", "unknown key", "did you mean 'name'"),
             lambda e: e.config("unknown_key", sampler={"nmae": "tpe"})),
    BadInput("unknown section", ("budgett", "unknown key", "did you mean 'budget'"),
             lambda e: e.config("unknown_section", budgett={"n_trials": 3})),
    BadInput("wrong type", ("budget.n_trials", "valid integer", "many"),
             lambda e: e.config("wrong_type", budget={"n_trials": "many"})),
    BadInput("out of range density", ("density", "(0, 1]"),
             lambda e: e.config("density", space={"methods": ["ties"], "density": [0.0, 1.5]})),
    BadInput("reversed range", ("lam", "above high"), lambda e: e.config("reversed", space={"lambda": [2.0, 1.0]})),
    BadInput("zero workers", ("workers.count", "greater than or equal to 1"),
             lambda e: e.config("zero_workers", workers={"count": 0})),
    BadInput("unknown merge method", ("space.methods", "tie", "'ties'"),
             lambda e: e.config("method", space={"methods": ["tie"]})),
    BadInput("no budget", ("give n_trials, timeout or both",), lambda e: e.config("no_budget", budget={"n_trials": None})),
    BadInput("bad study name", ("study.name", "pattern"), lambda e: e.config("name", study={"name": "a/b"})),
    BadInput("fine-tune listed twice", ("listed twice",),
             lambda e: e.config("twice", models=_models(e, finetunes=[e.zoo.finetunes[0]] * 2))),
    BadInput("pareto with one objective", ("pareto needs at least two",),
             lambda e: e.config("pareto1", objectives={"mode": "pareto", "items": [{"task": "toy_pair"}]})),
    BadInput("objective on a task not evaluated", ("toy_pari", "did you mean 'toy_pair'"),
             lambda e: e.config("objective_task", objectives={"mode": "pareto", "items": [{"task": "toy_pari"}, {"task": "toy_next"}]})),
    BadInput("slerp with three models", ("slerp", "exactly two"), lambda e: e.config("slerp", space={"methods": ["slerp"]})),
    BadInput("empty search space", ("nothing to search",),
             lambda e: e.config("empty_space", space={"methods": ["ties"], "weight": 0.5, "density": 0.5, "lambda": 1.0})),
    BadInput("missing model folder", ("model folder not found", "no_such_model"),
             lambda e: e.config("missing_model", models=_models(e, base=e.root / "no_such_model"))),
    BadInput("model folder without config.json", ("config.json",),
             lambda e: e.config("no_config", models=_models(e, finetunes=[e.no_config, *e.zoo.finetunes[1:]]))),
    BadInput("incompatible models", ("differ in the shape", "identical shapes"),
             lambda e: e.config("incompatible", models=_models(e, finetunes=[e.wider, *e.zoo.finetunes[1:]]))),
    BadInput("pickle-only model", ("pickle", "allow_pickle"),
             lambda e: e.config("pickle", models=_models(e, finetunes=[e.pickled, *e.zoo.finetunes[1:]]))),
    BadInput("unknown task", ("unknown task", "toy_nxt", "toy_next"),
             lambda e: e.config("unknown_task", evaluator={"tasks": ["toy_pair", "toy_nxt"]},
                                objectives={"mode": "pareto", "items": [{"task": "toy_pair"}, {"task": "toy_nxt"}]})),
    BadInput("unknown metric", ("f1", "acc"),
             lambda e: e.config("unknown_metric", objectives={"mode": "pareto", "items": [{"task": "toy_pair", "metric": "f1"}, {"task": "toy_next"}]})),
    BadInput("storage server not reachable", ("cannot be opened", "***", "leave study.storage empty"),
             lambda e: e.config("postgres", study={"name": "pg", "output_dir": str(e.out("postgres")),
                                                   "storage": f"postgresql://basin:{PASSWORD}@127.0.0.1:1/studies"}),
             absent=(PASSWORD,)),
    BadInput("storage file in a missing folder", ("cannot be opened", "sqlite"),
             lambda e: e.config("sqlite", study={"name": "sq", "output_dir": str(e.out("sqlite")),
                                                 "storage": f"sqlite:///{e.root}/no/such/dir/study.db"})),
    BadInput("existing study, different config", ("different config", "basin resume", "study.name"),
             lambda e: e.config("different", study={"name": "night", "output_dir": str(e.study)}, space={"methods": ["ties"]})),
    BadInput("resume of a folder that is no study", ("not a study folder",), lambda e: ["resume", str(e.root / "configs")]),
    BadInput("bad --set override", ("key.sub=value",), lambda e: [*e.config("override"), "--set", "budget.n_trials"]),
    BadInput("export of a trial that is not complete", ("not a complete trial", "pick one of"),
             lambda e: ["export", str(e.study), "--trial", "999", "--out", str(e.out("export"))]),
    BadInput("status with an unreachable password URL", ("cannot be opened", "***"),
             lambda e: ["status", str(_password_study(e))], absent=(PASSWORD,)),
)


def _password_study(env: BadInputEnv) -> Path:
    """A study folder whose snapshot points at a password-protected server that is not there."""
    folder = env.root / "pg_study"
    folder.mkdir(exist_ok=True)
    data = study_config(env.zoo, folder, name="pg")
    data["study"]["storage"] = f"postgresql://basin:{PASSWORD}@127.0.0.1:1/studies"
    (folder / "config.yaml").write_text(yaml.safe_dump(data))
    return folder


@dataclass
class BadInputResult:
    case: BadInput
    rc: int | None
    message: str
    leftovers: list[str]  # output folders created and left behind

    @property
    def problems(self) -> list[str]:
        out = [] if self.rc == 2 else [f"exit code {self.rc}, expected 2"]
        low = self.message.lower()
        out += [f"message lacks {w!r}" for w in self.case.words if w.lower() not in low]
        out += [f"message shows {w!r}" for w in self.case.absent if w in self.message]
        if self.message.count("basin: error:") != 1:
            out.append("not exactly one error message")
        if "Traceback" in self.message:
            out.append("a traceback")
        return out + [f"left {p}" for p in self.leftovers]


def run_bad_input(case: BadInput, env: BadInputEnv) -> BadInputResult:
    """Run one case through search.cli.main in this process (no worker may start: WorkerPool is
    replaced by one that fails the case)."""
    import search.study
    from search.cli import main

    argv = case.argv(env)
    outs = [p for p in (env.root / "out").glob("*")] if (env.root / "out").exists() else []
    before = {p: p.exists() for p in outs}
    existing = (env.study / "config.yaml").read_text()
    err = io.StringIO()

    class NoWorkers:
        def __init__(self, *a: Any, **k: Any) -> None:
            raise AssertionError(f"{case.name}: the study started; the bad input was not caught")

    saved, search.study.WorkerPool = search.study.WorkerPool, NoWorkers
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    finally:
        search.study.WorkerPool = saved
    leftovers = [str(p) for p in (env.root / "out").glob("*") if not before.get(p, False)] if (env.root / "out").exists() else []
    if (env.study / "config.yaml").read_text() != existing:
        leftovers.append(f"{env.study}/config.yaml changed")
    return BadInputResult(case, rc, err.getvalue(), leftovers)


# --- the figures ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = Path(args.keep or tempfile.mkdtemp(prefix="basin-reliability-"))
    say = lambda s: print(f"  [{time.strftime('%H:%M:%S')}] {s}", flush=True)  # noqa: E731
    try:
        zoo = build_zoo(root / "zoo")
        print("bad input")
        env = BadInputEnv(zoo, root / "bad")
        results = [run_bad_input(c, env) for c in BAD_INPUTS]
        for r in results:
            message = " ".join(line.strip() for line in r.message.split("\n")).removeprefix("basin: error: ")
            print(f"  {'ok ' if not r.problems else 'BAD'} {r.case.name}: {message[:150]}" + (f"  <- {r.problems}" if r.problems else ""))
        print(f"kill -9 of basin run/resume, {args.kills} times")
        kills = kill_and_resume(zoo, root / "kills", kills=args.kills, seed=args.seed, say=say)
        print("worker faults")
        faults = worker_faults(zoo, root / "faults", say=say)
        print("two runners at once")
        conc = concurrent_runners(zoo, root / "concurrent")
        print("kill -9 of basin export")
        exp = export_killed(build_big_zoo(root / "big"), root / "export")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    passed = sum(not r.problems for r in results)
    print()
    print(f"kills survived        {kills.kills} (moments: {', '.join(kills.moments)})")
    print(f"trials lost           {len(kills.lost)}{'  ' + '; '.join(kills.lost[:3]) if kills.lost else ''}")
    print(f"integrity problems    {len(kills.integrity)}{'  ' + '; '.join(kills.integrity[:3]) if kills.integrity else ''}")
    print(f"requeued after kills  {kills.requeued} trials failed as stopped and queued again")
    print(f"budget                {kills.complete} COMPLETE of {kills.budget} (final resume exit {kills.final_rc}), {kills.seconds:.0f} s")
    print(f"leaked processes      {len(kills.leaked)}{'  ' + ', '.join(kills.leaked) if kills.leaked else ''}")
    print(f"worker faults         {', '.join(f'{k}: trials {v}' for k, v in sorted(faults.errors.items()))}; "
          f"unexpected failures {len(faults.unexpected)}; {faults.complete}/{faults.budget} COMPLETE, exit {faults.rc}, {faults.seconds:.0f} s")
    print(f"two runners           exits {conc.rcs}; COMPLETE per runner {list(conc.by_runner.values())}; "
          f"{conc.complete} COMPLETE (budget {conc.budget}); integrity problems {len(conc.integrity)}; {conc.seconds:.0f} s")
    print(f"export killed         after {exp.killed_after_s:.1f} s: target exists {exp.target_exists}; "
          f"partial folders left beside it {len(exp.partial_left)}; clean export ok {exp.clean_export_ok} ({exp.clean_export_s:.1f} s), "
          f"partial folders left after it {len(exp.partial_after_clean)}")
    print(f"bad inputs tried      {len(results)}, handled {passed} (exit 2, one message naming the problem, nothing left)")
    ok = (not kills.lost and not kills.integrity and not kills.leaked and kills.final_rc == 0
          and kills.complete == kills.budget and faults.rc == 0 and not faults.unexpected and not faults.integrity
          and conc.rcs == (0, 0) and not conc.integrity and conc.complete == conc.budget and not exp.target_exists
          and not exp.partial_after_clean and passed == len(results))
    print("all good" if ok else "PROBLEMS above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
