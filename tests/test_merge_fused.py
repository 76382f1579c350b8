"""The compiled kernels (merging/fused.py): the same merges as eager ops, one fused kernel per
chunk.

Real torch.compile on this CPU (inductor writes and builds C++); the first test pays the compiles,
a few seconds per variant.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from merging import (
    MergeError,
    MergeRecipe,
    ModelEntry,
    NonFiniteMergeError,
    ResidentMerger,
    export_merge,
    load_live_model,
    recipe_from_dict,
)
from merging.engine import TensorInputs, TensorScalars, merge_tensor
from merging.fused import CPU_COMPILE_PARAMS, resolve_kernels
from tests.test_merge_models import (
    SETS,
    assert_close_dicts,
    assert_equal_dicts,
    live_state,
    load_folder,
    model_set,
    recipe_data,
    reference_merge,
)

FAMILY = [
    "task_arithmetic",
    "ties",
    "ties_full",
    "dare_linear",
    "dare_ties",
    "breadcrumbs_ties",
    "della",
    "model_stock",
]


@pytest.fixture(scope="module")
def compiled_live(llama_set, gpt2_set):
    out = {}
    for which, ms in (("llama", llama_set), ("gpt2", gpt2_set)):
        merger = ResidentMerger(str(ms.base), [str(p) for p in ms.finetunes], kernels="compiled")
        out[which] = (merger, load_live_model(str(ms.base)))
    return out


@pytest.mark.slow  # torch.compile builds C++ kernels: seconds each
@pytest.mark.parametrize("case", FAMILY)
@pytest.mark.parametrize("which", SETS)
def test_compiled_resident_merge_matches_the_reference_and_the_compiled_export_bit_for_bit(
    request, tmp_path, compiled_live, which, case
):
    ms = model_set(request, which)
    data = recipe_data(case, ms, with_base=True)
    recipe = recipe_from_dict(data)
    merger, live = compiled_live[which]
    assert merger.kernels == "compiled"
    merger.apply(recipe, live)
    exported = load_folder(
        export_merge(recipe, tmp_path / "merged", progress=False, kernels="compiled")
    )
    resident = live_state(live, exported)
    assert_equal_dicts(resident, exported)
    assert_close_dicts(resident, reference_merge(data))


def hand_merge(method: str, normalize: bool, dtype: torch.dtype, kernels: str) -> torch.Tensor:
    """Hand-made tensors with ties, zeros, a negative weight and opposite signs, merged by the
    engine."""
    gen = torch.Generator().manual_seed(3)
    shape = (37, 111)  # 4107 entries: not a multiple of any vector width
    base = torch.randn(shape, generator=gen)
    deltas = [torch.randn(shape, generator=gen) * 0.01 for _ in range(3)]
    deltas[1].view(-1)[::7] = 0.0
    deltas[2].view(-1)[::5] = -deltas[0].view(-1)[::5]  # opposite signs: the election has to choose
    deltas[0].view(-1)[::3] = 0.005  # equal magnitudes at the trim boundary
    recipe = MergeRecipe(
        method=method,
        models=tuple(ModelEntry(path=f"m{k}") for k in range(3)),
        base="b",
        normalize=normalize,
        seed=4,
    )
    scalars = TensorScalars(
        weights=(0.7, -0.4, 1.1),
        densities=(0.4, 0.9, 1.0),
        lam=0.8,
        t=0.5,
        gammas=(0.05, 0.0, 0.1),
        epsilons=(0.1, 0.3, 0.2),
    )
    out = torch.empty(shape, dtype=dtype)
    merge_tensor(
        recipe,
        "model.layers.0.mlp.up_proj.weight",
        scalars,
        TensorInputs(base, deltas),
        out,
        kernels=kernels,
    )
    return out


@pytest.mark.slow  # torch.compile builds C++ kernels: seconds each
@pytest.mark.parametrize(
    "method",
    [
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
    ],
)
@pytest.mark.parametrize("normalize", [False, True])
def test_the_compiled_kernel_computes_what_the_eager_one_computes(method, normalize):
    for dtype in (torch.float32, torch.float16):
        eager = hand_merge(method, normalize, dtype, "eager")
        compiled = hand_merge(method, normalize, dtype, "compiled")
        assert (
            bool((eager != hand_merge("task_arithmetic", False, dtype, "eager")).any())
            or method == "task_arithmetic"
        )
        torch.testing.assert_close(
            compiled, eager, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6
        )


@pytest.mark.slow  # torch.compile builds C++ kernels: seconds each
def test_a_non_finite_compiled_merge_is_refused(llama_set, compiled_live):
    merger, live = compiled_live["llama"]
    data = recipe_data("ties", llama_set, with_base=True)
    data["parameters"] = {**data.get("parameters", {}), "lambda": 1e42}
    with pytest.raises(NonFiniteMergeError, match="NaN or inf"):
        merger.apply(recipe_from_dict(data), live)


def test_kernels_setting():
    # small models: no compile
    assert resolve_kernels("auto", "cpu", CPU_COMPILE_PARAMS - 1) == "eager"
    assert resolve_kernels("auto", "cpu", CPU_COMPILE_PARAMS) == "compiled"
    assert resolve_kernels("auto", "cuda:1", 1000) == "compiled"
    assert resolve_kernels("compiled", "cpu", 1000) == "compiled"
    assert resolve_kernels("eager", "cuda", 10**10) == "eager"
    with pytest.raises(MergeError, match="did you mean 'compiled'"):
        resolve_kernels("compile", "cpu", 1000)


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers
def test_without_a_compiler_it_warns_once_and_merges_eagerly(tmp_path):
    """A machine without a C++ compiler: the merge still happens, with eager ops and one warning."""
    script = (
        "import warnings, torch\n"
        "from tests.test_merge_fused import hand_merge\n"
        "outs = []\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        outs.append(hand_merge('ties', True, torch.float32, 'compiled'))\n"
        "ref = hand_merge('ties', True, torch.float32, 'eager')\n"
        "msgs = [str(w.message) for w in caught if 'compiled merge kernels' in str(w.message)]\n"
        "print(len(msgs), all(torch.equal(o, ref) for o in outs))\n"
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "True"], done.stdout + done.stderr[-2000:]
