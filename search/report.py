"""`basin report`: one self-contained HTML file (figures inline, no external URLs) plus PNG figures.

Figures: the Pareto front (pairwise when more than two objectives) with baselines; the history
(best so far against trial number); the chosen recipe's per-layer weights and densities as a
heatmap (models x depth); parameter importances. Table: the chosen trial (several objectives: a
bounded set of front members chosen to cover the front, search.finalists, and every trial named)
against each fine-tune alone, the uniform average and the user's recipes (baselines.recipes), on the
search split and on the held-out split.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
import yaml
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from merging.catalog import PER_MODEL, method_spec
from merging.recipe import LayerParam, MergeRecipe, recipe_to_dict
from search import attrs
from search.compat import quiet_optuna
from search.config import ConfigError, StudyConfig
from search.explorer import write_explorer
from search.fidelity import study_rungs, trial_items
from search.finalists import DEFAULT_FINALISTS, choose_finalists
from search.folder import load_study_folder, study_space, trial_recipe, worker_spec
from search.heldout import score_heldout
from search.pareto import dominates, front_and_baselines, objective_names, signs
from search.summary import items_line

BASELINE_STYLE = {"marker": "s", "s": 60, "edgecolors": "black", "zorder": 3}


def _png(fig: Figure, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    if fig.canvas.manager is not None:  # a pyplot figure (Optuna's plots): let pyplot forget it
        import matplotlib.pyplot as plt

        plt.close(fig)
    path.write_bytes(buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _values(trials: list[FrozenTrial], i: int) -> list[float]:
    return [t.values[i] for t in trials]


def plot_front(study: optuna.Study, names: list[str]) -> Figure:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front, baselines = front_and_baselines(study)
    pairs = list(itertools.combinations(range(len(names)), 2)) or [(0, 0)]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig = Figure(figsize=(5 * cols, 4.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(pairs) :]:
        ax.set_visible(False)
    for ax, (i, j) in zip(axes.flat, pairs):
        if i == j:  # single objective: score against trial number
            ax.scatter(
                [t.number for t in complete],
                _values(complete, 0),
                s=14,
                c="#9aa5b1",
                label="trials",
            )
            ax.scatter(
                [t.number for t in front], _values(front, 0), s=30, c="#d1495b", label="top trials"
            )
            ax.scatter(
                [t.number for t in baselines],
                _values(baselines, 0),
                c="#edae49",
                label="baselines",
                **BASELINE_STYLE,
            )
            ax.set_xlabel("trial")
            ax.set_ylabel(names[0])
        else:
            ax.scatter(
                _values(complete, i), _values(complete, j), s=14, c="#9aa5b1", label="trials"
            )
            pts = sorted(zip(_values(front, i), _values(front, j)))
            # a line only where the front is two-dimensional; a projection of more would zig-zag
            style = "-o" if len(names) == 2 else "o"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                style,
                c="#d1495b",
                ms=5,
                label="Pareto front",
            )
            ax.scatter(
                _values(baselines, i),
                _values(baselines, j),
                c="#edae49",
                label="baselines",
                **BASELINE_STYLE,
            )
            for t in baselines:
                ax.annotate(
                    t.user_attrs[attrs.BASELINE],
                    (t.values[i], t.values[j]),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.set_xlabel(names[i])
            ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Pareto front" if len(names) > 1 else "Scores")
    return fig


def _titled(ax, title: str) -> Figure:
    """Optuna's figure with our title in place of Optuna's.

    Optuna's may sit at the left or the centre, so every place is cleared.
    """
    for loc in ("left", "center", "right"):
        ax.set_title("", loc=loc)
    ax.set_title(title)
    return ax.figure


def plot_history(study: optuna.Study, names: list[str]) -> Figure:
    """Best score against trial number; for several objectives, the front's hypervolume instead."""
    from optuna.visualization.matplotlib import plot_hypervolume_history, plot_optimization_history

    if len(names) == 1:
        return _titled(
            plot_optimization_history(study, target_name=names[0]), "History: best so far"
        )
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    reference = []  # a point just worse than every trial in each objective, as hypervolume needs
    for i, sign in enumerate(signs(study)):
        values = [sign * t.values[i] for t in complete]
        margin = max(0.05 * (max(values) - min(values)), 1e-6)
        reference.append(sign * (min(values) - margin))
    return _titled(
        plot_hypervolume_history(study, reference), "History: hypervolume of the Pareto front"
    )


def plot_items(study: optuna.Study, names: list[str]) -> Figure:
    """Each objective's best complete score against the items scored so far.

    Items scored are multi-fidelity's cost axis.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    trials = sorted(
        (t for t in study.get_trials(deepcopy=False) if t.state.is_finished()),
        key=lambda t: t.number,
    )
    sign_of, spent = signs(study), 0
    lines: list[list[tuple[int, float]]] = [[] for _ in names]
    best: list[float | None] = [None] * len(names)
    for t in trials:
        spent += trial_items(t)
        if t.state != TrialState.COMPLETE:
            continue
        for i, sign in enumerate(sign_of):
            if best[i] is None or sign * t.values[i] > sign * best[i]:
                best[i] = t.values[i]
                lines[i].append((spent, best[i]))
    for name, points in zip(names, lines):
        if points:
            points.append((spent, points[-1][1]))
            ax.step([p[0] for p in points], [p[1] for p in points], where="post", label=name)
    ax.set_xlabel("items scored (all trials, all tasks)")
    ax.set_ylabel("best score on the whole search set")
    ax.set_title("Best score against items spent")
    if len(names) > 1:
        ax.legend(fontsize="small")
    return fig


def _over_depth(param: LayerParam, kind: str, num_layers: int) -> list[float]:
    span = max(num_layers - 1, 1)
    return [param.at(i / span, kind) for i in range(num_layers)]


GLOBAL = (("lambda", "lam"), ("t", "t"))  # the recipe-wide values a method may read


def plot_recipe(
    recipe: MergeRecipe,
    num_layers: int,
    model_names: list[str],
    title: str,
    *,
    layered: bool = True,
) -> Figure:
    """Every value the method reads: per model (weight, density, ...) and recipe-wide (lambda,
    t), over depth when the space has per-layer values (`layered`), else one column."""
    rows: list[tuple[str, list[float]]] = []
    spec = method_spec(recipe.method)
    columns = num_layers if layered else 1
    shown = [key for key in PER_MODEL if spec.uses(key)] or ["weight"]
    for key in shown:  # the per-model values the method reads, over depth
        for name, m in zip(model_names, recipe.models):
            rows += _param_rows(f"{name} {key}", getattr(m, key), columns)
    for key, attr in GLOBAL:
        if spec.uses(key):
            rows += _param_rows(key, getattr(recipe, attr), columns)
    fig = Figure(figsize=(max(5.0, 0.5 * columns + 3), 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    image = ax.imshow([r[1] for r in rows], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    if layered:
        ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=8)
        ax.set_xlabel("layer")
    else:
        ax.set_xticks([0], ["every layer"], fontsize=8)
    low, high = image.get_clim()
    for y, (_, values) in enumerate(rows):
        for x, v in enumerate(values):
            dark = v < (low + high) / 2
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(title)
    return fig


def _param_rows(label: str, param: LayerParam, columns: int) -> list[tuple[str, list[float]]]:
    """One row per part the value has (attention/MLP split: two), over `columns` depths."""
    kinds = ["attn", "mlp"] if param.attn is not None or param.mlp is not None else ["other"]
    return [
        (f"{label}{'' if k == 'other' else ' ' + k}", _over_depth(param, k, columns)) for k in kinds
    ]


def plot_importances(study: optuna.Study, names: list[str]) -> Figure:
    """Parameter importances (fANOVA); for several objectives, for their mean.

    Each objective enters the mean signed so that larger is better.
    """
    from optuna.visualization.matplotlib import plot_param_importances

    sign_of = signs(study)
    target = (
        None
        if len(names) == 1
        else (lambda t: sum(s * v for s, v in zip(sign_of, t.values)) / len(t.values))
    )
    try:
        # "importances ... to achieve low target values": the sign does not matter
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*importances of params to achieve low")
            ax = plot_param_importances(
                study, target=target, target_name=names[0] if len(names) == 1 else "mean objective"
            )
    except Exception as exc:  # too few trials, or a space with no common parameters
        fig = Figure(figsize=(6.5, 3.8))
        ax = fig.subplots()
        ax.text(
            0.5,
            0.5,
            f"importances unavailable:\n{exc}",
            ha="center",
            va="center",
            wrap=True,
            fontsize=9,
        )
        ax.set_axis_off()
        return fig
    return _titled(
        ax, "Parameter importances" + ("" if len(names) == 1 else " for the mean objective")
    )


def chosen_trial(study: optuna.Study, trial: int | None) -> FrozenTrial:
    """The recipe the report shows: the one asked for, else the best searched trial: of the
    searched trials none dominates, the best mean of signed objectives (a baseline only when
    nothing was searched). The mean picks one point of a front; a minimized objective counts
    with its sign, so the largest plain sum is not taken for the best."""
    if trial is not None:
        return study.trials[trial]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    searched = [t for t in complete if not t.user_attrs.get(attrs.BASELINE)] or complete
    directions = [d.name.lower() for d in study.directions]
    front = [
        t for t in searched if not any(dominates(o.values, t.values, directions) for o in searched)
    ]
    sign_of = signs(study)
    return max(front, key=lambda t: (sum(s * v for s, v in zip(sign_of, t.values)), -t.number))


def _mean(values: list[float | None], sign_of: list[int]) -> float | None:
    """The mean of signed values (a minimized objective negated); None when one is missing."""
    if any(v is None for v in values):
        return None
    return sum(s * v for s, v in zip(sign_of, values)) / len(values)


def _cells(
    config: StudyConfig, t: FrozenTrial, heldout: dict[int, dict[str, float]], sign_of: list[int]
) -> list[float | None]:
    """A trial's columns: per objective its search and held-out values, then both means."""
    keys = [o.key for o in config.objectives.items]
    search = [t.user_attrs.get(attrs.METRICS, {}).get(k) for k in keys]
    held = [heldout.get(t.number, {}).get(k) for k in keys]
    pairs = [v for pair in zip(search, held) for v in pair]
    return [*pairs, _mean(search, sign_of), _mean(held, sign_of)]


def _header(config: StudyConfig, split: str) -> str:
    search = html.escape(config.evaluator.label("search"))
    keys = [html.escape(o.key) for o in config.objectives.items] + ["mean"]
    return "".join(f"<th>{k}<br>{search}</th><th>{k}<br>{html.escape(split)}</th>" for k in keys)


def _rows_html(
    rows: list[tuple[str, int | str, list[float | None]]], best: list[float | None], diff: bool
) -> str:
    out = []
    for label, number, values in rows:
        cells = []
        for v, top in zip(values, best):
            text = "-" if v is None else (f"{v:+.4f}" if diff else f"{v:.4f}")
            marked = not diff and v is not None and top is not None and v == top
            cells.append(f"<td><b>{text}</b></td>" if marked else f"<td>{text}</td>")
        out.append(f"<tr><td>{html.escape(label)}</td><td>{number}</td>{''.join(cells)}</tr>")
    return "".join(out)


def _best_per_column(rows: list[list[float | None]], directions: list[int]) -> list[float | None]:
    """Per column, the best value of the rows (a column's direction: +1 larger is better)."""
    best = []
    for j, sign in enumerate(directions):
        column = [r[j] for r in rows if r[j] is not None]
        best.append(max(column, key=lambda v: sign * v) if column else None)
    return best


def _column_signs(sign_of: list[int]) -> list[int]:
    return [s for s in sign_of for _ in (0, 1)] + [1, 1]  # search and held-out; means are signed


def _table(
    config: StudyConfig,
    rows: list[tuple[str, FrozenTrial]],
    heldout: dict[int, dict[str, float]],
    split: str,
    sign_of: list[int],
) -> str:
    """Each row once (a finalist that is also a baseline keeps its name), with a mean column and the
    best value of each column in bold."""
    seen, kept = set(), []
    for label, t in rows:
        if t.number not in seen:
            seen.add(t.number)
            kept.append((label, t.number, _cells(config, t, heldout, sign_of)))
    best = _best_per_column([values for _, _, values in kept], _column_signs(sign_of))
    head = _header(config, split)
    return (
        f"<table><tr><th>model</th><th>trial</th>{head}</tr>{_rows_html(kept, best, False)}</table>"
    )


def _baseline_name(t: FrozenTrial) -> str:
    return str(t.user_attrs[attrs.BASELINE])


def headline_trials(study: optuna.Study, chosen: FrozenTrial) -> list[tuple[str, FrozenTrial]]:
    """The headline's rows: the best found, the best parent (a fine-tune alone) and the best
    baseline, each by its signed mean on the search split; a row that is not there is left out."""
    sign_of = signs(study)
    baselines = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(attrs.BASELINE)
    ]

    def best(trials: list[FrozenTrial]) -> FrozenTrial | None:
        score = lambda t: (_mean(list(t.values), sign_of), -t.number)  # noqa: E731
        return max(trials, key=score) if trials else None

    parent = best([t for t in baselines if _baseline_name(t).startswith("alone:")])
    baseline = best(baselines)
    rows = [("best found", chosen)]
    if parent is not None:
        rows.append((f"best parent: {_baseline_name(parent).split(':', 1)[1]}", parent))
    if baseline is not None:
        rows.append((f"best baseline: {_baseline_name(baseline)}", baseline))
    return rows


def _headline(
    config: StudyConfig,
    rows: list[tuple[str, FrozenTrial]],
    method: str,
    heldout: dict[int, dict[str, float]],
    split: str,
    sign_of: list[int],
) -> str:
    """One sentence and one table: the best found against the best parent and the best baseline,
    per objective and on the mean, search split and held out, with the differences."""
    values = [(label, t.number, _cells(config, t, heldout, sign_of)) for label, t in rows]
    best = _best_per_column([v for _, _, v in values], _column_signs(sign_of))
    found = values[0][2]
    diffs = [
        (
            f"best found - {label.split(':', 1)[0]}",
            "",
            [None if a is None or b is None else a - b for a, b in zip(found, other)],
        )
        for label, _, other in values[1:]
    ]
    search = config.evaluator.label("search")
    number = rows[0][1].number
    sentence = f"Trial {number} ({method}) scores a mean of {found[-2]:.4f} on {search}"
    if found[-1] is not None:
        sentence += f" and {found[-1]:.4f} held out ({split})"
    for (label, _, _), (_, _, d) in zip(values[1:], diffs):
        role, who = label.split(": ", 1)
        kind = "the best fine-tune alone" if role == "best parent" else "the best baseline"
        held = f", {d[-1]:+.4f} held out" if d[-1] is not None else ""
        sentence += f"; {d[-2]:+.4f} against {kind} ({who}){held}"
    table = (
        f"<table><tr><th></th><th>trial</th>{_header(config, split)}</tr>"
        f"{_rows_html(values, best, False)}{_rows_html(diffs, best, True)}</table>"
    )
    return f"<p class='headline'>{html.escape(sentence)}.</p>{table}"


def _check_named(study: optuna.Study, folder: Path, numbers: Sequence[int]) -> None:
    done = [t.number for t in study.trials if t.state == TrialState.COMPLETE]
    for n in numbers:
        if not 0 <= n < len(study.trials) or study.trials[n].state != TrialState.COMPLETE:
            raise ConfigError(
                f"trial {n} is not a complete trial of this study; pick one of {done[:20]}"
                f"{' ...' if len(done) > 20 else ''} (`basin pareto {folder}` shows the front)"
            )


def report_finalists(
    study: optuna.Study, chosen: FrozenTrial, k: int, named: Sequence[int]
) -> list[FrozenTrial]:
    """The trials the finalists table shows and held-out scoring scores, by trial number: one
    objective, the chosen trial; several, at most `k` front members chosen to cover the front
    (search.finalists, led by the best searched trial); with each named trial on top."""
    if len(study.directions) == 1:
        numbers = sorted({chosen.number, *named})
    else:
        front, _ = front_and_baselines(study)
        sign_of = signs(study)
        signed = {t.number: [s * v for s, v in zip(sign_of, t.values)] for t in front}
        anchor = chosen_trial(study, None).number  # what the headline shows unless told otherwise
        numbers = choose_finalists(signed, k, [chosen.number, *named], anchor=anchor)
    return [study.trials[n] for n in numbers]


def left_out_note(
    folder: Path, front: list[FrozenTrial], shown: list[FrozenTrial], split: str | None
) -> str:
    """The sentence that says how many front members the finalists table leaves out (held out:
    scored on `split`, when held-out scores were made) and the commands that add them; empty when
    none is left out."""
    numbers = {t.number for t in shown}
    left = [t.number for t in front if t.number not in numbers]
    if not left:
        return ""
    where = shlex.quote(str(folder))
    done = len(front) - len(left)
    what = f"were scored on the held-out split ({split})" if split else "are in this table"
    example = ",".join(map(str, left[:2]))
    return (
        f"{done} of {len(front)} front members {what}: the best searched trial, the best on each "
        "objective, then those farthest from the ones chosen, to cover the front, and any named "
        f"with --trial. To {'score' if split else 'show'} the {len(left)} left out: "
        f"basin report {where} --finalists {len(front)}, or some of them: basin report {where} "
        f"--trial {left[0]} (repeatable, or a comma list such as {example}). The explorer shows "
        "every trial."
    )


def write_report(
    folder: str | Path,
    *,
    trial: int | None = None,
    named: Sequence[int] = (),
    finalists: int = DEFAULT_FINALISTS,
    score_heldout_split: bool = True,
    progress: bool = True,
) -> Path:
    """Write report.html and the PNG figures into the study folder; returns the HTML path.

    `trial` is the recipe to show; `finalists` bounds the front members scored on the held-out
    split (several objectives), `named` trials are scored besides them.
    """
    folder = Path(folder)
    config, study = load_study_folder(folder)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(
            f"{folder}: no complete trial yet, so there is nothing to report; run or resume the "
            f"study first (`basin status {folder}` shows where it stands)"
        )
    _check_named(study, folder, [*named, *([] if trial is None else [trial])])
    names = objective_names(study)
    figures_dir = folder / "figures"
    figures_dir.mkdir(exist_ok=True)
    chosen = chosen_trial(study, trial)
    recipe = trial_recipe(config, chosen)
    space = study_space(config)
    with quiet_optuna():
        figs = {
            "pareto": plot_front(study, names),
            "history": plot_history(study, names),
            "recipe": plot_recipe(
                recipe,
                space.num_layers,
                list(space.model_names),
                f"trial {chosen.number}: {recipe.method}",
                layered=config.space.granularity != "model",
            ),
            "importances": plot_importances(study, names),
        }
        if study_rungs(config, study):
            figs["items"] = plot_items(study, names)
    images = {name: _png(fig, figures_dir / f"{name}.png") for name, fig in figs.items()}

    front, baselines = front_and_baselines(study)
    shown = report_finalists(study, chosen, finalists, named)
    on_front = {t.number for t in front} if len(study.directions) > 1 else {chosen.number}
    refs = [  # each fine-tune alone, the uniform average, and the user's own recipes
        t
        for t in baselines
        if t.user_attrs[attrs.BASELINE].startswith("alone:")
        or t.user_attrs[attrs.BASELINE] == "uniform"
        or attrs.RECIPE_FILE in t.user_attrs
    ]
    kind = f"{'Pareto' if len(study.directions) > 1 else 'best'} trial"

    def label(t: FrozenTrial) -> str:
        if t.user_attrs.get(attrs.BASELINE):
            return _baseline_name(t)
        if t.number in on_front:
            return kind
        return "chosen trial" if t.number == chosen.number else "named trial"

    rows = [(label(t), t) for t in shown]
    rows += [(_baseline_name(t), t) for t in refs]
    heads = headline_trials(study, chosen)
    split = config.evaluator.label("report")
    heldout = {}
    scored = score_heldout_split and config.evaluator.has_report
    left_out = (  # one objective: its top trials are no front to cover
        left_out_note(folder, front, shown, split if scored else None)
        if len(study.directions) > 1
        else ""
    )
    if scored:
        recipes = {t.number: recipe_to_dict(trial_recipe(config, t)) for _, t in rows + heads}
        heldout = score_heldout(folder, worker_spec(config), recipes, split, progress=progress)
    sign_of = signs(study)
    table = _table(config, rows, heldout, split, sign_of)
    explorer = write_explorer(folder, config, study, heldout, split)
    headline = _headline(config, heads, recipe.method, heldout, split, sign_of)
    recipe_yaml = html.escape(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    captions = {
        "pareto": (
            f"<p>Front: the trials no other trial beats on every objective at once. Each panel is "
            f"a 2-D view of the {len(names)}-D front, so a front point can look dominated in a "
            f"panel. The <a href='{explorer.name}'>explorer</a> shows every trial with its number "
            "and export command, and filters by ranges on any objective.</p>"
            if len(names) > 2
            else ""
        )
    }
    sections = "".join(
        f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{images[key]}'>"
        + captions.get(key, "")
        for key, title in (
            ("pareto", "Pareto front" if len(names) > 1 else "Scores"),
            ("history", "History"),
            ("items", "Best score against items spent"),
            ("recipe", f"Chosen recipe (trial {chosen.number})"),
            ("importances", "Parameter importances"),
        )
        if key in images
    )
    search = html.escape(config.evaluator.label("search"))
    no_heldout = (
        ""
        if config.evaluator.has_report
        else " This study names no held-out data (evaluator.report_text)."
    )
    if (overlap := config.evaluator.overlap()) is not None:
        no_heldout += f"</p><p class='warning'><b>Warning:</b> {html.escape(overlap)}."
    elif (carve := config.evaluator.carve("report")) is not None:
        no_heldout += (
            f" The held-out items are {carve.fraction:.0%} of {carve.split}, carved "
            "before the search began (carve.json); the search never scored them."
        )
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    n_failed = sum(attrs.failed(t) for t in study.get_trials(deepcopy=False))
    n_pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    if planned := study_rungs(config, study):
        spent = items_line(study, study.get_trials(deepcopy=False))
        rungs = ", ".join(map(str, planned))
        no_heldout += (
            f"</p><p>Multi-fidelity: {n_pruned} candidates were stopped early (PRUNED) on rungs of "
            f"{rungs} items per task; {html.escape(spent or '')}. "
            "Every finalist was scored on the whole search set."
        )
    study_name, held_split = html.escape(config.study.name), html.escape(split)
    # a backslash at a line's end continues the line: the page has no line break there
    page = f"""<!doctype html><html><head><meta charset="utf-8">\
<title>basin report: {study_name}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}\
img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}pre{{background:#f5f5f5;padding:1em}}
.warning{{background:#fdecea;border:1px solid #d1495b;padding:.6em}}
.headline{{font-size:1.15em}}</style></head><body>
<h1>basin report: {study_name}</h1>
<p>{n_complete} complete trials, {n_failed} failed; objectives: {html.escape(", ".join(names))}
({config.objectives.mode}); sampler {config.sampler.name}.</p>
<h2>What the search found</h2>
{headline}
<p><a href="{explorer.name}">Open the trade-off explorer</a> ({explorer.name}, beside this report):
every trial with its scores and export command, ranges brushed on any objective, the axes you
pick.</p>
<p>Best value of each column in bold; the mean is over the objectives (a minimized one
negated).</p>
<h2>Finalists against the parents</h2>
<p>Scores on the search split ({search}) and on the held-out split ({held_split}); a
finalist that leads on {search} but not on {held_split} has fitted the search set.{no_heldout}</p>
{f"<p class='left-out'>{html.escape(left_out)}</p>" if left_out else ""}
{table}{sections}
<h2>Recipe of trial {chosen.number}</h2><pre>{recipe_yaml}</pre>
<p>Export it: <code>basin export {html.escape(str(folder))} --trial {chosen.number} \
--out DIR</code></p>
</body></html>"""
    out = folder / "report.html"
    out.write_text(page)
    return out
