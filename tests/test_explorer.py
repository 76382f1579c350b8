"""explorer.html: the interactive trade-off page, checked in a real headless Chromium.

The studies are real Optuna studies built without models: the space's params come from the same
`suggest` and `baseline_params` a run uses, the scores are made up. The browser tests need
Chromium and its driver (CI installs them: .ci/run); without them they fail, never skip.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import Select, WebDriverWait

from search import attrs
from search.config import config_from_dict
from search.explorer import (
    PARCOORDS_ID,
    SCATTER_ID,
    explorer_rows,
    export_command,
    write_explorer,
)
from search.folder import study_space
from search.objectives import objective_values
from search.pareto import dominates
from search.space import baseline_params, suggest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 90  # a loaded 2-core machine parses 5 MB of plotly.js slowly; conditions, not sleeps
slow = pytest.mark.slow  # the browser tests; the page-only tests below stay in the fast run

THREE = [
    {"task": "add", "direction": "maximize"},
    {"task": "rev", "direction": "maximize"},
    {"task": "sort", "metric": "nll", "direction": "minimize"},
]


def make_study(folder: Path, objectives: list[dict], n_search: int = 8, seed: int = 0):
    """A finished study as a run leaves it: baselines first (enqueued with their names), then
    searched trials, one failed trial; made-up scores, two decimals (so some tie)."""
    mode = "pareto" if len(objectives) > 1 else "single"
    config = config_from_dict(
        {
            "study": {"name": f"explore-{len(objectives)}", "output_dir": str(folder.parent)},
            "models": {
                "base": "/nowhere/base",
                "finetunes": ["/nowhere/ft_add", "/nowhere/ft_rev"],
            },
            "space": {"methods": ["ties", "task_arithmetic", "dare_ties"]},
            "evaluator": {"tasks": sorted({o["task"] for o in objectives})},
            "objectives": {"mode": mode, "items": objectives},
        }
    )
    space = study_space(config, num_layers=2)
    directions = [o["direction"] for o in objectives]
    study = optuna.create_study(
        directions=directions if mode == "pareto" else ["maximize"],
        sampler=optuna.samplers.RandomSampler(seed=seed),
    )
    study.set_user_attr(attrs.DIRECTIONS, directions)
    study.set_user_attr(attrs.OBJECTIVE_KEYS, [o.key for o in config.objectives.items])
    study.set_user_attr(attrs.NUM_LAYERS, space.num_layers)
    baselines = baseline_params(space)
    for name, params in baselines:
        study.enqueue_trial(params, user_attrs={attrs.BASELINE: name})
    rng = random.Random(seed)
    for n in range(len(baselines) + n_search + 1):
        trial = study.ask()
        suggest(trial, space)
        if n == len(baselines) + 2:
            trial.set_user_attr(attrs.ERROR, "made up")
            study.tell(trial, state=TrialState.FAIL)
            continue
        metrics = {o.key: round(rng.uniform(0.1, 0.9), 2) for o in config.objectives.items}
        trial.set_user_attr(attrs.METRICS, metrics)
        study.tell(trial, objective_values(config.objectives, directions, metrics))
    folder.mkdir(parents=True, exist_ok=True)
    return config, study


def complete_trials(study):
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def front_of(study) -> set[int]:
    """The front over every objective, computed here from `dominates` alone."""
    trials = complete_trials(study)
    directions = [d.name.lower() for d in study.directions]
    return {
        t.number
        for t in trials
        if not any(dominates(o.values, t.values, directions) for o in trials)
    }


def page_blob(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page)
    assert match, "the page carries its data blob"
    return json.loads(match[1])


def plotted(page: str, div_id: str) -> list[dict]:
    """The traces the page hands to Plotly.newPlot for that div."""
    match = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert match, f"the page plots into {div_id}"
    return json.JSONDecoder().raw_decode(page, match.end())[0]


def markup(page: str) -> str:
    """The page without its scripts' bodies (plotly.js's source holds URLs it never loads here)."""
    return re.sub(r"(<script\b[^>]*>).*?(</script>)", r"\1\2", page, flags=re.S | re.I)


def fetched_urls(page: str) -> list[str]:
    """Every src= or href= in the page's markup (script tags included) that names another place
    than the page: none, the page loads nothing."""
    return re.findall(r"""\b(?:src|href)\s*=\s*["']?((?:https?:)?//[^"'\s>]*)""", markup(page))


# --- the page without a browser -------------------------------------------------------------------


@pytest.mark.parametrize("objectives", [THREE[:1], THREE[1:]], ids=["one", "two"])
def test_one_or_two_objectives_give_the_scatter_alone(tmp_path, objectives):
    folder = tmp_path / "study"
    config, study = make_study(folder, objectives)
    out = write_explorer(folder, config, study, {}, "test")
    assert out == folder / "explorer.html"
    page = out.read_text()
    assert f'<div id="{SCATTER_ID}"' in page
    assert f'<div id="{PARCOORDS_ID}"' not in page
    assert {t["type"] for t in plotted(page, SCATTER_ID)} == {"scatter"}
    assert 'id="explorer-kept-list"' not in page
    assert "window.Plotly" in page or "Plotly.newPlot" in page
    assert fetched_urls(page) == []
    assert "<script src" not in markup(page) and "mathjax" not in markup(page).lower()
    blob = page_blob(page)
    numbers = sorted(t.number for t in complete_trials(study))
    assert sorted(r["number"] for r in blob["rows"]) == numbers  # the failed trial is left out
    if len(objectives) == 1:
        # objective against trial number
        assert blob["names"] == ["score"]
        assert "<option value='trial number' selected>" in page
        assert blob["axes"]["trial number"] == [float(n) for n in numbers]
    else:
        assert blob["names"] == [o.key for o in config.objectives.items]
        assert set(blob["axes"]) == {*blob["names"], "trial number"}
    assert blob["directions"] == [d.name.lower() for d in study.directions]


def test_hover_text_names_kind_method_scores_and_export(tmp_path):
    folder = tmp_path / "study"
    config, study = make_study(folder, THREE[1:])
    trials = complete_trials(study)
    uniform = next(t for t in trials if t.user_attrs.get(attrs.BASELINE) == "uniform")
    searched = next(t for t in trials if not t.user_attrs.get(attrs.BASELINE))
    heldout = {uniform.number: {"rev/acc": 0.4321}}
    rows = {r["number"]: r for r in explorer_rows(folder, config, study, heldout, "test-holdout")}
    hover = rows[uniform.number]["hover"].split("<br>")
    metrics = uniform.user_attrs[attrs.METRICS]
    assert hover[0] == f"trial {uniform.number} (uniform), task_arithmetic"
    assert hover[1] == f"rev/acc: {metrics['rev/acc']:.4f} validation, 0.4321 test-holdout"
    assert hover[2] == f"sort/nll: {metrics['sort/nll']:.4f} validation"
    assert hover[-1] == export_command(folder, uniform.number)
    assert f"--trial {uniform.number} --out DIR" in hover[-1]
    method = searched.params.get("method")
    assert rows[searched.number]["hover"].startswith(f"trial {searched.number} (search), {method}")
    assert rows[searched.number]["front"] == (searched.number in front_of(study))
    page = write_explorer(folder, config, study, heldout, "test-holdout").read_text()
    assert "in a 2-D view a front point can look dominated" in page
    (baselines,) = (t for t in plotted(page, SCATTER_ID) if t["name"] == "baselines")
    assert rows[uniform.number]["hover"] in baselines["hovertext"]
    assert uniform.user_attrs[attrs.BASELINE] in baselines["text"]
    assert baselines["marker"]["symbol"] == "square"


def test_one_weighted_objective_shows_the_score_and_each_metric(tmp_path):
    folder = tmp_path / "study"
    config, study = make_study(folder, THREE[:1])
    t = complete_trials(study)[0]
    row = explorer_rows(folder, config, study, {}, "test")[0]
    assert row["hover"].split("<br>")[1:3] == [
        f"score: {t.values[0]:.4f}",
        f"add/acc: {t.user_attrs[attrs.METRICS]['add/acc']:.4f} validation",
    ]


def test_three_objectives_add_the_parallel_coordinates(tmp_path):
    folder = tmp_path / "study"
    config, study = make_study(folder, THREE, n_search=3)
    page = write_explorer(folder, config, study, {}, "test").read_text()
    assert f'<div id="{PARCOORDS_ID}"' in page and f'<div id="{SCATTER_ID}"' in page
    assert 'id="explorer-kept-list"' in page
    (parcoords,) = plotted(page, PARCOORDS_ID)
    assert parcoords["type"] == "parcoords"
    assert [d["label"] for d in parcoords["dimensions"]] == [
        "add/acc (maximize)",
        "rev/acc (maximize)",
        "sort/nll (minimize)",
        "front",
        "trial",
    ]


# --- the page in Chromium -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: the explorer's browser tests need Chromium "
            "(apt-get install -y chromium chromium-driver; .ci/run installs them)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--enable-unsafe-swiftshader",  # software WebGL, for the parallel coordinates
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explorer") / "study"
    config, study = make_study(folder, THREE, n_search=10, seed=3)
    trials = complete_trials(study)
    heldout = {
        t.number: {k: v - 0.05 for k, v in t.user_attrs[attrs.METRICS].items()} for t in trials[:3]
    }
    return folder, study, write_explorer(folder, config, study, heldout, "test")


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S).until(condition, message=f"waited {WAIT_S}s for {what}")


def kept_numbers(driver) -> list[int]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#explorer-kept-list li'))"
        ".map(li => Number(li.dataset.trial));"
    )


@pytest.fixture(scope="module")
def loaded(browser, three):
    """The page opened from file://, drawn; the logs of its loading."""
    folder, study, page = three
    browser.get(page.as_uri())
    wait(
        browser,
        lambda d: d.execute_script(
            "return !!window.Plotly && document.readyState === 'complete'"
            f" && !!document.getElementById('{SCATTER_ID}')._fullLayout"
            f" && !!document.getElementById('{PARCOORDS_ID}')._fullLayout"
            " && document.querySelectorAll('#explorer-kept-list li').length > 0"
        ),
        "both plots drawn and the kept list filled",
    )
    return browser, study, folder, browser.get_log("browser"), browser.get_log("performance")


@slow
def test_the_page_loads_from_file_without_errors_or_network(loaded, three):
    driver, _, _, console, performance = loaded
    severe = [e["message"] for e in console if e["level"] == "SEVERE"]
    assert severe == []
    requests = [
        json.loads(e["message"])["message"]["params"]["request"]["url"]
        for e in performance
        if json.loads(e["message"])["message"]["method"] == "Network.requestWillBeSent"
    ]
    assert three[2].as_uri() in requests, "the performance log records the page's own request"
    elsewhere = [u for u in requests if not u.startswith(("file:", "data:", "about:", "blob:"))]
    assert elsewhere == []
    assert fetched_urls(three[2].read_text()) == []
    assert driver.execute_script("return typeof window.Plotly.newPlot") == "function"
    assert driver.title.startswith("basin explorer: explore-3")
    caption = "front: trials no other trial beats on every objective at once"
    assert caption in driver.find_element("tag name", "body").text


def hover_label(driver) -> str:
    return driver.execute_script(
        f"var h = document.querySelector('#{SCATTER_ID} .hoverlayer .hovertext');"
        " return h ? h.textContent : '';"
    )


def hover(driver, curve: int, point: int) -> int:
    """Hover a scatter point as plotly does for the mouse; the trial number it shows."""
    return driver.execute_script(
        f"var gd = document.getElementById('{SCATTER_ID}');"
        f"Plotly.Fx.hover(gd, [{{curveNumber: {curve}, pointNumber: {point}}}]);"
        f"return Number(gd.data[{curve}].hovertext[{point}].match(/^trial (\\d+)/)[1]);"
    )


@slow
def test_hovering_a_point_shows_its_trial_and_export_command(loaded):
    driver, study, folder, _, _ = loaded
    n_points = driver.execute_script(
        f"return document.getElementById('{SCATTER_ID}').data[0].x.length"
    )
    assert n_points >= 2, "trace 0 (searched trials off the front) has points to hover"
    for k in (0, n_points - 1):
        number = hover(driver, 0, k)
        wait(
            driver, lambda d, n=number: f"trial {n} (" in hover_label(d), f"trial {number}'s label"
        )
        label = hover_label(driver)
        assert f"trial {number} (search)" in label
        assert export_command(folder, number) in label
        assert study.trials[number].user_attrs.get(attrs.BASELINE) is None
    # a baseline (trace 2) scored on the held-out split too: both scores, split by split
    number = hover(driver, 2, 0)
    wait(driver, lambda d: f"trial {number} (" in hover_label(d), f"trial {number}'s label")
    label, t = hover_label(driver), study.trials[number]
    assert f"trial {number} ({t.user_attrs[attrs.BASELINE]})" in label
    acc = t.user_attrs[attrs.METRICS]["add/acc"]
    assert f"add/acc: {acc:.4f} validation, {acc - 0.05:.4f} test" in label
    assert export_command(folder, number) in label


@slow
def test_brushing_an_axis_lists_exactly_the_trials_in_range(loaded):
    driver, study, folder, _, _ = loaded
    trials = complete_trials(study)
    assert sorted(kept_numbers(driver)) == [t.number for t in trials]  # no brush: every trial
    par = f"document.getElementById('{PARCOORDS_ID}')"

    # a user's drag along the first axis, over its middle half: plotly sets the range
    axis = driver.find_elements("css selector", f"#{PARCOORDS_ID} .axis-brush .background")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", axis)
    half = axis.size["height"] // 2
    ActionChains(driver).move_to_element_with_offset(
        axis, 0, -half // 2
    ).click_and_hold().move_by_offset(0, 10).move_by_offset(0, half - 10).release().perform()
    dragged = wait(
        driver,
        lambda d: d.execute_script(f"return {par}.data[0].dimensions[0].constraintrange"),
        "the dragged range",
    )
    lo, hi = dragged[0] if isinstance(dragged[0], list) else dragged
    expected = sorted(t.number for t in trials if lo <= t.values[0] <= hi)
    assert 0 < len(expected) < len(trials)
    wait(driver, lambda d: sorted(kept_numbers(d)) == expected, f"trials {expected} kept")
    driver.execute_script(f"Plotly.restyle({par}, {{'dimensions[0].constraintrange': [null]}});")
    wait(driver, lambda d: len(kept_numbers(d)) == len(trials), "every trial, the brush cleared")

    # a range on the second objective, between values so no boundary is ambiguous
    values = sorted({t.values[1] for t in trials})
    lo = (values[1] + values[2]) / 2
    hi = (values[-3] + values[-2]) / 2
    expected = sorted(t.number for t in trials if lo <= t.values[1] <= hi)
    assert 0 < len(expected) < len(trials)
    brush = f"Plotly.restyle({par}, {{'dimensions[%d].constraintrange': [[%r, %r]]}});"
    driver.execute_script(brush % (1, lo, hi))
    wait(driver, lambda d: sorted(kept_numbers(d)) == expected, f"trials {expected} kept")
    assert (
        driver.find_element("id", "explorer-kept").text
        == f"{len(expected)} of {len(trials)} trials remain:"
    )
    item = driver.find_element(
        "css selector", f"#explorer-kept-list li[data-trial='{expected[0]}']"
    )
    assert export_command(folder, expected[0]) in item.text
    kind = study.trials[expected[0]].user_attrs.get(attrs.BASELINE) or "search"
    assert f"trial {expected[0]} ({kind})" in item.text

    # and the front axis (index 3, after the three objectives) on top: ranges combine
    front = front_of(study)
    both = sorted(n for n in expected if n in front)
    driver.execute_script(brush % (3, 0.5, 1.5))
    wait(driver, lambda d: sorted(kept_numbers(d)) == both, f"front trials {both} kept")

    # the front the page marks is the front over all three objectives
    driver.execute_script(brush % (1, -1e9, 1e9))
    wait(driver, lambda d: sorted(kept_numbers(d)) == sorted(front), "the whole front kept")


@slow
def test_the_menus_swap_the_scatter_axes(loaded):
    driver, study, _, _, _ = loaded
    front = front_of(study)
    # trace 0: the searched trials off the front, in trial order
    off_front = [
        t
        for t in complete_trials(study)
        if t.user_attrs.get(attrs.BASELINE) is None and t.number not in front
    ]
    baselines = [t for t in complete_trials(study) if t.user_attrs.get(attrs.BASELINE)]

    def shown(axis: str, trace: int) -> list[float]:
        return driver.execute_script(
            f"return Array.from(document.getElementById('{SCATTER_ID}').data[{trace}].{axis});"
        )

    assert shown("x", 0) == [t.values[0] for t in off_front]
    assert shown("y", 0) == [t.values[1] for t in off_front]
    assert driver.execute_script(
        f"return document.getElementById('{SCATTER_ID}').data[2].text"
    ) == [t.user_attrs[attrs.BASELINE] for t in baselines]

    Select(driver.find_element("id", "explorer-x")).select_by_value("sort/nll")
    wait(driver, lambda d: shown("x", 0) == [t.values[2] for t in off_front], "x: sort/nll")
    assert shown("x", 2) == [t.values[2] for t in baselines]
    Select(driver.find_element("id", "explorer-y")).select_by_value("trial number")
    wait(driver, lambda d: shown("y", 0) == [float(t.number) for t in off_front], "y: trial")
    assert (
        driver.execute_script(
            f"return document.getElementById('{SCATTER_ID}')._fullLayout.xaxis.title.text"
        )
        == "sort/nll (minimize)"
    )
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
