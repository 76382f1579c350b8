"""explorer.html: one self-contained page to explore a study's trade-offs in a browser.

Every complete trial is a point in a pairwise scatter (the x and y objectives picked from two
menus) and, with three objectives or more, a line in a parallel-coordinates plot whose axes can be
brushed: the trials left inside every brushed range are listed under it with their export
commands. plotly.js is inlined; the page loads nothing from the network.

The page is built from plain data (`explorer_rows`); plotly draws it, and a short inline script
only swaps the scatter's axes and lists the trials a brush keeps.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState

from search import attrs
from search.config import StudyConfig
from search.folder import study_space, trial_recipe
from search.pareto import front_and_baselines, objective_names

EXPLORER_FILE = "explorer.html"
SCATTER_ID = "explorer-scatter"
PARCOORDS_ID = "explorer-parcoords"
TRIAL_AXIS = "trial number"
FRONT_CAPTION = (
    "front: trials no other trial beats on every objective at once; "
    "in a 2-D view a front point can look dominated"
)
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
# the scatter's traces, in this order: searched trials off the front, on it, and the baselines
TRACES = ("other trials", "front", "baselines")


def export_command(folder: Path, number: int) -> str:
    return f"basin export {shlex.quote(str(folder))} --trial {number} --out DIR"


def front_numbers(study: optuna.Study, complete: list[FrozenTrial]) -> set[int]:
    """Trials no other complete trial beats on every objective at once (one objective: the best
    value, every trial that reaches it)."""
    if len(study.directions) > 1:
        return {t.number for t in front_and_baselines(study)[0]}
    values = [t.values[0] for t in complete]
    best = max(values) if study.direction == optuna.study.StudyDirection.MAXIMIZE else min(values)
    return {t.number for t in complete if t.values[0] == best}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def explorer_rows(
    folder: Path,
    config: StudyConfig,
    study: optuna.Study,
    heldout: dict[int, dict[str, float]],
    heldout_split: str,
) -> list[dict[str, Any]]:
    """One plain dict per complete trial: number, kind, method, values (the study's objectives),
    front, export command and the hover text."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = front_numbers(study, complete) if complete else set()
    names = objective_names(study)
    keys = [o.key for o in config.objectives.items]
    search_split = config.evaluator.label("search")
    space = study_space(config, study.user_attrs.get(attrs.NUM_LAYERS))
    rows = []
    for t in complete:
        kind = t.user_attrs.get(attrs.BASELINE) or "search"
        method = trial_recipe(config, t, space).method
        metrics, held = t.user_attrs.get(attrs.METRICS, {}), heldout.get(t.number, {})
        lines = [f"trial {t.number} ({kind}), {method}"]
        if names != keys:  # one weighted score over several metrics
            lines.append(f"{names[0]}: {_fmt(t.values[0])}")
        for k in keys:
            line = f"{k}: {_fmt(metrics.get(k))} {search_split}"
            if k in held:
                line += f", {_fmt(held[k])} {heldout_split}"
            lines.append(line)
        lines.append("on the front" if t.number in front else "not on the front")
        command = export_command(folder, t.number)
        lines.append(command)
        rows.append(
            {
                "number": t.number,
                "kind": kind,
                "method": method,
                "values": list(t.values),
                "front": t.number in front,
                "export": command,
                # plotly's hover text is a little HTML: <br> breaks lines, < > & are escaped
                "hover": "<br>".join(html.escape(line, quote=False) for line in lines),
            }
        )
    return rows


def axis_values(rows: list[dict[str, Any]], names: list[str]) -> dict[str, list[float | None]]:
    """Each axis the scatter can show (every objective, then the trial number): one value per
    row (None for an infinite one, which JSON cannot hold; plotly leaves it out)."""
    out: dict[str, list[float | None]] = {
        name: [v if math.isfinite(v := r["values"][i]) else None for r in rows]
        for i, name in enumerate(names)
    }
    out[TRIAL_AXIS] = [float(r["number"]) for r in rows]
    return out


def trace_rows(rows: list[dict[str, Any]]) -> list[list[int]]:
    """The row indices of each scatter trace (TRACES)."""
    searched = [i for i, r in enumerate(rows) if r["kind"] == "search"]
    return [
        [i for i in searched if not rows[i]["front"]],
        [i for i in searched if rows[i]["front"]],
        [i for i, r in enumerate(rows) if r["kind"] != "search"],
    ]


def _axis_title(name: str, names: list[str], directions: list[str]) -> str:
    return name if name == TRIAL_AXIS else f"{name} ({directions[names.index(name)]})"


def scatter_figure(
    rows: list[dict[str, Any]], names: list[str], directions: list[str], x: str, y: str
) -> go.Figure:
    """Searched trials (grey, the front in red), baselines as labelled squares (a red edge when
    on the front); x and y are axes of `axis_values`."""
    values = axis_values(rows, names)
    fig = go.Figure()
    styles = [
        {"mode": "markers", "marker": {"color": "#9e9e9e", "size": 8}},
        {"mode": "markers", "marker": {"color": "#d1495b", "size": 11}},
        {
            "mode": "markers+text",
            "textposition": "top center",
            "marker": {"symbol": "square", "size": 12, "color": "#edae49"},
        },
    ]
    for name, idx, style in zip(TRACES, trace_rows(rows), styles):
        trace_style = dict(style)
        if name == "baselines":
            edge = ["#d1495b" if rows[i]["front"] else "#333333" for i in idx]
            trace_style["marker"] = {**style["marker"], "line": {"color": edge, "width": 2}}
            trace_style["text"] = [rows[i]["kind"] for i in idx]
        fig.add_trace(
            go.Scatter(
                name=name,
                x=[values[x][i] for i in idx],
                y=[values[y][i] for i in idx],
                hovertext=[rows[i]["hover"] for i in idx],
                hoverinfo="text",
                **trace_style,
            )
        )
    fig.update_layout(
        template="plotly_white",
        height=560,
        margin={"t": 30},
        hoverlabel={"align": "left"},
        xaxis_title=_axis_title(x, names, directions),
        yaxis_title=_axis_title(y, names, directions),
    )
    return fig


def parcoords_figure(
    rows: list[dict[str, Any]], names: list[str], directions: list[str]
) -> go.Figure:
    """One axis per objective, then front membership (0/1) and the trial number; front lines red."""
    dims = [
        {"label": f"{n} ({d})", "values": [r["values"][i] for r in rows]}
        for i, (n, d) in enumerate(zip(names, directions))
    ]
    front = [int(r["front"]) for r in rows]
    dims.append(
        {
            "label": "front",
            "values": front,
            "range": [0, 1],
            "tickvals": [0, 1],
            "ticktext": ["no", "yes"],
        }
    )
    dims.append({"label": "trial", "values": [r["number"] for r in rows]})
    fig = go.Figure(
        go.Parcoords(
            dimensions=dims,
            line={
                "color": front,
                "colorscale": [[0, "#9e9e9e"], [1, "#d1495b"]],
                "cmin": 0,
                "cmax": 1,
            },
        )
    )
    fig.update_layout(template="plotly_white", height=460, margin={"l": 80, "r": 80, "t": 60})
    return fig


# The glue: swap the scatter's axes on the menus' change; list the trials every brushed parcoords
# range keeps on plotly_restyle (plotly emits it when the user brushes an axis).
_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("explorer-data").textContent);
  var scatter = document.getElementById(data.scatter_id);
  var xSel = document.getElementById("explorer-x"), ySel = document.getElementById("explorer-y");
  function title(name) {
    var i = data.names.indexOf(name);
    return i < 0 ? name : name + " (" + data.directions[i] + ")";
  }
  function swapAxes() {
    var x = xSel.value, y = ySel.value;
    function pick(axis) {
      return data.traces.map(function (idx) {
        return idx.map(function (i) { return data.axes[axis][i]; });
      });
    }
    var xs = pick(x), ys = pick(y);
    Plotly.update(scatter, {x: xs, y: ys},
                  {"xaxis.title.text": title(x), "yaxis.title.text": title(y)},
                  data.traces.map(function (_, k) { return k; }));
  }
  xSel.addEventListener("change", swapAxes);
  ySel.addEventListener("change", swapAxes);

  var par = document.getElementById(data.parcoords_id);
  if (!par) return;
  var kept = document.getElementById("explorer-kept");
  var list = document.getElementById("explorer-kept-list");
  function inRanges(v, cr) {
    var ranges = typeof cr[0] === "number" ? [cr] : cr;
    return ranges.some(function (r) { return v >= r[0] && v <= r[1]; });
  }
  function listKept() {
    var dims = par.data[0].dimensions;
    var keep = data.rows.filter(function (row, i) {
      return dims.every(function (d) {
        var cr = d.constraintrange;
        return !cr || cr.length === 0 || inRanges(d.values[i], cr);
      });
    });
    kept.textContent = keep.length + " of " + data.rows.length + " trials remain" +
      (keep.length ? ":" : " (clear a brush by clicking its axis outside the range)");
    list.replaceChildren.apply(list, keep.map(function (row) {
      var li = document.createElement("li"), code = document.createElement("code");
      li.dataset.trial = row.number;
      li.appendChild(document.createTextNode("trial " + row.number + " (" + row.kind + "): "));
      code.textContent = row.export;
      li.appendChild(code);
      return li;
    }));
  }
  par.on("plotly_restyle", listKept);
  listKept();
})();
"""


def _json_for_script(value: Any) -> str:
    """JSON safe inside a <script> element."""
    return json.dumps(value, allow_nan=False).replace("</", "<\\/")


def explorer_page(
    folder: Path,
    config: StudyConfig,
    study: optuna.Study,
    heldout: dict[int, dict[str, float]],
    heldout_split: str,
) -> str:
    """The whole page as one string."""
    names = objective_names(study)
    directions = [d.name.lower() for d in study.directions]
    rows = explorer_rows(folder, config, study, heldout, heldout_split)
    choices = [*names, TRIAL_AXIS]
    x, y = (names[0], names[1]) if len(names) > 1 else (TRIAL_AXIS, names[0])
    plots = [(SCATTER_ID, scatter_figure(rows, names, directions, x, y))]
    if len(names) >= 3:
        plots.append((PARCOORDS_ID, parcoords_figure(rows, names, directions)))
    divs = [
        pio.to_html(
            fig,
            full_html=False,
            include_plotlyjs=(i == 0),  # inline, once
            include_mathjax=False,
            config=PLOTLY_CONFIG,
            div_id=div_id,
        )
        for i, (div_id, fig) in enumerate(plots)
    ]

    def menu(select_id: str, chosen: str) -> str:
        options = "".join(
            f"<option value='{html.escape(c)}'{' selected' if c == chosen else ''}>"
            f"{html.escape(c)}</option>"
            for c in choices
        )
        return f"<select id='{select_id}'>{options}</select>"

    blob = {
        "names": names,
        "directions": directions,
        "axes": axis_values(rows, names),
        "traces": trace_rows(rows),
        "rows": [{"number": r["number"], "kind": r["kind"], "export": r["export"]} for r in rows],
        "scatter_id": SCATTER_ID,
        "parcoords_id": PARCOORDS_ID,
    }
    n_base = sum(r["kind"] != "search" for r in rows)
    scored = ", ".join(f"{n} ({d})" for n, d in zip(names, directions))
    parcoords = ""
    if len(plots) > 1:
        parcoords = f"""<h2>All objectives at once</h2>
<p>One line per trial. Drag along an axis to keep a range (several axes: every range at once);
click the axis outside a range to clear it.</p>
{divs[1]}
<p id="explorer-kept"></p><ul id="explorer-kept-list"></ul>"""
    study_name = html.escape(config.study.name)
    return f"""<!doctype html><html><head><meta charset="utf-8">
<title>basin explorer: {study_name}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}
code{{background:#f5f5f5;padding:0 .3em}}li{{margin:.15em 0}}.caption{{color:#555}}</style>
</head><body>
<h1>basin explorer: {study_name}</h1>
<p>How to read: each point is a complete trial ({len(rows)}, {n_base} of them baselines, as
labelled squares); red marks the front; hover a point for its scores on the search split
({html.escape(config.evaluator.label("search"))}) and held out ({html.escape(heldout_split)}),
and the command that exports it. Objectives: {html.escape(scored)}.</p>
<p class="caption">{html.escape(FRONT_CAPTION)}.</p>
<h2>Two objectives at a time</h2>
<p>x {menu("explorer-x", x)} y {menu("explorer-y", y)}</p>
{divs[0]}
{parcoords}
<script type="application/json" id="explorer-data">{_json_for_script(blob)}</script>
<script>{_SCRIPT}</script>
</body></html>"""


def write_explorer(
    folder: Path,
    config: StudyConfig,
    study: optuna.Study,
    heldout: dict[int, dict[str, float]],
    heldout_split: str,
) -> Path:
    """Write <folder>/explorer.html (see the module's docstring); returns its path. `heldout`:
    trial number -> objective key -> score on `heldout_split`, for the trials scored there."""
    folder = Path(folder)
    out = folder / EXPLORER_FILE
    out.write_text(explorer_page(folder, config, study, heldout, heldout_split), encoding="utf-8")
    return out
