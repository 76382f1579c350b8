"""The Pareto front (or the top trials) as a terminal table, with the baselines for comparison."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import attrs


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
    header = ["trial", "kind", "method", *names, "note"]
    rows = []
    for t in front:
        rows.append(
            [
                str(t.number),
                t.user_attrs.get(attrs.BASELINE) or "search",
                t.params.get("method", "-"),
                *(f"{v:.4f}" for v in t.values),
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
                t.params.get("method", "-"),
                *(f"{v:.4f}" for v in t.values),
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
        else f"top {len(front)} trials (score: weighted objectives, maximize)"
    )
    return title + "\n" + "\n".join(lines)
