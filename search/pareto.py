"""The Pareto front (or the top trials) as a terminal table, with the baselines for comparison."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import attrs
from search.config import ConfigError


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """Whether values a are at least as good as b everywhere and better somewhere."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d == "minimize":
            x, y = -x, -y
        if x < y:
            return False
        better |= x > y
    return better


def front_and_baselines(
    study: optuna.Study, top: int = 5
) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    """The Pareto front (single objective: the `top` best trials) and the baseline trials."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baselines = [t for t in complete if t.user_attrs.get(attrs.BASELINE)]
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: t.number)
    else:
        sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
        front = sorted(complete, key=lambda t: sign * t.values[0])[:top]
    return front, sorted(baselines, key=lambda t: t.number)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def value_columns(study: optuna.Study) -> list[tuple[str, Callable[[FrozenTrial], float | None]]]:
    """The value columns of a table, each objective as the user wrote it: a Pareto study's values
    as they are; a single-objective study's weighted score (larger is better, a minimized metric
    entering negated), then each objective's metric as scored where the score is not that metric
    itself."""
    if len(study.directions) > 1:
        return [(name, lambda t, i=i: t.values[i]) for i, name in enumerate(objective_names(study))]
    columns: list[tuple[str, Callable[[FrozenTrial], float | None]]] = [
        ("score", lambda t: t.values[0])
    ]
    keys = study.user_attrs.get(attrs.OBJECTIVE_KEYS) or []
    directions = study.user_attrs.get(attrs.DIRECTIONS) or []
    if len(keys) > 1 or "minimize" in directions:
        columns += [
            (key, lambda t, key=key: t.user_attrs.get(attrs.METRICS, {}).get(key)) for key in keys
        ]
    return columns


def trial_method(t: FrozenTrial) -> str:
    """The merge method of a trial: its param, or its own recipe's ('-': the space's only one)."""
    if "method" in t.params:
        return str(t.params["method"])
    return str(t.user_attrs.get(attrs.RECIPE, {}).get("method", "-"))


def objective_names(study: optuna.Study) -> list[str]:
    keys = study.user_attrs.get(attrs.OBJECTIVE_KEYS) or [
        f"objective {i}" for i in range(len(study.directions))
    ]
    return ["score"] if len(study.directions) == 1 else list(keys)


def pareto_table(study: optuna.Study, top: int = 5) -> str:
    """Rows: the front (or top trials), then the baselines; a baseline the front dominates is
    marked."""
    front, baselines = front_and_baselines(study, top)
    directions = [d.name.lower() for d in study.directions]
    names = objective_names(study)
    columns = value_columns(study)
    header = ["trial", "kind", "method", *(c for c, _ in columns), "note"]
    rows = []
    for t in front:
        rows.append(
            [
                str(t.number),
                t.user_attrs.get(attrs.BASELINE) or "search",
                trial_method(t),
                *(_fmt(get(t)) for _, get in columns),
                "front" if len(directions) > 1 else "",
            ]
        )
    for t in baselines:
        if t in front:
            continue
        beaten = [f.number for f in front if dominates(f.values, t.values, directions)]
        note = f"dominated by {', '.join(map(str, beaten[:3]))}" if beaten else "not dominated"
        rows.append(
            [
                str(t.number),
                t.user_attrs[attrs.BASELINE],
                trial_method(t),
                *(_fmt(get(t)) for _, get in columns),
                note,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    scored = ", ".join(f"{n} {d}" for n, d in zip(names, directions))
    title = (
        f"Pareto front: {len(front)} trials ({scored})"
        if len(directions) > 1
        else f"top {len(front)} trials (score: {_score_words(study)})"
    )
    return title + "\n" + "\n".join(lines)


def _score_words(study: optuna.Study) -> str:
    keys = study.user_attrs.get(attrs.OBJECTIVE_KEYS) or []
    directions = study.user_attrs.get(attrs.DIRECTIONS) or []
    if len(keys) == 1 and directions == ["minimize"]:
        return f"-{keys[0]}, larger is better"
    words = "the weighted objectives" if len(keys) > 1 else "the objective"
    if "minimize" in directions:
        words += ", a minimized one negated"
    return f"{words}, larger is better"


@dataclass(frozen=True)
class Condition:
    """One filter on a trial's metric: `key op value`, such as zoo_add/acc>=0.9."""

    key: str
    op: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        got = metrics.get(self.key)
        return got is not None and OPS[self.op](got, self.value)


OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}
_CONDITION = re.compile(r"^\s*(?P<key>[^<>=\s]+)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>\S+)\s*$")


def parse_where(texts: Sequence[str], known: Sequence[str]) -> list[Condition]:
    """Conditions from --where texts, each one or more joined by "and" or commas; a key is a
    metric's full name or a part of it that names exactly one."""
    out = []
    for text in texts:
        for part in re.split(r"\s+and\s+|,", text):
            match = _CONDITION.match(part)
            if match is None:
                raise ConfigError(
                    f"--where {part.strip()!r}: expected METRIC OP VALUE with OP one of "
                    f'{", ".join(OPS)}, e.g. --where "{known[0] if known else "task/acc"}>=0.9"'
                )
            try:
                value = float(match["value"])
            except ValueError:
                raise ConfigError(
                    f"--where {part.strip()!r}: {match['value']!r} is not a number"
                ) from None
            out.append(Condition(_metric_key(match["key"], known), match["op"], value))
    return out


def _metric_key(given: str, known: Sequence[str]) -> str:
    if given in known:
        return given
    partial = [k for k in known if given in k]
    if len(partial) == 1:
        return partial[0]
    close = difflib.get_close_matches(given, list(known), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    what = "names several metrics" if partial else "is no metric of this study"
    raise ConfigError(f"--where: '{given}' {what}{hint} Known: {', '.join(known)}")


def kept_table(
    study: optuna.Study,
    folder: str,
    where: Sequence[str],
    sort: str = "mean",
) -> str:
    """Every complete trial whose metrics meet the conditions, best first by `sort` (the signed
    mean of the objectives, or one metric), marked when on the front, with its export command."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    known = sorted({k for t in complete for k in t.user_attrs.get(attrs.METRICS, {})})
    conditions = parse_where(where, known)
    names, sign_of = objective_names(study), signs(study)
    front = {t.number for t in study.best_trials} if len(sign_of) > 1 else set()
    kept = [t for t in complete if all(c.holds(_metrics(t)) for c in conditions)]
    if sort == "mean":
        kept.sort(key=lambda t: (-_mean(t, sign_of), t.number))
    else:
        key = _metric_key(sort, known)
        sign = sign_of[names.index(key)] if key in names else 1.0
        kept.sort(key=lambda t: (-sign * _metrics(t).get(key, float("-inf")), t.number))
    columns = value_columns(study)
    header = ["trial", "kind", *(c for c, _ in columns), "mean", "front", "export"]
    rows = [
        [
            str(t.number),
            t.user_attrs.get(attrs.BASELINE) or "search",
            *(_fmt(get(t)) for _, get in columns),
            f"{_mean(t, sign_of):.4f}",
            "yes" if t.number in front else "",
            f"basin export {folder} --trial {t.number} --out merged-{t.number}",
        ]
        for t in kept
    ]
    shown = " and ".join(f"{c.key}{c.op}{c.value:g}" for c in conditions) or "every trial"
    title = f"{len(kept)} of {len(complete)} complete trials meet {shown}, best {sort} first"
    if not rows:
        return title
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return title + "\n" + "\n".join(lines)


def signs(study: optuna.Study) -> list[float]:
    """+1 for a maximized objective, -1 for a minimized one: signed values are larger-is-better."""
    return [1.0 if d == optuna.study.StudyDirection.MAXIMIZE else -1.0 for d in study.directions]


def _metrics(t: FrozenTrial) -> dict[str, float]:
    return t.user_attrs.get(attrs.METRICS, {})


def _mean(t: FrozenTrial, sign_of: Sequence[float]) -> float:
    """The mean of a trial's objective values, each signed so that larger is better."""
    return sum(s * v for s, v in zip(sign_of, t.values)) / len(sign_of)
