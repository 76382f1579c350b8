"""Multi-fidelity search: item slices that add up to a full evaluation, promotion on the worker that
holds the candidate, the keep-best pruner, the Pareto rule, studies that prune, and resume between
rungs (real zoo models, real lm-eval, real Optuna storage, real Ray)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from evaluators import HarnessEvaluator, HarnessSection
from evaluators.engines import HFEngine
from search import records
from search.attrs import ITEM_SCORES
from search.cli import main
from search.config import ConfigError, config_from_dict
from search.fidelity import KeepBestPruner, dominated, pareto_go_on, rung_items
from search.folder import load_study_folder
from search.loop import run_study
from search.setup import setup_study
from search.space import suggest

RUNGS = [12, 36]


def _model(zoo):
    from transformers import AutoTokenizer

    from merging import load_live_model

    return load_live_model(zoo.base, device="cpu", dtype="float32"), AutoTokenizer.from_pretrained(
        str(zoo.base)
    )


def _study(
    zoo, folder: Path, *, mode: str = "single", tasks: list[str] | None = None, **sections: Any
) -> dict:
    tasks = tasks or list(zoo.tasks)
    objectives = (
        {"items": [{"task": t, "weight": 1.0 / len(tasks)} for t in tasks]}
        if mode == "single"
        else {"mode": "pareto", "items": [{"task": t} for t in tasks]}
    )
    data = {
        "study": {"name": "mf", "output_dir": str(folder)},
        "models": {"base": str(zoo.base), "finetunes": [str(p) for p in zoo.finetunes.values()]},
        "space": {"methods": ["task_arithmetic", "ties"], "lambda": [0.3, 1.5]},
        "evaluator": {
            "tasks": tasks,
            "include_path": str(zoo.tasks_dir),
            "builtin_tasks": False,
            "batch_size": 64,
        },
        "objectives": objectives,
        "sampler": {"name": "tpe" if mode == "single" else "nsga2", "seed": 0},
        "budget": {"n_trials": 16},
        "workers": {"count": 2},
        "fidelity": {"rungs": RUNGS},
    }
    data.update(sections)
    return data


# --- items in slices ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fewshot", [None, 2])
def test_slices_of_the_item_order_add_up_to_a_full_evaluation(zoo, fewshot):
    """Scored in three slices, every item gets the score it gets in one full call, few-shot prompts
    included (each item draws its examples from a seed of its own)."""
    model, tok = _model(zoo)
    tasks = list(zoo.tasks[:2])
    section = HarnessSection(
        tasks=tasks,
        include_path=str(zoo.tasks_dir),
        batch_size=32,
        builtin_tasks=False,
        num_fewshot=fewshot,
    )
    ev = HarnessEvaluator(section, split="validation", order_seed=3)
    assert all(list(ids) != sorted(ids) for ids in ev.item_ids.values()), (
        "the order is drawn, not the file's"
    )
    full = ev.evaluate(HFEngine(model, tok), per_item=True)
    parts = [
        ev.evaluate(HFEngine(model, tok), items=span)
        for span in ((0, RUNGS[0]), (RUNGS[0], RUNGS[1]), (RUNGS[1], 10**6))
    ]
    for key, scores in full.per_item.items():
        joined = [v for part in parts for v in part.per_item[key]]
        assert joined == list(scores)
        assert sum(joined) / len(joined) == full.metrics[key]
    # the full order is back after the slices
    assert ev.evaluate(HFEngine(model, tok)).metrics == full.metrics


def test_slices_need_an_order_and_objectives_that_are_per_item_means(zoo):
    section = HarnessSection(
        tasks=list(zoo.tasks[:1]), include_path=str(zoo.tasks_dir), builtin_tasks=False, limit=4
    )
    ev = HarnessEvaluator(section, split="validation")
    with pytest.raises(Exception, match="needs order_seed"):
        ev.evaluate(None, items=(0, 2))
    ev.check_item_means([f"{zoo.tasks[0]}/acc"])


def test_fidelity_refuses_an_evaluator_without_items_and_rungs_out_of_order(zoo, tmp_path):
    with pytest.raises(ConfigError, match="rungs must be positive item counts in increasing order"):
        config_from_dict(_study(zoo, tmp_path / "a", fidelity={"rungs": [64, 16]}))
    perplexity = {"kind": "perplexity", "text": str(zoo.heldout_text)}
    with pytest.raises(ConfigError, match="the perplexity evaluator has none"):
        config_from_dict(
            _study(
                zoo,
                tmp_path / "b",
                evaluator=perplexity,
                objectives={"items": [{"task": "perplexity", "metric": "perplexity"}]},
            )
        )


def test_rungs_past_the_search_set_collapse_into_the_last():
    from search.config import FidelitySection

    assert rung_items(FidelitySection(rungs=[16, 64, 256]), {"a": 100, "b": 40}) == [16, 64, None]
    assert rung_items(FidelitySection(rungs=[16]), {"a": 10}) == [None]


def test_the_default_rungs_are_shares_of_the_largest_task_and_none_for_a_small_search_set():
    from search.config import FidelitySection

    default = FidelitySection()  # rungs: null
    assert rung_items(default, {"a": 145, "b": 49}) == [24, 72, None]  # the benchmark's rungs
    assert rung_items(default, {"a": 600}) == [100, 300, None]
    assert rung_items(default, {"a": 96}) == [16, 48, None]
    assert rung_items(default, {"a": 90, "b": 30}) == [None]  # a first rung under 16 items


def test_multi_fidelity_is_on_by_default_for_one_objective_and_off_for_a_front(zoo, tmp_path):
    unset = _study(zoo, tmp_path / "a")
    del unset["fidelity"]
    one = config_from_dict(unset)
    assert one.fidelity is not None and one.fidelity.rungs is None and one.fidelity_by_default()
    # asked for, or turned off: as written
    assert not config_from_dict(_study(zoo, tmp_path / "a")).fidelity_by_default()
    assert config_from_dict({**unset, "fidelity": None}).fidelity is None
    # a Pareto front: off unless asked for (the benchmark measured one objective)
    front = _study(zoo, tmp_path / "b", mode="pareto")
    del front["fidelity"]
    assert config_from_dict(front).fidelity is None
    # an evaluator without items: off, not refused
    perplexity = {**unset, "evaluator": {"kind": "perplexity", "text": str(zoo.heldout_text)}}
    perplexity["objectives"] = {"items": [{"task": "perplexity", "metric": "perplexity"}]}
    assert config_from_dict(perplexity).fidelity is None


@pytest.mark.slow
def test_a_study_left_to_basin_runs_the_default_rungs_and_keeps_what_it_began_with(
    zoo, tmp_path, capsys
):
    unset = _study(zoo, tmp_path / "new")
    del unset["fidelity"]
    s = setup_study(config_from_dict(unset), resume=False)
    assert s.rungs is not None and s.rungs.items == (24, 72, None)
    assert records.read_config_snapshot(s.folder)["fidelity"]["rungs"] is None
    config = tmp_path / "unset.yaml"
    config.write_text(__import__("yaml").safe_dump(unset))
    assert main(["validate", str(config), "--headers-only"]) == 0
    out = capsys.readouterr().out
    assert (
        "multi-fidelity: on by default (one objective); `fidelity: null` turns it off: rungs of "
        "24, 72 items per task, then all 145" in out
    )
    # a study begun at full fidelity (an older one) goes on at full fidelity under the same config
    old = _study(zoo, tmp_path / "old", fidelity=None)
    setup_study(config_from_dict(old), resume=False)
    del old["fidelity"]
    again = setup_study(config_from_dict(old), resume=False)
    assert again.config.fidelity is None and again.rungs is None


# --- promotion on the worker ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_promoted_candidate_scores_what_a_full_evaluation_of_it_gives(zoo, tmp_path):
    from dataclasses import replace

    from search.folder import worker_spec
    from search.workers import CandidateWorker

    spec = worker_spec(config_from_dict(_study(zoo, tmp_path / "w")))
    assert spec.fidelity_seed == 0
    recipe = {
        "method": "task_arithmetic",
        "base": str(zoo.base),
        "parameters": {"lambda": 0.8},
        "models": [{"path": str(p), "weight": 0.5} for p in zoo.finetunes.values()],
    }
    worker = CandidateWorker(spec)
    first = worker.run(recipe, items=RUNGS[0], rung=True)
    assert first.merge_s > 0 and set(first.rung.items.values()) == {RUNGS[0]}
    second = worker.more(RUNGS[1])
    assert second.merge_s == 0.0 and set(second.rung.items.values()) == {RUNGS[1]}
    for key, (scores,) in first.rung.item_scores.items():
        assert second.rung.item_scores[key][0][: RUNGS[0]] == scores  # kept, not scored again
    last = worker.more(None)

    whole = CandidateWorker(replace(spec, fidelity_seed=None)).run(recipe)
    assert last.rung.items == {t: n for t, n in whole_counts(zoo).items()}
    assert last.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert last.metrics[key] == pytest.approx(value, abs=1e-12)

    # a fresh worker holds nothing to go on with
    held_nothing = CandidateWorker(spec).more(RUNGS[1])
    assert not held_nothing.ok and "holds no candidate" in held_nothing.error


def whole_counts(zoo) -> dict[str, int]:
    section = HarnessSection(
        tasks=list(zoo.tasks), include_path=str(zoo.tasks_dir), builtin_tasks=False
    )
    ev = HarnessEvaluator(section, split="validation")
    return ev.item_counts


# --- the rules ------------------------------------------------------------------------------------


def _with_rung(study: optuna.Study, value: float, step: int = 12, **attrs: Any) -> None:
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            value=value,
            intermediate_values={step: value},
            params={"x": 0.5},
            distributions={"x": FloatDistribution(0, 1)},
            user_attrs=attrs,
        )
    )


def test_the_keep_best_pruner_promotes_the_best_share_at_each_rung():
    study = optuna.create_study(direction="maximize", pruner=KeepBestPruner(0.5))
    for value in (0.2, 0.4, 0.6):
        _with_rung(study, value)

    def decide(value: float, step: int = 12, baseline: bool = False) -> bool:
        trial = study.ask()
        if baseline:
            trial.set_user_attr("baseline", "uniform")
        trial.report(value, step)
        pruned = trial.should_prune()
        study.tell(trial, state=TrialState.FAIL)  # out of the peers of the next call
        return pruned

    # four at the rung: the best ceil(0.5 * 4) = 2 go on
    assert decide(0.7) is False and decide(0.5) is False
    assert decide(0.3) is True
    assert decide(0.1, baseline=True) is False  # baselines always go on
    assert decide(0.1, step=36) is False  # first at its rung
    ties = optuna.create_study(direction="maximize", pruner=KeepBestPruner(0.5))
    for _ in range(4):
        _with_rung(ties, 0.5)
    trial = ties.ask()
    trial.report(0.5, 12)
    assert trial.should_prune() is True  # four earlier trials as good: they rank first
    minimize = optuna.create_study(direction="minimize", pruner=KeepBestPruner(0.34))
    for value in (0.2, 0.4):
        _with_rung(minimize, value)
    trial = minimize.ask()
    trial.report(0.1, 12)
    assert trial.should_prune() is False


def test_with_a_window_a_candidate_is_compared_with_candidates_of_comparable_age():
    # ten early, poor candidates at the rung, then four recent, better ones
    def decide(pruner: KeepBestPruner) -> bool:
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for value in [0.1] * 10 + [0.6, 0.7, 0.8, 0.9]:
            _with_rung(study, value)
        trial = study.ask()
        trial.report(0.5, 12)
        return trial.should_prune()

    # against all 15, 0.5 is 5th and the best ceil(0.5 * 15) = 8 go on; against the four nearest
    # in trial number it is last of 5, and the best 3 go on
    assert decide(KeepBestPruner(0.5)) is False
    assert decide(KeepBestPruner(0.5, window=4)) is True
    assert decide(KeepBestPruner(0.5, window=14)) is False  # a window holding them all: as before


def test_dominated_means_better_on_every_objective_by_more_than_the_noise():
    mine = {"a": [[0, 1, 0, 1, 0, 1, 0, 0]], "b": [[0, 0, 1, 0, 0, 0, 1, 0]]}
    clearly = {
        "a": [[1, 1, 1, 1, 1, 1, 1, 1]],
        "b": [[1, 1, 1, 1], [1, 1, 1, 1]],  # a group of two tasks
    }
    one_item = {"a": [[1, 1, 0, 1, 0, 1, 0, 0]], "b": [[1, 0, 1, 0, 0, 0, 1, 0]]}
    worse_on_b = {"a": [[1, 1, 1, 1, 1, 1, 1, 1]], "b": [[0, 0, 0, 0, 0, 0, 0, 0]]}
    keys, up = ["a", "b"], [1.0, 1.0]
    assert dominated(mine, clearly, keys, up, 8, margin=1.0)
    # one item better: within the noise
    assert not dominated(mine, one_item, keys, up, 8, margin=1.0)
    assert dominated(mine, one_item, keys, up, 8, margin=0.0)
    assert not dominated(mine, worse_on_b, keys, up, 8, margin=0.0)
    assert not dominated(clearly, mine, keys, up, 8, margin=0.0)
    assert dominated(clearly, mine, keys, [-1.0, -1.0], 8, margin=1.0)  # minimised objectives
    assert not dominated(mine, clearly, keys, up, 0, margin=0.0)
    # on a rung of 4 items per task: a's first 4 against b's 4 + 4 (b's other layout is its own
    # group), so 8 items of b on one side, 4 on the other
    assert not dominated(mine, clearly, keys, up, 4, margin=0.0)


def test_the_pareto_rule_stops_a_candidate_dominated_at_its_rung(zoo, tmp_path):
    config = config_from_dict(_study(zoo, tmp_path / "p", mode="pareto", tasks=list(zoo.tasks[:2])))
    keys = [o.key for o in config.objectives.items]
    directions = ["maximize", "maximize"]
    study = optuna.create_study(directions=directions)
    strong = {keys[0]: [[1.0] * 12], keys[1]: [[1.0] * 12]}
    weak = {keys[0]: [[0.0, 1.0] * 6], keys[1]: [[1.0, 0.0] * 6]}
    # trial 0 dominates the candidate; trials 1 and 2, nearer to it in number, score as it does
    for scores in (strong, weak, weak):
        study.add_trial(
            create_trial(
                state=TrialState.COMPLETE,
                values=[1.0, 1.0],
                params={"x": 0.5},
                distributions={"x": FloatDistribution(0, 1)},
                user_attrs={ITEM_SCORES: scores, "rung_stop": 12},
            )
        )
    trial = study.ask()
    assert not pareto_go_on(study, trial, weak, 12, config.objectives, directions, 1.0)
    # compared with its two nearest peers only (fidelity.window), it goes on
    assert pareto_go_on(study, trial, weak, 12, config.objectives, directions, 1.0, window=2)
    assert not pareto_go_on(study, trial, weak, 12, config.objectives, directions, 1.0, window=3)
    # no peer got there
    assert pareto_go_on(study, trial, weak, 36, config.objectives, directions, 1.0)
    trial.set_user_attr("baseline", "uniform")
    assert pareto_go_on(study, trial, weak, 12, config.objectives, directions, 1.0)


# --- studies --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_single_objective_study_prunes_most_candidates_on_the_first_rungs(zoo, tmp_path, capsys):
    folder = tmp_path / "single"
    study = run_study(config_from_dict(_study(zoo, folder)), progress=False)
    trials = study.get_trials(deepcopy=False)
    full = sum(whole_counts(zoo).values())
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 16 and pruned
    assert all(t.user_attrs.get("baseline") for t in trials[:7]) and all(
        t.state == TrialState.COMPLETE for t in trials[:7]
    )
    recs = records.read_trial_records(folder)
    for t in pruned:
        last = max(t.intermediate_values)
        assert t.value == t.intermediate_values[last] and t.user_attrs["rung"] < 2
        assert t.user_attrs["items"] == sum(min(last, n) for n in whole_counts(zoo).values()) < full
        assert (
            recs[t.number]["state"] == "PRUNED" and recs[t.number]["rung"] == t.user_attrs["rung"]
        )
        assert t.user_attrs.get("promoted_to") == (None if t.user_attrs["rung"] == 0 else RUNGS[1])
    for t in complete:
        assert (
            t.user_attrs["rung"] == 2
            and t.user_attrs["items"] == full
            and t.user_attrs["promoted_to"] is None
        )
        assert sorted(t.intermediate_values) == RUNGS
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    spent = sum(t.user_attrs["items"] for t in trials)
    assert (
        f"(pruned {len(pruned)})" in out
        and f"items scored {spent:,}" in out
        and f"scored {16 * full:,}" in out
    )
    # what was stopped where: the searched candidates per rung (baselines always go on)
    searched = [t for t in trials if not t.user_attrs.get("baseline")]
    line = next(x for x in out.splitlines() if "rungs (searched candidates)" in x)
    for i, n in enumerate(RUNGS[:2]):
        at = sum(t.user_attrs["rung"] >= i for t in searched)
        stopped = sum(t.user_attrs["rung"] == i and t.state == TrialState.PRUNED for t in searched)
        assert f"{n} items/task: {at} scored, {stopped} stopped" in line
    assert line.endswith(f"all items: {sum(t.user_attrs['rung'] == 2 for t in searched)} scored")
    assert sum(t.state == TrialState.PRUNED for t in searched) == len(pruned)
    assert main(["report", str(folder), "--quiet", "--no-heldout"]) == 0
    assert (folder / "figures" / "items.png").is_file()
    assert "stopped early (PRUNED)" in (folder / "report.html").read_text()


@pytest.mark.slow
def test_an_items_budget_stops_the_study_once_its_items_are_spent(zoo, tmp_path):
    full = sum(whole_counts(zoo).values())
    budget = 3 * full
    study = run_study(
        config_from_dict(
            _study(
                zoo, tmp_path / "items", budget={"n_trials": None, "items": budget}, baselines=False
            )
        ),
        progress=False,
    )
    trials = study.get_trials(deepcopy=False)
    spent = sum(t.user_attrs.get("items", 0) for t in trials)
    # claims stop once the items are spent; what was in flight then (one candidate per worker)
    # finishes, and what was proposed ahead is queued again, not run
    assert budget <= spent < budget + 2 * full
    for t in trials:
        assert t.state != TrialState.FAIL or (
            t.user_attrs["not_run"] and "items" not in t.user_attrs
        )


@pytest.mark.slow
def test_a_pareto_study_stops_only_dominated_candidates(zoo, tmp_path):
    folder = tmp_path / "pareto"
    data = _study(
        zoo,
        folder,
        mode="pareto",
        tasks=list(zoo.tasks[:2]),
        fidelity={"rungs": RUNGS, "margin": 0.0},
    )
    config = config_from_dict(data)
    study = run_study(config, progress=False)
    keys = [o.key for o in config.objectives.items]
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 16
    for t in trials:
        if t.state != TrialState.PRUNED:
            continue
        stop = t.user_attrs["rung_stop"]
        peers = [
            o
            for o in trials
            if o.number != t.number
            and o.user_attrs.get("rung_stop", 0) >= stop
            and o.user_attrs.get(ITEM_SCORES)
        ]
        assert any(
            dominated(
                t.user_attrs[ITEM_SCORES], o.user_attrs[ITEM_SCORES], keys, [1.0, 1.0], stop, 0.0
            )
            for o in peers
        ), f"trial {t.number} was stopped without a trial dominating it"
    assert study.best_trials and all(t.state == TrialState.COMPLETE for t in study.best_trials)


@pytest.mark.slow
def test_a_run_killed_between_rungs_resumes_with_nothing_counted_twice(zoo, tmp_path):
    """A runner dies while its candidate is between rungs: the resume fails and requeues that trial,
    its items stay counted once, and the budget ends with exactly n_trials finished."""
    folder = tmp_path / "killed"
    config = config_from_dict(_study(zoo, folder, budget={"n_trials": 9}))
    run_study(config, progress=False)

    setup = setup_study(load_study_folder(folder)[0], resume=True)
    killed = setup.study.ask()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    killed.set_user_attr("runner", {"host": socket.gethostname(), "pid": proc.pid})
    params = suggest(killed, setup.space)
    killed.report(0.5, step=RUNGS[0])
    killed.set_user_attr("items", 4 * RUNGS[0])
    killed.set_user_attr("rung", 0)

    config = config_from_dict(_study(zoo, folder, budget={"n_trials": 13}))
    study = run_study(config, resume=True, progress=False)
    trials = study.get_trials(deepcopy=False)
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 13
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == killed.number)
    assert retry.params == params and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    # scored again from the first rung, on its own count
    assert min(retry.intermediate_values) == RUNGS[0]
    recs = records.read_trial_records(folder)
    assert {n for n, r in recs.items() if r["state"] in ("COMPLETE", "PRUNED")} == {
        t.number for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }


@pytest.mark.slow
@pytest.mark.parametrize("by_size", [True, False])
def test_a_groups_metric_adds_up_from_its_tasks_items_as_lm_eval_aggregates_it(
    zoo, tmp_path, by_size
):
    """A group (as mmlu groups its subjects) scored in slices: its metric from the per-item scores
    equals lm-eval's own aggregate of a full call, weighted by size or not."""
    tasks = list(zoo.tasks[:2])
    (tmp_path / "group.yaml").write_text(
        f"group: zoo_pair\ntask: [{', '.join(tasks)}]\naggregate_metric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    weight_by_size: {str(by_size).lower()}\n"
    )
    model, tok = _model(zoo)
    section = HarnessSection(
        tasks=["zoo_pair"],
        include_path=[str(zoo.tasks_dir), str(tmp_path)],
        batch_size=32,
        builtin_tasks=False,
    )
    ev = HarnessEvaluator(section, split="validation", order_seed=1)
    ev.check_item_means(["zoo_pair/acc"])
    full = ev.evaluate(HFEngine(model, tok))
    scores: dict[str, list[float]] = {}
    for span in ((0, RUNGS[0]), (RUNGS[0], 10**6)):
        for key, values in ev.evaluate(HFEngine(model, tok), items=span).per_item.items():
            scores.setdefault(key, []).extend(values)
    metrics, parts = ev.item_metrics(scores)
    assert metrics["zoo_pair/acc"] == pytest.approx(full.metrics["zoo_pair/acc"], abs=1e-12)
    assert [len(p) for p in parts["zoo_pair/acc"]] == [ev.item_counts[t] for t in tasks]
