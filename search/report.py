"""`basin report`: one self-contained HTML file (figures inline, no external URLs) plus PNG figures.

Figures: the Pareto front (pairwise when more than two objectives) with baselines; the history
(best so far against trial number); the chosen recipe's per-layer weights and densities as a
heatmap (models x depth); parameter importances. Table: the chosen (or each Pareto) trial against
each fine-tune alone and the uniform average, on the search split and on the held-out split.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import warnings
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
from search.fidelity import trial_items
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


def plot_recipe(recipe: MergeRecipe, num_layers: int, model_names: list[str], title: str) -> Figure:
    rows: list[tuple[str, list[float]]] = []
    spec = method_spec(recipe.method)
    shown = [key for key in PER_MODEL if spec.uses(key)] or ["weight"]
    for key in shown:  # the per-model values the method reads, over depth
        for name, m in zip(model_names, recipe.models):
            param = getattr(m, key)
            kinds = (
                ["attn", "mlp"] if param.attn is not None or param.mlp is not None else ["other"]
            )
            rows += [
                (
                    f"{name} {key}{'' if k == 'other' else ' ' + k}",
                    _over_depth(param, k, num_layers),
                )
                for k in kinds
            ]
    fig = Figure(figsize=(max(5.0, 0.5 * num_layers + 3), 0.45 * len(rows) + 1.5))
    ax = fig.subplots()
    image = ax.imshow([r[1] for r in rows], aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xticks(range(num_layers), [str(i) for i in range(num_layers)], fontsize=8)
    ax.set_xlabel("layer")
    for y, (_, values) in enumerate(rows):
        for x, v in enumerate(values):
            ax.text(
                x,
                y,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v < 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.03)
    ax.set_title(title)
    return fig


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


def _table(
    config: StudyConfig,
    rows: list[tuple[str, FrozenTrial]],
    heldout: dict[int, dict[str, float]],
    split: str,
) -> str:
    keys = [o.key for o in config.objectives.items]
    search = html.escape(config.evaluator.label("search"))
    head = "".join(
        f"<th>{html.escape(k)}<br>{search}</th><th>{html.escape(k)}<br>{html.escape(split)}</th>"
        for k in keys
    )
    body = []
    for label, t in rows:
        cells = []
        for k in keys:
            val, held = t.user_attrs.get(attrs.METRICS, {}).get(k), heldout.get(t.number, {}).get(k)
            cells.append(f"<td>{val:.4f}</td>" if val is not None else "<td>-</td>")
            cells.append(f"<td>{held:.4f}</td>" if held is not None else "<td>-</td>")
        body.append(f"<tr><td>{html.escape(label)}</td><td>{t.number}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th>model</th><th>trial</th>{head}</tr>{''.join(body)}</table>"


def write_report(
    folder: str | Path,
    *,
    trial: int | None = None,
    score_heldout_split: bool = True,
    progress: bool = True,
) -> Path:
    """Write report.html and the PNG figures into the study folder; returns the HTML path."""
    folder = Path(folder)
    config, study = load_study_folder(folder)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(
            f"{folder}: no complete trial yet, so there is nothing to report; run or resume the "
            f"study first (`basin status {folder}` shows where it stands)"
        )
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
            ),
            "importances": plot_importances(study, names),
        }
        if config.fidelity is not None:
            figs["items"] = plot_items(study, names)
    images = {name: _png(fig, figures_dir / f"{name}.png") for name, fig in figs.items()}

    front, baselines = front_and_baselines(study)
    finalists = front if len(study.directions) > 1 else [chosen]
    refs = [
        t
        for t in baselines
        if t.user_attrs[attrs.BASELINE].startswith("alone:")
        or t.user_attrs[attrs.BASELINE] == "uniform"
    ]
    rows = [(f"{'Pareto' if len(study.directions) > 1 else 'best'} trial", t) for t in finalists]
    rows += [(t.user_attrs[attrs.BASELINE], t) for t in refs]
    split = config.evaluator.label("report")
    heldout = {}
    if score_heldout_split and config.evaluator.has_report:
        recipes = {t.number: recipe_to_dict(trial_recipe(config, t)) for _, t in rows}
        heldout = score_heldout(folder, worker_spec(config), recipes, split, progress=progress)
    table = _table(config, rows, heldout, split)
    recipe_yaml = html.escape(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
    sections = "".join(
        f"<h2>{title}</h2><img alt='{title}' src='data:image/png;base64,{images[key]}'>"
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
    n_failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    n_pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
    if config.fidelity is not None:
        spent = items_line(study, study.get_trials(deepcopy=False))
        rungs = ", ".join(map(str, config.fidelity.rungs))
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
.warning{{background:#fdecea;border:1px solid #d1495b;padding:.6em}}</style></head><body>
<h1>basin report: {study_name}</h1>
<p>{n_complete} complete trials, {n_failed} failed; objectives: {html.escape(", ".join(names))}
({config.objectives.mode}); sampler {config.sampler.name}.</p>
<h2>Finalists against the parents</h2>
<p>Scores on the search split ({search}) and on the held-out split ({held_split}); a
finalist that leads on {search} but not on {held_split} has fitted the search set.{no_heldout}</p>
{table}{sections}
<h2>Recipe of trial {chosen.number}</h2><pre>{recipe_yaml}</pre>
<p>Export it: <code>basin export {html.escape(str(folder))} --trial {chosen.number} \
--out DIR</code></p>
</body></html>"""
    out = folder / "report.html"
    out.write_text(page)
    return out
