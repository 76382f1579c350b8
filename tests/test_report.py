"""Inspecting a finished study: the Pareto table, the HTML report, export round trips, the demo
config."""

from __future__ import annotations

import re

import pytest
import yaml

from search.cli import main
from search.config import load_config
from search.folder import load_study_folder
from search.loop import run_study
from search.pareto import dominates
from tests.support.runs import REPO
from tests.support.tiny import build_model, build_tasks


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A small finished pareto study over tiny models (real Ray, real lm-eval)."""
    root = tmp_path_factory.mktemp("study")
    for i, name in enumerate(["base", "a", "b", "c"]):
        build_model(root / name, seed=i)
    tasks = build_tasks(root / "tasks", n_items=30)
    config = {
        "study": {"name": "tiny", "output_dir": str(root / "results")},
        "models": {"base": str(root / "base"), "finetunes": [str(root / n) for n in "abc"]},
        "space": {"methods": ["ties", "task_arithmetic"], "lambda": [0.5, 1.5]},
        "evaluator": {
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
        },
        "objectives": {"mode": "pareto", "items": [{"task": n} for n in tasks.names]},
        "budget": {"n_trials": 10},
        "workers": {"count": 2},
    }
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    run_study(load_config(path), progress=False)
    return root, tasks


def test_dominance():
    assert dominates([1, 2], [1, 1], ["maximize", "maximize"])
    assert not dominates([1, 1], [1, 1], ["maximize", "maximize"])
    assert not dominates([2, 0], [1, 1], ["maximize", "maximize"])
    assert dominates([0.5, 1], [1, 1], ["minimize", "maximize"])


@pytest.mark.slow  # the finished study: a real Ray study
def test_pareto_table_lists_front_and_baselines(finished, capsys):
    root, _ = finished
    assert main(["pareto", str(root / "results")]) == 0
    out = capsys.readouterr().out
    _, study = load_study_folder(root / "results")
    for t in study.best_trials:
        assert re.search(rf"^{t.number}\s", out, re.M), f"front trial {t.number} missing"
    for name in ("alone:a", "alone:b", "alone:c", "uniform"):
        assert name in out
    # every baseline row says whether the front dominates it, and says it correctly
    directions = [d.name.lower() for d in study.directions]
    for t in study.trials:
        name = t.user_attrs.get("baseline")
        if name and t not in study.best_trials and t.values:
            row = next(
                line
                for line in out.splitlines()
                if re.match(rf"{t.number}\s+{re.escape(name)}\s", line)
            )
            beaten = any(dominates(f.values, t.values, directions) for f in study.best_trials)
            assert ("dominated by" in row) == beaten


@pytest.mark.slow  # the finished study: a real Ray study
def test_report_is_self_contained_with_real_images(finished):
    root, _ = finished
    assert main(["report", str(root / "results"), "--quiet"]) == 0
    page = (root / "results" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page), (
        "the report must not load anything external"
    )
    assert "test" in page and "validation" in page
    import matplotlib.image

    for name in ("pareto", "history", "recipe", "importances"):
        png = root / "results" / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 100 and width > 100
    heldout = list((root / "results" / "heldout" / "test").glob("*.json"))
    assert len(heldout) >= 4  # the finalists plus three fine-tunes alone and the average

    # the headline leads: one sentence, the best found against the best parent and baseline
    assert page.index("What the search found") < page.index("Finalists against the parents")
    sentence = re.search(r"<p class='headline'>Trial (\d+) \((\w+)\) scores a mean of", page)
    assert sentence, "the headline sentence"
    headline = page[page.index("What the search found") : page.index("Finalists against")]
    for row in ("best found", "best parent: ", "best baseline: ", "best found - best parent"):
        assert f"<td>{row}" in headline, row
    assert headline.count("<th>mean<br>") == 2  # search split and held out
    # each baseline once in the finalists table, under its name
    finalists = page[page.index("Finalists against the parents") :]
    for name in ("alone:a", "alone:b", "alone:c", "uniform"):
        assert finalists.count(f"<td>{name}</td>") == 1, name
    assert "<b>" in headline and "<b>" in finalists  # the best value of each column marked


@pytest.mark.slow  # the finished study: a real Ray study
def test_export_reproduces_recorded_metrics(finished, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root, tasks = finished
    config, study = load_study_folder(root / "results")
    trial = max(study.best_trials, key=lambda t: sum(t.values))
    out = tmp_path / "merged"
    assert (
        main(
            [
                "export",
                str(root / "results"),
                "--trial",
                str(trial.number),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    lm = HFLM(pretrained=str(out), device="cpu", batch_size=16)
    result = lm_eval.simple_evaluate(
        model=lm,
        tasks=[tasks.config(n, ("validation",)) for n in tasks.names],
        task_manager=TaskManager(include_path=str(tasks.folder), include_defaults=False),
        bootstrap_iters=0,
    )
    recorded = trial.user_attrs["metrics"]
    for name in tasks.names:
        assert result["results"][name]["acc,none"] == pytest.approx(
            recorded[f"{name}/acc"], abs=1e-12
        )
    mergekit = tmp_path / "recipe.yaml"
    assert (
        main(
            [
                "export",
                str(root / "results"),
                "--trial",
                str(trial.number),
                "--out",
                str(mergekit),
                "--format",
                "mergekit",
            ]
        )
        == 0
    )
    assert yaml.safe_load(mergekit.read_text())["merge_method"] == trial.params["method"]


@pytest.mark.slow  # the finished study: a real Ray study
def test_export_of_an_unknown_trial_is_refused(finished, tmp_path, capsys):
    root, _ = finished
    assert (
        main(["export", str(root / "results"), "--trial", "999", "--out", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err
    assert "not a complete trial" in err and "pick one of" in err and "basin pareto" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow  # the toy zoo
@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config, zoo, tmp_path, monkeypatch, capsys):
    # the demo configs name the zoo at .zoo/seed0 of the working folder, where `make demo` builds it
    (tmp_path / ".zoo").mkdir()
    (tmp_path / ".zoo" / "seed0").symlink_to(zoo.root)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(config)]) == 0
    assert "ok" in capsys.readouterr().out


def test_the_recipe_figure_shows_what_the_method_reads():
    from merging import recipe_from_dict
    from search.report import plot_recipe

    della = recipe_from_dict(
        {
            "method": "della",
            "base": "b",
            "models": [{"path": "a", "density": [0.3, 0.6], "epsilon": 0.1}, {"path": "c"}],
        }
    )
    labels = [
        t.get_text() for t in plot_recipe(della, 4, ["a", "c"], "x").axes[0].get_yticklabels()
    ]
    assert labels == [
        *("a weight", "c weight", "a density", "c density", "a epsilon", "c epsilon"),
        "lambda",  # recipe-wide values the method reads are shown too
    ]
    ta = recipe_from_dict(
        {
            "method": "task_arithmetic",
            "base": "b",
            "models": ["a", "c"],
            "parameters": {"lambda": 0.7},
        }
    )
    figure = plot_recipe(ta, 4, ["a", "c"], "x", layered=False)
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ["a weight", "c weight", "lambda"]  # no density: task arithmetic keeps all
    # one value per model, not per layer, where the space has no per-layer values
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["every layer"]
    assert "0.70" in [t.get_text() for t in figure.axes[0].texts]
    slerp = recipe_from_dict({"method": "slerp", "base": "b", "models": ["a", "c"]})
    labels = [
        t.get_text() for t in plot_recipe(slerp, 4, ["a", "c"], "x").axes[0].get_yticklabels()
    ]
    assert labels[-1] == "t" and "lambda" not in labels


# --- a large front: a bounded set of finalists scored held out ---------------------------------


def made_up_front(folder, fault_zoo, n_front: int):
    """A study folder set up as `basin run` sets it up (its baselines enqueued), then told made-up
    scores: the baselines low, `n_front` searched trials along one trade-off (all on the front).
    One torch thread, so held-out scoring runs in this process on any machine."""
    from search.config import config_from_dict
    from search.objectives import objective_values
    from search.setup import setup_study
    from search.space import suggest
    from tests.support.fault_zoo import study_config

    config = config_from_dict(study_config(fault_zoo, folder, workers={"count": 1, "threads": 1}))
    setup = setup_study(config, resume=False)
    study, keys = setup.study, [o.key for o in config.objectives.items]
    directions = ["maximize", "maximize"]
    n_baselines = len(study.get_trials(deepcopy=False))  # enqueued, waiting
    for n in range(n_baselines + n_front):
        trial = study.ask()
        suggest(trial, setup.space)
        x = 0.05 if n < n_baselines else (n - n_baselines) / (n_front - 1)
        metrics = dict(zip(keys, [x, 0.05 if n < n_baselines else 1 - x]))
        trial.set_user_attr("metrics", metrics)
        study.tell(trial, objective_values(config.objectives, directions, metrics))
    return study


def heldout_numbers(folder) -> set[int]:
    return {int(p.stem) for p in (folder / "heldout" / "test").glob("*.json")}


@pytest.mark.slow  # held-out scores of real tiny models (about 5 s)
def test_a_front_larger_than_k_scores_k_finalists_and_says_how_to_add_others(
    fault_zoo, tmp_path, capsys
):
    folder = tmp_path / "night"
    study = made_up_front(folder, fault_zoo, n_front=12)
    front = {t.number for t in study.best_trials}
    assert len(front) == 12
    baselines = {
        t.number: t.user_attrs["baseline"] for t in study.trials if t.user_attrs.get("baseline")
    }
    named = max(front)  # the best on the first objective: covered anyway
    assert main(["report", str(folder), "--finalists", "3", "--trial", str(named), "--quiet"]) == 0
    scored = heldout_numbers(folder)
    assert len(scored & front) == 3  # K: the named one is an extreme, so it is among them
    assert named in scored
    refs = {n for n, name in baselines.items() if name.startswith("alone:") or name == "uniform"}
    assert refs <= scored and scored - front <= set(baselines)  # baselines, as before
    page = (folder / "report.html").read_text()
    left = sorted(front - scored)
    assert "3 of 12 front members were scored on the held-out split (test)" in page
    assert f"basin report {folder} --finalists 12" in page
    assert f"basin report {folder} --trial {left[0]}" in page
    finalists = page[page.index("Finalists against the parents") :]
    for n in front:
        assert (f"<td>{n}</td>" in finalists) == (n in scored), n

    # naming two more costs exactly two evaluations; the scores kept are reused
    before = scored
    assert main(["report", str(folder), "--finalists", "3", "--trial", f"{left[0]},{left[1]}"]) == 0
    assert heldout_numbers(folder) == before | {left[0], left[1]}
    page = (folder / "report.html").read_text()
    assert "5 of 12 front members were scored" in page
    assert f"Trial {left[0]} (" in page  # the first named is the recipe shown
    capsys.readouterr()


def test_bad_finalists_and_trial_values_are_refused_with_exit_2(fault_zoo, tmp_path, capsys):
    folder = tmp_path / "night"
    made_up_front(folder, fault_zoo, n_front=3)
    assert main(["report", str(folder), "--finalists", "0"]) == 2
    assert "--finalists 0: expected at least 1" in capsys.readouterr().err
    assert main(["report", str(folder), "--trial", "3,x"]) == 2
    assert "--trial '3,x': expected a trial number or a comma list" in capsys.readouterr().err
    assert main(["report", str(folder), "--trial", "999"]) == 2
    assert "trial 999 is not a complete trial of this study" in capsys.readouterr().err
    assert not (folder / "report.html").exists() and not (folder / "heldout").exists()


def test_a_129_member_front_of_four_objectives_scores_8_finalists():
    """The front that prompted the bound: 129 members, 4 objectives (a plain Optuna study)."""
    import random

    import optuna

    from search.report import chosen_trial, report_finalists

    study = optuna.create_study(directions=["maximize"] * 3 + ["minimize"])
    rng = random.Random(0)
    for _ in range(129):
        cut = sorted(rng.random() for _ in range(3))
        a, b, c, d = (y - x for x, y in zip([0.0, *cut], [*cut, 1.0]))
        study.add_trial(optuna.trial.create_trial(values=[a, b, c, -d]))
    assert len(study.best_trials) == 129
    chosen = chosen_trial(study, None)
    shown = report_finalists(study, chosen, 8, [])
    assert len(shown) == 8 and chosen in shown
    assert len(report_finalists(study, chosen, 8, [shown[0].number + 1, 3])) <= 10
    assert len(report_finalists(study, chosen, 200, [])) == 129
