"""The compiled kernels (merging/fused.py): the same merges as eager ops, one fused kernel per chunk.

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
    NonFiniteMergeError,
    ResidentMerger,
    export_merge,
    load_live_model,
    methods,
    recipe_from_dict,
)
from merging.fused import combine_into, resolve_kernels
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

FAMILY = ["task_arithmetic", "ties", "ties_full", "dare_linear", "dare_ties"]


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
    exported = load_folder(export_merge(recipe, tmp_path / "merged", progress=False, kernels="compiled"))
    resident = live_state(live, exported)
    assert_equal_dicts(resident, exported)
    assert_close_dicts(resident, reference_merge(data))


@pytest.mark.slow  # torch.compile builds C++ kernels: seconds each
@pytest.mark.parametrize("keep", ["all", "magnitude", "draw"])
@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_kernel_computes_what_combine_computes(keep, consensus, normalize):
    """Hand-made tensors with ties, zeros, a negative weight, a cutoff of 256 and float16 output."""
    gen = torch.Generator().manual_seed(3)
    n = 4099  # not a multiple of any vector width
    base = torch.randn(n, generator=gen)
    deltas = [torch.randn(n, generator=gen) * 0.01 for _ in range(3)]
    deltas[1][::7] = 0.0
    deltas[2][::5] = -deltas[0][::5]  # opposite signs: the election has to choose
    weights, scales = [0.7, -0.4, 1.1], [1.0, 1.0, 1.0]
    draws = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen) for _ in range(3)]
    cuts: list[float] = []
    masks: list[torch.Tensor | None] = [None, None, None]
    if keep == "magnitude":
        cuts = [methods.magnitude_threshold(methods.magnitude_table(d), 0.4) for d in deltas]
        masks = [d.abs() >= c for d, c in zip(deltas, cuts)]
    elif keep == "draw":
        cuts, scales = [128.0, 256.0, 32.0], [2.0, 1.0, 8.0]
        masks = [draws[0] < 128, None, draws[2] < 32]
    expected = methods.combine(base, deltas, weights, keep=masks, scales=scales, consensus=consensus,
                               normalize=normalize, lam=0.8)
    for dtype in (torch.float32, torch.float16):
        out = torch.empty(n, dtype=dtype)
        finite = combine_into(out, base, deltas, weights, keep=keep, cuts=cuts, draws=draws, scales=scales,
                              consensus=consensus, normalize=normalize, lam=0.8, compiled=True)
        assert finite
        torch.testing.assert_close(out, expected.to(dtype), rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)


@pytest.mark.slow  # torch.compile builds C++ kernels: seconds each
def test_a_non_finite_compiled_merge_is_refused(llama_set, compiled_live):
    merger, live = compiled_live["llama"]
    data = recipe_data("ties", llama_set, with_base=True)
    data["parameters"] = {**data.get("parameters", {}), "lambda": 1e42}
    with pytest.raises(NonFiniteMergeError, match="NaN or inf"):
        merger.apply(recipe_from_dict(data), live)


def test_kernels_setting():
    assert resolve_kernels("auto", "cpu") == "eager"
    assert resolve_kernels("auto", "cuda:1") == "compiled"
    assert resolve_kernels("compiled", "cpu") == "compiled"
    with pytest.raises(MergeError, match="did you mean 'compiled'"):
        resolve_kernels("compile", "cpu")


@pytest.mark.slow  # a fresh interpreter that imports torch and transformers
def test_without_a_compiler_it_warns_once_and_merges_eagerly(tmp_path):
    """A machine without a C++ compiler: the merge still happens, with eager ops and one warning."""
    script = (
        "import warnings, torch\n"
        "from merging.fused import combine_into\n"
        "b = torch.randn(1000); ds = [torch.randn(1000) for _ in range(2)]\n"
        "outs = []\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        out = torch.empty(1000)\n"
        "        combine_into(out, b, ds, [0.5, 0.5], keep='all', cuts=[], draws=None, scales=[1.0, 1.0],\n"
        "                     consensus=True, normalize=True, lam=1.0, compiled=True)\n"
        "        outs.append(out)\n"
        "ref = torch.empty(1000)\n"
        "combine_into(ref, b, ds, [0.5, 0.5], keep='all', cuts=[], draws=None, scales=[1.0, 1.0],\n"
        "             consensus=True, normalize=True, lam=1.0, compiled=False)\n"
        "msgs = [str(w.message) for w in caught if 'compiled merge kernels' in str(w.message)]\n"
        "print(len(msgs), all(torch.equal(o, ref) for o in outs))\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "True"], done.stdout + done.stderr[-2000:]
