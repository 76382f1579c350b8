"""What a study holds, read from outside its runs: storage and records, and their integrity."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrialView:
    number: int
    state: str
    # JSON, keys sorted: its params, or the fixed params of an enqueued trial not yet suggested
    params: str
    values: tuple | None
    baseline: str | None
    retry_of: int | None
    runner: int | None  # the pid of the run that asked it
    error: str | None
    # JSON, keys sorted: the params it has in storage ({} when killed before suggest)
    suggested: str
    rungs: int = 0  # multi-fidelity: rung values reported


DONE = ("COMPLETE", "PRUNED")  # finished trials that count toward the budget


def storage_view(folder: Path) -> list[TrialView]:
    """Every trial in the study's storage, in number order ([] before the study exists)."""
    import optuna

    from search import records
    from search.config import config_from_dict

    if not (folder / records.CONFIG_FILE).is_file():
        return []
    config = config_from_dict(records.read_config_snapshot(folder))
    try:
        study = optuna.load_study(
            study_name=config.study.name, storage=records.open_storage(folder, config.study.storage)
        )
    except KeyError:
        return []
    out = []
    for t in study.get_trials(deepcopy=False):
        params = t.params or t.system_attrs.get("fixed_params", {})
        out.append(
            TrialView(
                t.number,
                t.state.name,
                json.dumps(params, sort_keys=True),
                tuple(t.values) if t.values else None,
                t.user_attrs.get("baseline"),
                t.user_attrs.get("retry_of"),
                (t.user_attrs.get("runner") or {}).get("pid"),
                t.user_attrs.get("error"),
                json.dumps(t.params, sort_keys=True),
                len(t.intermediate_values),
            )
        )
    return out


def records_view(folder: Path) -> dict[int, dict]:
    from search.records import read_trial_records

    return read_trial_records(folder) if (folder / "trials").is_dir() else {}


def changed_complete(
    before: list[TrialView],
    before_records: dict[int, dict],
    after: list[TrialView],
    after_records: dict[int, dict],
) -> list[str]:
    """COMPLETE (or PRUNED) trials (storage or record) before that are missing or different
    after."""
    now = {t.number: t for t in after}
    problems = [
        f"trial {t.number} was {t.state} and is now {now.get(t.number)}"
        for t in before
        if t.state in DONE and now.get(t.number) != t
    ]
    problems += [
        f"record {n} was {r['state']} and is now {after_records.get(n)}"
        for n, r in before_records.items()
        if r["state"] in DONE and after_records.get(n) != r
    ]
    return problems


def integrity_problems(trials: list[TrialView], recs: dict[int, dict]) -> list[str]:
    """Numbers used once; no params completed twice; every requeued trial queued again exactly once;
    every finished trial's record agrees with storage."""
    problems = []
    numbers = [t.number for t in trials]
    if len(set(numbers)) != len(numbers) or numbers != list(range(len(numbers))):
        problems.append(f"trial numbers are not 0..n-1 used once: {numbers}")
    by_number = {t.number: t for t in trials}
    complete = [t for t in trials if t.state in DONE]
    for params, n in Counter(t.params for t in complete).items():
        if n > 1:
            problems.append(
                f"{n} COMPLETE or PRUNED trials share params {params}: "
                f"{[(t.number, t.retry_of) for t in complete if t.params == params]}"
            )
    retries = Counter(t.retry_of for t in trials if t.retry_of is not None)
    for target, n in retries.items():
        original = by_number.get(target)
        if n != 1 or original is None or original.state != "FAIL":
            problems.append(f"trial {target} ({original}) has {n} retries")
    for t in trials:
        if t.state == "FAIL" and "queued again" in (t.error or ""):
            if retries.get(t.number) != 1:
                problems.append(
                    f"trial {t.number} failed as interrupted "
                    "but its params were not queued again once"
                )
            retry = next((r for r in trials if r.retry_of == t.number), None)
            # a trial killed halfway through suggest passes on the params it had; the retry draws
            # the rest
            if (
                retry is not None
                and not json.loads(t.params).items() <= json.loads(retry.params).items()
            ):
                problems.append(f"retry {retry.number} of trial {t.number} has other params")
            if retry is not None and retry.baseline != t.baseline:
                problems.append(f"retry {retry.number} lost the baseline name of trial {t.number}")
    for t in trials:
        if t.state in (*DONE, "FAIL"):
            r = recs.get(t.number)
            # (the record holds what storage holds: no params for a trial killed between ask and
            # suggest)
            if (
                r is None
                or r["state"] != t.state
                or json.dumps(r["params"], sort_keys=True) != t.suggested
                or (t.state in DONE and t.values is not None and tuple(r["values"]) != t.values)
            ):
                problems.append(f"record of trial {t.number} disagrees with storage: {r} vs {t}")
    problems += [
        f"record {n} has no finished trial in storage"
        for n in recs
        if n not in by_number or by_number[n].state not in (*DONE, "FAIL")
    ]
    return problems
