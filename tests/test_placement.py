"""Placement tiers (merging/placement.py): the base and task vectors held on the device, in host
memory or memory-mapped from disk merge the same bits as the resident path and the export; the
plan (search/memory.py) says where each tensor lands and what a candidate moves."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merging import ResidentMerger, export_merge, load_live_model, recipe_from_dict
from merging.catalog import METHOD_TABLE
from merging.placement import BASE, assign_tiers
from search.cli import main
from tests.support.merges import TWO, live_merge, method_recipe

PLACEMENTS = ("device", "host", "disk", "auto")


@pytest.fixture(scope="module")
def placed(llama_set, tmp_path_factory):
    """Mergers of the Llama set per (placement, number of fine-tunes); auto given rooms that put
    tensors on all three tiers. Built on first use."""
    cache = tmp_path_factory.mktemp("tier-cache")
    built: dict[tuple[str, int], ResidentMerger] = {}

    def get(placement: str, n: int) -> ResidentMerger:
        if (placement, n) not in built:
            rooms = dict(device_room=150_000, host_room=100_000) if placement == "auto" else {}
            built[(placement, n)] = ResidentMerger(
                str(llama_set.base),
                [str(p) for p in llama_set.finetunes[:n]],
                placement=placement,
                cache_dir=cache / placement,
                **rooms,
            )
        return built[(placement, n)]

    return get


@pytest.fixture(scope="module")
def live(llama_set):
    return load_live_model(str(llama_set.base))


@pytest.mark.parametrize("method", list(METHOD_TABLE))
def test_every_placement_merges_the_bits_of_the_device_and_the_export(
    method, llama_set, placed, live, tmp_path
):
    n = 2 if method in TWO else 3
    data = method_recipe(method, llama_set.base, llama_set.finetunes[:n])
    want = live_merge(placed("device", n), live, data)
    exported = load_file(
        export_merge(recipe_from_dict(data), tmp_path / "m", progress=False) / "model.safetensors"
    )
    assert all(torch.equal(exported[name], want[name]) for name in want)
    for placement in PLACEMENTS[1:]:
        got = live_merge(placed(placement, n), live, data)
        assert all(torch.equal(got[name], want[name]) for name in want), placement
    # the stream an engine with its own weights takes (vLLM) gives the same bits from disk
    streamed = dict(placed("disk", n).candidate(recipe_from_dict(data)).stream())
    assert all(torch.equal(streamed[name], want[name]) for name in want)


def test_auto_fills_the_device_then_host_memory_then_disk(placed):
    merger = placed("auto", 3)
    held = merger.tier_bytes()
    assert all(held[t] > 0 for t in ("device", "host", "disk"))
    assert held["device"] <= 150_000 and held["host"] <= 100_000
    assert sum(held.values()) == placed("device", 3).tier_bytes()["device"]
    # the largest tensors go first (the embeddings: held on the device, they need no staging)
    largest = max(merger.names, key=lambda n: merger.base[n].numel())
    assert merger.tiers[(BASE, largest)] == "device"
    # the rule itself: first fit, largest first, no room left means disk
    items = [((BASE, "a"), 60), ((0, "a"), 60), ((1, "a"), 30), ((2, "a"), 50)]
    assert assign_tiers(items, "auto", 100, 50) == {
        (BASE, "a"): "device",
        (0, "a"): "disk",
        (1, "a"): "device",
        (2, "a"): "host",
    }
    assert set(assign_tiers(items, "host", 0, 0).values()) == {"host"}


def test_the_disk_tier_is_written_once_and_mapped_not_copied(llama_set, placed, tmp_path):
    merger = placed("disk", 3)
    files = sorted(Path(merger._disk.paths[k]) for k in merger._disk.paths)
    assert len(files) == 4  # the base and three task vectors, one safetensors file each
    # a standard safetensors file: what it holds is the task vector, bit for bit
    on_disk = load_file(str(merger._disk.paths[0]))
    device = placed("device", 3)
    assert all(torch.equal(on_disk[n], device.deltas[0][n]) for n in device.names)
    # held tensors are views of the mapping: no memory of the process's own
    mapping = merger._disk.files[0]._map
    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    assert all(start <= merger.deltas[0][n].data_ptr() < start + len(mapping) for n in merger.names)
    stamps = [f.stat().st_mtime_ns for f in files]
    again = ResidentMerger(
        str(llama_set.base),
        [str(p) for p in llama_set.finetunes],
        placement="disk",
        cache_dir=files[0].parent,
    )
    assert [f.stat().st_mtime_ns for f in files] == stamps  # mapped again, not written again
    assert sorted(again._disk.paths.values()) == files


def test_an_adapter_keeps_its_factors_on_the_device_under_every_placement(
    llama_set, live, tmp_path
):
    from tests.test_lora import make_adapter

    adapter = make_adapter(llama_set.base, tmp_path / "adapter", r=4, lora_alpha=8)
    models = [str(llama_set.finetunes[0]), str(adapter)]
    data = method_recipe("ties", llama_set.base, models)
    want = None
    for placement in ("device", "disk"):
        merger = ResidentMerger(
            str(llama_set.base), models, placement=placement, cache_dir=tmp_path / "c"
        )
        assert {k for k, _ in merger.tiers} == {BASE, 0}  # the adapter is not tiered
        got = live_merge(merger, live, data)
        want = want or got
        assert all(torch.equal(got[n], want[n]) for n in got)
    exported = load_file(
        export_merge(recipe_from_dict(data), tmp_path / "m", progress=False) / "model.safetensors"
    )
    assert all(torch.equal(exported[n], want[n]) for n in want)


# --- config and plan ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from tests.support.tiny import build_tasks

    return build_tasks(tmp_path_factory.mktemp("tasks"), n_items=12)


def study(llama_set, tasks, root: Path, models: dict | None = None, **sections: Any) -> Path:
    data: dict[str, Any] = {
        "study": {"name": "tiers", "output_dir": str(root / "study")},
        "models": {
            "base": str(llama_set.base),
            "finetunes": [str(p) for p in llama_set.finetunes],
            "cache_dir": str(root / "cache"),
            **(models or {}),
        },
        "space": {"methods": ["ties"], "weight": [0.0, 1.0]},
        "evaluator": {
            "tasks": list(tasks.names),
            "include_path": str(tasks.folder),
            "builtin_tasks": False,
        },
        "objectives": {"items": [{"task": "toy_next", "metric": "acc"}]},
        "workers": {"count": 1},
        **sections,
    }
    path = root / "tiers.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_misspelt_placement_names_the_known_ones(llama_set, tasks, tmp_path, capsys):
    path = study(llama_set, tasks, tmp_path, {"placement": "dsk"})
    assert main(["validate", str(path)]) == 2
    assert (
        "models.placement: 'dsk' is not allowed; did you mean 'disk'? Known: auto, device, host, "
        "disk" in capsys.readouterr().err
    )


def test_validate_prints_each_tier_and_moves_to_disk_what_the_host_budget_leaves(
    llama_set, tasks, tmp_path, capsys
):
    from search.config import load_config
    from search.memory import GiB, memory_plan

    path = study(llama_set, tasks, tmp_path)
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    print(out)
    plan = memory_plan(load_config(str(path)))
    assert plan.tiers.held["device"] == 4 * plan.tiers.model_bytes  # base + 3 task vectors
    assert "placement (models.placement: auto; a CPU device: host memory is the device's own" in out
    assert "expected merge time per candidate: at least" in out
    # a CPU worker whose host budget holds the live model and the evaluation but not much more:
    # auto maps the rest from disk
    beside = plan.fixed_bytes - plan.tiers.held["device"] + plan.evaluation[1]
    budget = (beside + 1.5 * plan.tiers.model_bytes) / GiB
    path = study(llama_set, tasks, tmp_path, {"host_memory_gib": budget})
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    print(out)
    tiers = memory_plan(load_config(str(path))).tiers
    assert tiers.held["device"] <= 1.5 * tiers.model_bytes and tiers.held["host"] == 0
    assert tiers.held["device"] + tiers.held["disk"] == 4 * tiers.model_bytes
    assert "disk read (cold)" in out and f"disk tier folder: {tmp_path / 'cache'}" in out
    assert "base (on the device: " in out


def test_a_gpu_set_goes_to_host_memory_and_only_one_that_fits_nowhere_is_refused(
    llama_set, tasks, tmp_path, capsys
):
    from search.config import load_config
    from search.memory import GiB, memory_plan

    gpu = {"count": 1, "gpus_per_worker": 1}
    path = study(llama_set, tasks, tmp_path, {"placement": "device"}, workers=gpu)
    whole = memory_plan(load_config(str(path)))
    model = whole.tiers.model_bytes
    # a GPU that holds the live model and the scratch but not every task vector beside them
    tight = {**gpu, "gpu_memory_gib": (whole.fixed_bytes - model / 2) / GiB}
    path = study(llama_set, tasks, tmp_path, workers=tight)
    assert main(["validate", str(path)]) == 0  # (the evaluation estimate is warned about)
    print(capsys.readouterr().out)
    plan = memory_plan(load_config(str(path)), capacity=int(tight["gpu_memory_gib"] * GiB))
    assert plan.tiers.held["host"] > 0 and plan.fixed_bytes <= plan.capacity
    assert sum(plan.tiers.held.values()) == 4 * model
    # the same GPU with every tensor on it is refused, naming the way out
    path = study(llama_set, tasks, tmp_path, {"placement": "device"}, workers=tight)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "more than the" in err and "Set models.placement: auto (it is device)" in err
    # a GPU too small for the live model fits nowhere
    path = study(llama_set, tasks, tmp_path, workers={**gpu, "gpu_memory_gib": 1e-5})
    assert main(["validate", str(path)]) == 2
    assert "Even with the base and every task vector off the GPU" in capsys.readouterr().err
    # host memory below an explicit host placement is refused too
    small = {"placement": "host", "host_memory_gib": 1e-5}
    path = study(llama_set, tasks, tmp_path, small, workers=gpu)
    assert main(["validate", str(path)]) == 2
    assert "raise models.host_memory_gib" in capsys.readouterr().err


def readme_example() -> list[str]:
    """The README's example: Llama-3-8B in bfloat16, 12 fine-tunes, one 80 GiB GPU, 128 GiB of
    host memory for the worker; the plan's lines without measuring (no bandwidths)."""
    plan, params = _eight_b_plan("hf")
    return [f"{params / 1e9:.2f}B parameters", *plan.lines(measure=False)]


def _eight_b_plan(engine: str):
    """The README example's plan with the given engine, and its parameter count."""
    from search.config import StudyConfig
    from search.memory import GiB, plan_from_sizes

    hidden, inter, kv, vocab = 4096, 14336, 1024, 128256
    numel = {"model.embed_tokens.weight": vocab * hidden, "lm_head.weight": vocab * hidden}
    numel["model.norm.weight"] = hidden
    for i in range(32):
        layer = f"model.layers.{i}."
        for name, n in (
            ("self_attn.q_proj.weight", hidden * hidden),
            ("self_attn.k_proj.weight", kv * hidden),
            ("self_attn.v_proj.weight", kv * hidden),
            ("self_attn.o_proj.weight", hidden * hidden),
            ("mlp.gate_proj.weight", inter * hidden),
            ("mlp.up_proj.weight", inter * hidden),
            ("mlp.down_proj.weight", hidden * inter),
            ("input_layernorm.weight", hidden),
            ("post_attention_layernorm.weight", hidden),
        ):
            numel[layer + name] = n
    config = StudyConfig.model_validate(
        {
            "study": {"name": "eight"},
            "models": {
                "base": "base",
                "finetunes": [f"ft{k}" for k in range(12)],
                "dtype": "bfloat16",
                "host_memory_gib": 128,
            },
            "evaluator": {"tasks": ["gsm8k"], "batch_size": 8, "engine": engine},
            "objectives": {"items": [{"task": "gsm8k", "metric": "exact_match"}]},
            "workers": {"gpus_per_worker": 1, "gpu_memory_gib": 80},
        }
    )
    shape = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    }
    plan = plan_from_sizes(
        config.models,
        config.evaluator,
        config.space.methods,
        "cuda",
        numel,
        list(range(12)),
        [],
        shape,
        80 * GiB,
        "workers.gpu_memory_gib: 80",
    )
    return plan, sum(numel.values())


def test_a_vllm_engine_leaves_free_what_the_merger_needs_only_while_merging():
    """vLLM sizes itself to the GPU's free memory when it starts, after the merger has placed its
    tensors; the merge's scratch and the placement's staging are allocated later, per candidate,
    so the engine's share must leave them free."""
    from evaluators.engines import EngineError
    from evaluators.vllm_engine import HEADROOM_BYTES, auto_share
    from search.memory import GiB

    plan, _ = _eight_b_plan("vllm")
    rows = dict(plan.fixed)
    scratch = next(b for what, b in rows.items() if what.startswith("merge scratch"))
    staging = next(b for what, b in rows.items() if what.startswith("placement staging"))
    assert plan.during_merge == scratch + staging > HEADROOM_BYTES  # the old flat headroom: short
    total = 80 * GiB
    free = total - plan.tiers.held["device"]
    share = auto_share(free, total, plan.during_merge)
    assert share * total <= free - HEADROOM_BYTES - plan.during_merge + 0.001 * total
    assert share * total >= free - HEADROOM_BYTES - plan.during_merge - 0.001 * total
    with pytest.raises(EngineError, match=r"merging needs 10\.\d GiB"):
        auto_share(HEADROOM_BYTES + plan.during_merge, total, plan.during_merge)
    hf, _ = _eight_b_plan("hf")
    assert hf.during_merge == plan.during_merge  # the same merger under either engine


def test_the_readme_example_is_the_plan_s(capsys):
    lines = readme_example()
    print("\n".join(lines))
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for line in lines[1:]:
        if " holds " in line:  # the tier rows
            assert line.strip() in readme, line


if __name__ == "__main__":  # python -m tests.test_placement: print the README example's plan
    print("\n".join(readme_example()))


def test_a_worker_places_each_tensor_where_validate_planned_it(llama_set, tasks, tmp_path):
    from search.config import load_config
    from search.memory import memory_plan
    from search.workers import WorkerSpec, placement_rooms

    plan = memory_plan(load_config(str(study(llama_set, tasks, tmp_path))))
    beside = plan.fixed_bytes - plan.tiers.held["device"] + plan.evaluation[1]
    budget = (beside + 2.5 * plan.tiers.model_bytes) / 2**30
    config = load_config(str(study(llama_set, tasks, tmp_path, {"host_memory_gib": budget})))
    spec = WorkerSpec(
        models=config.models.resolved(), evaluator=config.evaluator, space=config.space
    )
    device_room, host_room, reserve = placement_rooms(spec, "cpu")
    assert reserve == 0  # no engine sizes itself to a CPU's free memory
    merger = ResidentMerger(
        config.models.base,
        list(config.models.finetunes),
        placement="auto",
        device_room=device_room,
        host_room=host_room,
        cache_dir=config.models.cache_dir,
    )
    assert merger.tier_bytes() == memory_plan(config).tiers.held
    assert merger.tier_bytes()["disk"] > 0
