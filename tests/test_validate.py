"""`basin validate` checks what `basin run` checks before any worker starts (models' headers, task
names, splits, metrics), with the same messages, and says what it could not check without the
hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from search.cli import main
from tests.support.runs import REPO
from tests.support.tiny import build_tasks


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return build_tasks(tmp_path_factory.mktemp("tasks"), n_items=12)


def config(llama_set, tasks, root: Path, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "study": {"name": "check", "output_dir": str(root / "study")},
        "models": {"base": str(llama_set.base), "finetunes": [str(p) for p in llama_set.finetunes]},
        "space": {"methods": ["task_arithmetic"], "weight": [0.0, 1.0]},
        "evaluator": {
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
        },
        "objectives": {"items": [{"task": "toy_next", "metric": "acc"}]},
        "workers": {"count": 1},
    }
    data.update(sections)
    path = root / "check.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def both(path: Path, capsys) -> tuple[tuple[int, str], tuple[int, str]]:
    """(exit code, stderr) of `basin validate` and of `basin run` on the same config."""
    checked = main(["validate", str(path)]), capsys.readouterr().err
    ran = main(["run", str(path), "--quiet"]), capsys.readouterr().err
    return checked, ran


def test_a_good_config_validates_with_nothing_left_unchecked(llama_set, tasks, tmp_path, capsys):
    path = config(llama_set, tasks, tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: ok" in out and "1 fine-tunes" not in out and "3 fine-tunes" in out
    assert "not checked" not in out and "warning" not in out
    assert not (tmp_path / "study").exists()  # validate creates nothing


def test_an_unknown_metric_fails_validate_as_it_fails_run(llama_set, tasks, tmp_path, capsys):
    path = config(
        llama_set,
        tasks,
        tmp_path,
        objectives={"items": [{"task": "toy_pair", "metric": "acc_nrom"}]},
    )
    (v_code, v_err), (r_code, r_err) = both(path, capsys)
    assert v_code == r_code == 2 and v_err == r_err
    assert "unknown metric 'toy_pair/acc_nrom'; did you mean 'toy_pair/acc_norm'" in v_err
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_a_filtered_generative_metric_needs_its_filter_name(zoo, tmp_path, capsys):
    """`exact_match` for a task whose filter is named `answer` used to pass validate and fail at
    run."""
    from search.demo import demo_config

    data = demo_config(str(zoo.root), generative=True)
    data["study"]["output_dir"] = str(tmp_path / "study")
    data["objectives"]["items"][0]["metric"] = "exact_match"
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(data))
    (v_code, v_err), (r_code, r_err) = both(path, capsys)
    assert v_code == r_code == 2 and v_err == r_err
    assert "did you mean 'zoo_add_gen/exact_match,answer'?" in v_err


def test_a_task_without_the_asked_split_fails_and_points_at_the_carve(
    llama_set, tasks, tmp_path, capsys
):
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    (only_test / "toy_next.yaml").write_text(yaml.safe_dump(tasks.config("toy_next", ("test",))))
    path = config(
        llama_set,
        tasks,
        tmp_path,
        evaluator={"tasks": ["toy_next"], "include_path": str(only_test), "builtin_tasks": False},
    )
    (v_code, v_err), (r_code, r_err) = both(path, capsys)
    assert v_code == r_code == 2 and v_err == r_err
    assert "task 'toy_next' has no validation split" in v_err and "holdout: 0.3" in v_err


def test_incompatible_models_fail_validate(llama_set, gpt2_set, tasks, tmp_path, capsys):
    path = config(
        llama_set,
        tasks,
        tmp_path,
        models={
            "base": str(llama_set.base),
            "finetunes": [str(llama_set.finetunes[0]), str(gpt2_set.finetunes[0])],
        },
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("basin: error:") and "Traceback" not in err


def test_search_items_that_are_the_report_items_are_flagged(llama_set, tasks, tmp_path, capsys):
    path = config(
        llama_set,
        tasks,
        tmp_path,
        evaluator={
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
            "split": "test",
            "report_split": "test",
        },
    )
    assert main(["validate", str(path)]) == 0
    assert (
        "warning: evaluator.split and evaluator.report_split are both 'test'"
        in capsys.readouterr().out
    )
    carved = config(
        llama_set,
        tasks,
        tmp_path,
        evaluator={
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
            "split": "test",
            "holdout": 0.25,
        },
    )
    assert main(["validate", str(carved)]) == 0
    assert "warning" not in capsys.readouterr().out


@pytest.mark.slow
def test_the_leaderboard_example_validates_here_but_for_what_needs_the_hub(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    path = REPO / "configs" / "leaderboard-qwen2.5-7b.yaml"
    assert main(["validate", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{path}: ok (pareto study")
    unchecked = [line for line in lines if line.startswith("not checked here:")]
    assert lines[1] == "budget: 200 trials or 43200 s of search, whichever comes first"
    # a Pareto study: at full fidelity unless its config asks
    assert lines[2] == "multi-fidelity: off: every candidate is scored on every search item"
    assert len(unchecked) == 2 and len(lines) == 5  # no warning: the test split is carved
    assert "Qwen/Qwen2.5-7B-Instruct" in unchecked[0]
    assert "openai/gsm8k (gsm8k)" in unchecked[1] and "cais/mmlu" in unchecked[1]
    # a metric without its filter is still caught offline, from the task definitions
    data = yaml.safe_load(path.read_text())
    data["objectives"]["items"][0]["metric"] = "exact_match"
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(tmp_path / "typo.yaml")]) == 2
    assert "unknown metric 'gsm8k/exact_match'; did you mean" in capsys.readouterr().err


def test_validate_prints_each_workers_memory_plan_from_the_headers(
    llama_set, tasks, tmp_path, capsys
):
    import torch
    from safetensors.torch import load_file

    from merging.methods import TABLE_POINT_BYTES, MagnitudeOrder
    from search.config import load_config
    from search.memory import GiB, memory_plan

    path = config(
        llama_set, tasks, tmp_path, space={"methods": ["ties", "dare_ties"], "weight": [0.0, 1.0]}
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    params = sum(
        t.numel()
        for t in load_file(llama_set.base / "model.safetensors").values()
        if t.is_floating_point()
    )
    plan = dict(memory_plan(load_config(str(path))).fixed)
    assert plan["base"] == plan["live model"] == 4 * params  # float32
    assert plan["task vectors (3 fine-tunes)"] == 3 * 4 * params
    tensors = sum(
        1 for t in load_file(llama_set.base / "model.safetensors").values() if t.is_floating_point()
    )
    # the tables are host memory: a note, not part of what must fit the GPU; DARE's draws are not
    # stored
    assert not any("magnitude" in what or "DARE" in what for what in plan)
    tables = 3 * tensors * 1001 * TABLE_POINT_BYTES
    assert f"magnitude tables (TIES, breadcrumbs): {tables / 2**20:.1f} MiB of host memory" in out
    # what it holds
    assert MagnitudeOrder(torch.randn(5000), table=True).table_bytes() == 1001 * TABLE_POINT_BYTES
    assert "memory plan of each worker (float32 on auto)" in out
    for what in ("base", "task vectors (3 fine-tunes)", "evaluation estimate"):
        assert what in out
    assert f"{4 * params / GiB:8.2f} GiB" in out


def test_a_plan_that_cannot_fit_the_named_gpu_is_refused_and_one_that_barely_fits_is_warned(
    llama_set, tasks, tmp_path, capsys
):
    from search.config import load_config
    from search.memory import GiB, memory_plan

    path = config(llama_set, tasks, tmp_path, workers={"count": 1, "gpu_memory_gib": 1e-6})
    (v_code, v_err), (r_code, r_err) = both(path, capsys)
    assert v_code == r_code == 2
    assert (
        "one worker needs" in v_err
        and "more than the 0.0 GiB of its GPU (workers.gpu_memory_gib: 1e-06)" in v_err
    )
    assert (
        "the largest part is task vectors (3 fine-tunes)" in r_err
        and not (tmp_path / "study").exists()
    )
    plan = memory_plan(load_config(str(path)))
    between = (plan.fixed_bytes + plan.total_bytes) / 2 / GiB
    path = config(llama_set, tasks, tmp_path, workers={"count": 1, "gpu_memory_gib": between})
    assert main(["validate", str(path)]) == 0
    assert "warning: with evaluation the plan is" in capsys.readouterr().out


def test_the_vllm_engine_s_plan_holds_its_weights_headroom_and_kv_cache(
    llama_set, tasks, tmp_path, capsys
):
    from search.config import load_config
    from search.memory import GiB, memory_plan

    evaluator = {
        "tasks": list(tasks.names),
        "include_path": str(tasks.folder),
        "builtin_tasks": False,
        "engine": "vllm",
    }
    path = config(llama_set, tasks, tmp_path, evaluator=evaluator)
    plan = memory_plan(load_config(str(path)))
    rows = dict(plan.fixed)
    assert "live model" not in rows
    assert rows["vLLM engine: its copy of the weights"] == rows["base"]
    assert rows["headroom beside vLLM (CUDA context, allocator)"] == 2 * GiB
    assert plan.evaluation[0].startswith("vLLM KV cache (at least one sequence")
    assert main(["validate", str(path)]) == 0
    assert "vLLM's share of the GPU: what is free once the merger holds" in capsys.readouterr().out

    # a fixed share: the cache is that share of the GPU less the engine's weights
    share = {**evaluator, "vllm": {"gpu_memory_utilization": 0.5}}
    path = config(llama_set, tasks, tmp_path, evaluator=share, workers={"gpu_memory_gib": 8})
    plan = memory_plan(load_config(str(path)), capacity=8 * GiB)
    assert plan.evaluation[1] == 4 * GiB - rows["base"]
    # a GPU that cannot hold the headroom beside the merger's tensors is refused before a start
    path = config(llama_set, tasks, tmp_path, evaluator=evaluator, workers={"gpu_memory_gib": 1})
    assert main(["validate", str(path)]) == 2
    assert "the largest part is headroom beside vLLM" in capsys.readouterr().err


def test_engine_options_are_checked_with_the_engine(llama_set, tasks, tmp_path, capsys):
    base = {"tasks": list(tasks.names), "include_path": str(tasks.folder), "builtin_tasks": False}
    cases = [
        ({**base, "engine": "vlm"}, "'hf' or 'vllm'"),
        ({**base, "vllm": {"enforce_eager": True}}, "but evaluator.engine is hf"),
        (
            {**base, "engine": "vllm", "vllm": {"tensor_parallel_size": 2}},
            "a basin worker holds one device",
        ),
        (
            {"kind": "perplexity", "text": str(tasks.folder / "missing.txt"), "engine": "vllm"},
            "with the hf engine only",
        ),
    ]
    for evaluator, message in cases:
        path = config(llama_set, tasks, tmp_path, evaluator=evaluator)
        assert main(["validate", str(path)]) == 2
        assert message in capsys.readouterr().err, message
