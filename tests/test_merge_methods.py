"""Merge math on small hand-made tensors whose expected results are worked out by hand.

Each method is run through `engine.merge_tensor` (the routine both the export and the resident path
call), so trimming thresholds, DARE masks, rescaling, sign election and normalization are all
exercised; slerp and the layer mapping are also tested on their own.
"""

from __future__ import annotations

import math

import pytest
import torch

from merging import LayerParam, MergeError, MergeRecipe, ModelEntry, methods
from merging.catalog import Keep, method_spec
from merging.engine import TensorInputs, TensorScalars, merge_tensor
from merging.layers import build_layer_map


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def merge(
    method: str,
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    densities: list[float] | None = None,
    lam: float = 1.0,
    tt: float = 0.5,
    normalize: bool | None = None,
    rescale: bool | None = None,
    gammas: list[float] | None = None,
    epsilons: list[float] | None = None,
    seed: int = 0,
    name: str = "model.layers.0.mlp.up_proj.weight",
    with_base: bool | None = None,
    slerp_over: str = "tensor",
) -> torch.Tensor:
    """One tensor's merge through the engine, with the per-tensor scalars given directly.
    with_base: whether the recipe names a base (default: where the method needs one)."""
    recipe = MergeRecipe(
        method=method,
        models=tuple(ModelEntry(path=f"m{k}") for k in range(len(deltas))),
        base="b" if (method_spec(method).needs_base if with_base is None else with_base) else None,
        normalize=normalize,
        rescale=rescale,
        seed=seed,
        slerp_over=slerp_over,
    )
    scalars = TensorScalars(
        weights=tuple(weights),
        densities=tuple(densities or [1.0] * len(deltas)),
        lam=lam,
        t=tt,
        gammas=tuple(gammas or [0.01] * len(deltas)),
        epsilons=tuple(epsilons or [0.15] * len(deltas)),
    )
    inputs = TensorInputs(base=base, deltas=deltas)
    out = torch.empty_like(base)
    merge_tensor(recipe, name, scalars, inputs, out)
    return out


def close(actual: torch.Tensor, expected: torch.Tensor | list[float]) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


# --- linear ------------------------------------------------------------------------------------

# M1 = [1, 2, 3], M2 = [3, 0, -1] written as B + T with B = [1, 1, 1].
B3 = t(1, 1, 1)
T1 = t(0, 1, 2)
T2 = t(2, -1, -2)


def test_linear_normalized_is_weighted_mean():
    # (1*M1 + 3*M2) / 4 = ([1, 2, 3] + [9, 0, -3]) / 4
    close(merge("linear", B3, [T1, T2], [1.0, 3.0]), [2.5, 0.5, 0.0])


def test_linear_unnormalized_is_weighted_sum():
    close(merge("linear", B3, [T1, T2], [1.0, 3.0], normalize=False), [10.0, 2.0, 0.0])


def test_linear_methods_function_directly():
    close(methods.linear(B3, [T1, T2], [1.0, 3.0], normalize=True), [2.5, 0.5, 0.0])
    close(methods.linear(B3, [T1, T2], [1.0, 3.0], normalize=False), [10.0, 2.0, 0.0])


def test_linear_zero_weight_model_changes_nothing():
    # weight 0 on M2: the result is M1 (normalized by 1)
    close(merge("linear", B3, [T1, T2], [1.0, 0.0]), [1.0, 2.0, 3.0])


# --- task arithmetic -----------------------------------------------------------------------------


def test_task_arithmetic_with_lambda():
    # sum w T = [0,1,2] + 3*[2,-1,-2] = [6,-2,-4]; * 0.5 = [3,-1,-2]; + B
    close(merge("task_arithmetic", B3, [T1, T2], [1.0, 3.0], lam=0.5), [4.0, 0.0, -1.0])


def test_task_arithmetic_normalized():
    # [6,-2,-4] / 4 = [1.5,-0.5,-1]; * 0.5 = [0.75,-0.25,-0.5]; + B
    close(
        merge("task_arithmetic", B3, [T1, T2], [1.0, 3.0], lam=0.5, normalize=True),
        [1.75, 0.75, 0.5],
    )


def test_task_arithmetic_all_zero_weights_gives_base():
    close(merge("task_arithmetic", B3, [T1, T2], [0.0, 0.0]), [1.0, 1.0, 1.0])


# --- TIES ----------------------------------------------------------------------------------------

B4 = torch.zeros(4)
U1 = t(1, -2, 0.5, 3)
U2 = t(-1, 1, 0.25, -4)


def test_ties_example_from_the_brief():
    # sum = [0, -1, 0.75, -1] -> signs [+, -, +, -]
    # entry 0: only U1 (1) agrees; 1: only U1 (-2); 2: both, (0.5+0.25)/2; 3: only U2 (-4)
    close(merge("ties", B4, [U1, U2], [1.0, 1.0]), [1.0, -2.0, 0.375, -4.0])


def test_ties_without_normalize_sums_agreeing_entries():
    close(merge("ties", B4, [U1, U2], [1.0, 1.0], normalize=False), [1.0, -2.0, 0.75, -4.0])


def test_ties_weights_elect_sign_and_divide_by_kept_weights():
    # w = [1, 2]: wU1 = [1,-2,0.5,3], wU2 = [-2,2,0.5,-8]; sum = [-1,0,1,-5] -> [-,+,+,-]
    # 0: -2/2; 1: sum 0 counts as +, 2/2; 2: (0.5+0.5)/(1+2); 3: -8/2
    close(merge("ties", B4, [U1, U2], [1.0, 2.0]), [-1.0, 1.0, 1.0 / 3.0, -4.0])


def test_ties_lambda_and_base():
    base = t(1, 1, 1, 1)
    # B + 2 * [1, -2, 0.375, -4]
    close(merge("ties", base, [U1, U2], [1.0, 1.0], lam=2.0), [3.0, -3.0, 1.75, -7.0])


def test_ties_density_trims_smallest_entries():
    # density 0.5 of 4 entries keeps 2: U1 -> [0,-2,0,3], U2 -> [-1,0,0,-4]
    # sum = [-1,-2,0,-1] -> [-,-,+,-]; 0: -1/1; 1: -2/1; 2: nothing kept (divisor 0 -> 1); 3: -4/1
    close(merge("ties", B4, [U1, U2], [1.0, 1.0], densities=[0.5, 0.5]), [-1.0, -2.0, 0.0, -4.0])


def test_ties_zero_sum_elects_plus():
    close(merge("ties", torch.zeros(1), [t(1), t(-1)], [1.0, 1.0]), [1.0])


def test_ties_zero_entries_do_not_count_in_divisor():
    # entry 1: the first task vector is 0 there, so only the second's weight divides
    close(merge("ties", torch.zeros(2), [t(2, 0), t(2, 4)], [1.0, 1.0]), [2.0, 4.0])


def kept_by_rank(delta: torch.Tensor, skip: int, count: int) -> torch.Tensor:
    """The reference keep mask: sort by |delta| descending, equal magnitudes by position (a plain
    Python sort, not basin's selection), and keep positions skip .. skip + count - 1."""
    flat = delta.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-abs(flat[i]), i))
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[order[skip : skip + count]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("density", [0.1, 0.25, 0.4237, 0.5, 0.7, 0.9, 0.999])
@pytest.mark.parametrize("n", [1000, 4096, 777])
def test_ties_keeps_exactly_max_1_int_density_n_for_any_density(density, n):
    gen = torch.Generator().manual_seed(n)
    delta = torch.randn(n, generator=gen)
    out = merge("ties", torch.zeros(n), [delta], [1.0], densities=[density])
    assert int((out != 0).sum()) == max(1, int(density * n))
    assert torch.equal(out != 0, kept_by_rank(delta, 0, max(1, int(density * n))))


def test_ties_with_tied_magnitudes_keeps_exactly_k_the_first_by_position():
    # 40 entries of 4 magnitudes (10 each) and signs: density 0.25 keeps 10 -> exactly the ten 4.0s;
    # density 0.3 keeps 12 -> the 4.0s and the first two 3.0s by position, whatever their sign
    gen = torch.Generator().manual_seed(7)
    delta = (torch.randint(1, 5, (40,), generator=gen).float()) * torch.where(
        torch.rand(40, generator=gen) < 0.5, -1.0, 1.0
    )
    for density in (0.25, 0.3, 0.5, 0.61):
        k = max(1, int(density * 40))
        out = merge("ties", torch.zeros(40), [delta], [1.0], densities=[density])
        assert torch.equal(out != 0, kept_by_rank(delta, 0, k)), density


def test_resident_tables_and_exact_selection_give_the_same_bounds():
    # one task vector with many ties; bounds from the precomputed table and from selection agree
    gen = torch.Generator().manual_seed(3)
    delta = torch.randint(-20, 21, (50_000,), generator=gen).float() / 8
    tabled, selected = (
        methods.MagnitudeOrder(delta, table=True),
        methods.MagnitudeOrder(delta, table=False),
    )
    for density in (0.001, 0.1, 0.333, 0.5, 0.999):
        kept = methods.kept_range(Keep.MAGNITUDE, delta.numel(), density)
        assert tabled.bounds(kept) == selected.bounds(kept), density
    absval = delta.abs()
    for position in (0, 1, 99, 12_345, 49_999):
        value, index = selected.bound(position)
        reference = kept_by_rank(delta, position, 1).nonzero().item()
        assert (value, index) == (float(absval[reference]), reference)


def test_ties_trimming_in_merge_keeps_int_density_n_entries():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(64, 32, generator=gen)
    out = merge("ties", torch.zeros(64, 32), [delta], [1.0], densities=[0.3])
    kept = out != 0
    assert int(kept.sum()) == int(0.3 * delta.numel())
    expected = torch.zeros(delta.numel())
    idx = torch.topk(delta.reshape(-1).abs(), int(0.3 * delta.numel())).indices
    expected[idx] = delta.reshape(-1)[idx]
    close(out.reshape(-1), expected)


def test_ties_trim_count_matches_mergekit_float_rounding():
    # mergekit keeps k = int(density * n) computed in floating point: int(0.29 * 100) == 28
    delta = torch.randn(100, generator=torch.Generator().manual_seed(0))
    for density in (0.29, 0.57):
        out = merge("ties", torch.zeros(100), [delta], [1.0], densities=[density])
        assert int((out != 0).sum()) == int(density * 100), density


def test_ties_density_one_keeps_everything_even_tiny_entries():
    delta = t(1.0, 1e-12, -0.5, 3e-9)
    out = merge("ties", torch.zeros(4), [delta], [1.0], densities=[1.0])
    close(out, delta)
    assert bool((out != 0).all())


# --- breadcrumbs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "density,gamma", [(0.5, 0.1), (0.3, 0.0), (0.9, 0.2), (0.05, 0.01), (0.999, 0.5)]
)
def test_breadcrumbs_drops_the_largest_and_the_smallest(density, gamma):
    n = 1000
    delta = torch.randn(n, generator=torch.Generator().manual_seed(11))
    target, top = int(density * n), int(gamma * n)
    # mergekit: fewer outliers set aside when the density needs them
    skip = n - max(0, n - target - top) - target
    out = merge("breadcrumbs", torch.zeros(n), [delta], [1.0], densities=[density], gammas=[gamma])
    assert torch.equal(out != 0, kept_by_rank(delta, skip, target))
    close(out, torch.where(out != 0, delta, 0.0))  # no rescale: survivors as they are


def test_breadcrumbs_density_one_keeps_everything_as_mergekit():
    delta = torch.randn(100, generator=torch.Generator().manual_seed(1))
    close(
        merge("breadcrumbs", torch.zeros(100), [delta], [1.0], densities=[1.0], gammas=[0.1]), delta
    )


def test_breadcrumbs_ties_elects_signs_after_the_drops():
    # two entries of 6 kept per vector (density 0.5 after gamma 1/6 sets the largest aside)
    d1, d2 = t(9, 1, -3, 4, 0.5, -2), t(-1, 8, 3, -4, 2, 0.25)
    out = merge(
        "breadcrumbs_ties",
        torch.zeros(6),
        [d1, d2],
        [1.0, 1.0],
        densities=[0.5, 0.5],
        gammas=[1 / 6, 1 / 6],
    )
    k1 = kept_by_rank(d1, 1, 3)  # 4, -3, -2
    k2 = kept_by_rank(d2, 1, 3)  # -4, 3, 2
    a, b = torch.where(k1, d1, 0.0), torch.where(k2, d2, 0.0)
    elected = torch.where(a + b >= 0, 1.0, -1.0)
    agree_a, agree_b = a * elected > 0, b * elected > 0
    # breadcrumbs_ties: no normalize
    close(out, torch.where(agree_a, a, 0.0) + torch.where(agree_b, b, 0.0))


# --- DARE ----------------------------------------------------------------------------------------

NAME = "model.layers.0.mlp.up_proj.weight"


def draws(n: int, seed: int, k: int, name: str = NAME) -> torch.Tensor:
    return methods.uniform(torch.arange(n), torch.tensor(methods.draw_keys(seed, k, name)))


V1 = t(1, 2, 3, 4)
V2 = t(5, -1, -3, 2)


def test_dare_linear_rescales_survivors():
    keep = draws(4, 0, 0) < 0.5
    close(merge("dare_linear", B4, [V1], [1.0], densities=[0.5]), torch.where(keep, V1 / 0.5, 0.0))
    close(
        merge("dare_linear", B4, [V1], [1.0], densities=[0.5], rescale=False),
        torch.where(keep, V1, 0.0),
    )


def test_dare_two_models_weights_lambda_and_sign_election():
    keep1, keep2 = draws(4, 3, 0) < 0.5, draws(4, 3, 1) < 0.5
    a, b = torch.where(keep1, V1 / 0.5, 0.0), torch.where(keep2, V2 / 0.5, 0.0)
    out = merge("dare_linear", B4, [V1, V2], [1.0, 0.5], densities=[0.5, 0.5], lam=2.0, seed=3)
    close(out, 2.0 * (a + 0.5 * b))
    elected = torch.where(a + 0.5 * b >= 0, 1.0, -1.0)
    ties = torch.where(a * elected > 0, a, 0.0) + torch.where(b * elected > 0, 0.5 * b, 0.0)
    close(merge("dare_ties", B4, [V1, V2], [1.0, 0.5], densities=[0.5, 0.5], seed=3), ties)
    divisor = (a * elected > 0).float() + 0.5 * (b * elected > 0).float()
    close(
        merge("dare_ties", B4, [V1, V2], [1.0, 0.5], densities=[0.5, 0.5], seed=3, normalize=True),
        ties / torch.where(divisor == 0, 1.0, divisor),
    )


def test_draws_are_uniform_and_independent_of_chunking_and_keys():
    u = draws(1_000_000, 0, 0)
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.002
    counts = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert float((counts / 1_000_000 - 1 / 16).abs().max()) < 0.002
    # neighbours uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.005
    tail = methods.uniform(
        torch.arange(500_000, 1_000_000), torch.tensor(methods.draw_keys(0, 0, NAME))
    )
    assert torch.equal(tail, u[500_000:])  # a position's draw does not depend on its chunk
    for other in (draws(1000, 1, 0), draws(1000, 0, 1), draws(1000, 0, 0, "x")):
        assert float((other == u[:1000]).float().mean()) < 0.01
    # the models of one tensor share the first round: their draws must still be independent
    models = torch.stack([draws(1_000_000, 0, k) for k in range(4)])
    assert float((torch.corrcoef(models) - torch.eye(4)).abs().max()) < 0.005
    keeps = (models < 0.3).float()
    both = (keeps[0] * keeps[1]).mean()
    assert abs(float(both) - 0.09) < 0.002  # P(both kept) = 0.3 * 0.3


def _reference_uniform(i: int, keys: tuple[int, int]) -> float:
    """The draw's definition on Python integers: a lowbias32 round of the position's low 32 bits
    keyed by the tensor, the high bits folded in, a second round keyed by the model, top 24 bits."""

    def mix(x: int) -> int:
        for _ in range(2):
            x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return (x >> 16) ^ x

    shared = mix((i & 0xFFFFFFFF) ^ keys[0]) ^ (i >> 32)
    return (mix(shared ^ keys[1]) >> 8) / 2**24


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_draws_equal_the_unsigned_32_bit_definition_on_any_position_and_key(device):
    # the kernel hashes on int32 lanes with wrapping products: this pins it to unsigned arithmetic,
    # eager and compiled, for positions past 2^31 and 2^32 and keys with the top bit set; 40
    # positions so that compiled code runs both its vector loop and its scalar remainder
    positions = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 12345]
    positions += [2**31 - 16 + j for j in range(31)]
    index = torch.tensor(positions, dtype=torch.int64, device=device)
    compiled = torch.compile(methods.uniform, dynamic=True)
    for keys in [
        (0, 0),
        (0xFFFFFFFF, 0x80000000),
        (0x7FFFFFFF, 0xFFFFFFFE),
        methods.draw_keys(9, 2, NAME),
    ]:
        expected = torch.tensor(
            [_reference_uniform(i, keys) for i in positions], dtype=torch.float32, device=device
        )
        k = torch.tensor(keys, device=device)
        assert torch.equal(methods.uniform(index, k), expected)
        assert torch.equal(compiled(index, k), expected)


def test_dare_keep_fraction_is_the_density():
    n = 1_000_000
    delta = torch.ones(n)
    for density in (0.1, 0.3, 0.4237, 0.75):
        out = merge(
            "dare_linear",
            torch.zeros(n),
            [delta],
            [1.0],
            densities=[density],
            rescale=False,
            seed=5,
        )
        fraction = float((out != 0).float().mean())
        assert abs(fraction - density) < 0.002, (density, fraction)


def test_dare_rescale_preserves_mean():
    n = 1_000_000
    gen = torch.Generator().manual_seed(3)
    delta = torch.rand(n, generator=gen) + 0.5  # mean 1.0, all positive
    out = merge("dare_linear", torch.zeros(n), [delta], [1.0], densities=[0.3], seed=9)
    assert abs(float(out.mean()) - float(delta.mean())) < 0.01
    dropped = merge(
        "dare_linear", torch.zeros(n), [delta], [1.0], densities=[0.3], seed=9, rescale=False
    )
    assert float(dropped.mean()) < 0.35  # without rescale the mean shrinks to ~density


def test_dare_density_one_keeps_all():
    delta = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    close(merge("dare_linear", torch.zeros(5000), [delta], [1.0], densities=[1.0]), delta)
    close(merge("dare_ties", torch.zeros(5000), [delta], [1.0], densities=[1.0]), delta)


# --- DELLA ---------------------------------------------------------------------------------------


def test_della_keep_probabilities_follow_magnitude_ranks_within_rows():
    rows, width = 2000, 50
    delta = torch.randn(rows, width, generator=torch.Generator().manual_seed(4))
    density, eps = 0.5, 0.3
    out = merge(
        "della_linear",
        torch.zeros(rows, width),
        [delta],
        [1.0],
        densities=[density],
        epsilons=[eps],
        rescale=False,
        seed=2,
    )
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1)  # 0: smallest in its row
    p = density - eps + 2 * eps * ranks.float() / (width - 1)
    kept = out != 0
    assert abs(float(kept.float().mean()) - density) < 0.01
    # the smallest kept at 0.2, the middle ~0.5, the largest at 0.8
    for rank in (0, width // 2, width - 1):
        share = float(kept[ranks == rank].float().mean())
        assert abs(share - float(p[ranks == rank][0])) < 0.04, (rank, share)
    u = draws(rows * width, 2, 0).reshape(rows, width)
    # exactly the rule: keep where the draw is below the probability
    assert torch.equal(kept, u < p)


def test_della_rescales_each_survivor_by_its_keep_probability():
    delta = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    out = merge(
        "della_linear", torch.zeros(8, 16), [delta], [1.0], densities=[0.6], epsilons=[0.2], seed=1
    )
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1).float() / 15
    p = 0.6 - 0.2 + 0.4 * ranks
    keep = draws(128, 1, 0).reshape(8, 16) < p
    close(out, torch.where(keep, delta / p, 0.0))
    # della: the same drops, then a sign election and the disjoint mean (its defaults)
    both = merge(
        "della",
        torch.zeros(8, 16),
        [delta, -delta],
        [1.0, 1.0],
        densities=[0.6, 0.6],
        epsilons=[0.2, 0.2],
        seed=1,
    )
    keep2 = draws(128, 1, 1).reshape(8, 16) < p
    a, b = torch.where(keep, delta / p, 0.0), torch.where(keep2, -delta / p, 0.0)
    elected = torch.where(a + b >= 0, 1.0, -1.0)
    mixed = torch.where(a * elected > 0, a, 0.0) + torch.where(b * elected > 0, b, 0.0)
    divisor = (a * elected > 0).float() + (b * elected > 0).float()
    close(both, mixed / torch.where(divisor == 0, 1.0, divisor))


def test_della_probabilities_are_clamped_to_0_1():
    delta = torch.randn(4, 100, generator=torch.Generator().manual_seed(6))
    out = merge(
        "della_linear",
        torch.zeros(4, 100),
        [delta],
        [1.0],
        densities=[0.9],
        epsilons=[0.3],
        rescale=False,
    )
    ranks = delta.abs().argsort(dim=1, stable=True).argsort(dim=1)
    assert bool((out[ranks >= 67] != 0).all())  # p = 0.6 + 0.6 r reaches 1 at r = 2/3: always kept


# --- Model Stock ---------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_angle_between_task_vectors():
    base = t(1, 1, 1, 1)
    d1, d2 = t(1, 0, 0, 0), t(1, 1, 0, 0)  # cos 45 degrees = 1/sqrt(2)
    cos = 1 / math.sqrt(2)
    ratio = 2 * cos / (1 + cos)
    close(merge("model_stock", base, [d1, d2], [1.0, 1.0]), base + ratio * (d1 + d2) / 2)
    # orthogonal task vectors: t = 0, the base; opposite ones (cos -1): singular, the base
    close(merge("model_stock", base, [t(1, 0, 0, 0), t(0, 1, 0, 0)], [1.0, 1.0]), base)
    close(merge("model_stock", base, [t(1, 2, 0, 0), t(-1, -2, 0, 0)], [1.0, 1.0]), base)
    # identical ones: cos 1, t = 1, the fine-tune itself
    close(merge("model_stock", base, [d2, d2, d2], [1.0] * 3), base + d2)


# --- slerp ---------------------------------------------------------------------------------------


def test_slerp_endpoints():
    a, b = t(1, 2, 3, -1), t(-2, 0.5, 1, 4)
    close(methods.slerp(a, b, 0.0), a)
    close(methods.slerp(a, b, 1.0), b)


def test_slerp_orthogonal_unit_vectors_stay_on_circle():
    a, b = t(1, 0), t(0, 1)
    half = methods.slerp(a, b, 0.5)
    close(half, [math.sqrt(0.5), math.sqrt(0.5)])
    for tt in (0.1, 0.3, 0.8):
        out = methods.slerp(a, b, tt)
        close(out, [math.cos(tt * math.pi / 2), math.sin(tt * math.pi / 2)])
        assert abs(float(out.norm()) - 1.0) < 1e-6
    # plain lerp would shrink the midpoint to norm sqrt(0.5)


def test_slerp_parallel_falls_back_to_linear():
    a = t(1, 2, 3)
    close(methods.slerp(a, 2 * a, 0.5), 1.5 * a)
    close(methods.slerp(a, 2 * a, 0.25), 1.25 * a)
    # anti-parallel is also |cos| > 0.9995: linear, midpoint 0
    close(methods.slerp(t(1, 0), t(-1, 0), 0.5), [0.0, 0.0])


def test_slerp_zero_tensor_falls_back_to_linear():
    close(methods.slerp(t(0, 0), t(2, 4), 0.5), [1.0, 2.0])


def test_slerp_over_whole_tensor_through_engine():
    # models a = [[1,0],[0,0]] and b = [[0,1],[0,0]] as a reference and a task vector
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = merge("slerp", a, [torch.zeros(2, 2), b - a], [1.0, 1.0], tt=0.5)
    close(out, [[math.sqrt(0.5), math.sqrt(0.5)], [0.0, 0.0]])
    close(merge("slerp", a, [torch.zeros(2, 2), b - a], [1.0, 1.0], tt=0.0), a)


# --- nuslerp -------------------------------------------------------------------------------------


def _slerp_closed_form(a: torch.Tensor, b: torch.Tensor, tt: float) -> torch.Tensor:
    """sin((1-t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b, theta the angle of a and
    b."""
    a64, b64 = a.double(), b.double()
    theta = math.acos(float(torch.dot(a64, b64) / (a64.norm() * b64.norm())))
    return (
        (math.sin((1 - tt) * theta) * a64 + math.sin(tt * theta) * b64) / math.sin(theta)
    ).float()


def test_nuslerp_t_comes_from_the_weights():
    assert methods.nuslerp_t(1.0, 3.0) == 0.75
    assert methods.nuslerp_t(2.0, 0.0) == 0.0
    assert methods.nuslerp_t(0.5, -0.5) == 0.5  # weights summing to ~0: the midpoint


def test_nuslerp_over_the_whole_tensor_rows_and_columns():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [4.0, 3.0]])
    tt = 0.25
    close(
        methods.nuslerp(a, b, tt),
        _slerp_closed_form(a.reshape(-1), b.reshape(-1), tt).reshape(2, 2),
    )
    rows = methods.nuslerp(a, b, tt, over="rows")
    for i in range(2):  # each row pair on its own angle: 90 degrees, then about 16
        close(rows[i], _slerp_closed_form(a[i], b[i], tt))
    columns = methods.nuslerp(a, b, tt, over="columns")
    for j in range(2):
        close(columns[:, j], _slerp_closed_form(a[:, j], b[:, j], tt))
    # the three differ: the rows' angles are not the tensor's
    assert not torch.allclose(rows, methods.nuslerp(a, b, tt)) and not torch.allclose(rows, columns)
    # a 1-D tensor is one vector whatever `over` says
    v, w = t(1, 2, 0), t(0, 1, 3)
    for over in ("rows", "columns"):
        close(methods.nuslerp(v, w, 0.6, over=over), methods.nuslerp(v, w, 0.6))


def test_nuslerp_parallel_pairs_are_linear_and_a_zero_vector_is_orthogonal():
    a = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 4.0], [-3.0, 0.0]])  # row 0 parallel, row 1 opposite
    close(methods.nuslerp(a, b, 0.25, over="rows"), 0.75 * a + 0.25 * b)
    # mergekit's convention: the zero vector's unit vector is 0, so theta = 90 degrees
    close(methods.nuslerp(t(0, 0), t(2, 4), 0.5), [math.sqrt(0.5) * 2, math.sqrt(0.5) * 4])


def test_nuslerp_through_the_engine_with_and_without_a_base():
    base = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    d0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d1 = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    # with a base: the task vectors are interpolated, at t = w2 / (w1 + w2) = 0.75
    out = merge("nuslerp", base, [d0, d1], [1.0, 3.0], with_base=True)
    close(out, base + methods.nuslerp(d0, d1, 0.75))
    close(out, base + _slerp_closed_form(d0.reshape(-1), d1.reshape(-1), 0.75).reshape(2, 2))
    rows = merge("nuslerp", base, [d0, d1], [1.0, 3.0], with_base=True, slerp_over="rows")
    close(rows, base + methods.nuslerp(d0, d1, 0.75, over="rows"))
    # without: the models themselves (the reference is the first model, its task vector 0)
    m0, m1 = base, base + d1
    close(
        merge("nuslerp", base, [torch.zeros(2, 2), d1], [1.0, 1.0], with_base=False),
        _slerp_closed_form(m0.reshape(-1), m1.reshape(-1), 0.5).reshape(2, 2),
    )
    assert not torch.allclose(out, merge("nuslerp", base, [d0, d1], [1.0, 3.0], with_base=False))


# --- per-layer values -----------------------------------------------------------------------------


def test_layer_param_constant():
    p = LayerParam.constant(0.7)
    assert p.at(0.0, "attn") == 0.7 and p.at(1.0, "other") == 0.7


def test_layer_param_interpolates_between_anchors():
    p = LayerParam(default=(0.0, 1.0))
    assert p.at(0.0, "other") == 0.0
    assert p.at(0.25, "other") == pytest.approx(0.25)
    assert p.at(1.0, "other") == 1.0
    q = LayerParam(default=(0.0, 1.0, 0.0))
    assert q.at(0.5, "mlp") == pytest.approx(1.0)
    assert q.at(0.75, "mlp") == pytest.approx(0.5)
    assert q.at(1.0, "mlp") == pytest.approx(0.0)
    r = LayerParam(default=(0.2, 0.4, 0.8, 1.0))
    assert r.at(1 / 3, "other") == pytest.approx(0.4)
    assert r.at(0.5, "other") == pytest.approx(0.6)


def test_layer_param_attn_mlp_selection():
    p = LayerParam(default=(0.5,), attn=(0.1, 0.3), mlp=(0.9,))
    assert p.at(0.5, "attn") == pytest.approx(0.2)
    assert p.at(0.5, "mlp") == 0.9
    assert p.at(0.5, "other") == 0.5
    only_attn = LayerParam(default=(0.5, 1.0), attn=(0.0,))
    assert only_attn.at(1.0, "mlp") == 1.0  # no mlp values: the default applies
    assert only_attn.at(1.0, "attn") == 0.0


# --- layer mapping --------------------------------------------------------------------------------

LLAMA_NAMES = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"] + [
    f"model.layers.{i}.{suffix}"
    for i in range(3)
    for suffix in (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    )
]
GPT2_NAMES = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.ln_f.weight",
    "transformer.ln_f.bias",
] + [
    f"transformer.h.{i}.{suffix}"
    for i in range(2)
    for suffix in (
        "ln_1.weight",
        "ln_1.bias",
        "attn.c_attn.weight",
        "attn.c_attn.bias",
        "attn.c_proj.weight",
        "ln_2.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    )
]


def test_llama_layer_map_depths():
    m = build_layer_map(LLAMA_NAMES)
    assert m.num_layers == 3
    assert m["model.embed_tokens.weight"].depth == 0.0
    assert m["model.embed_tokens.weight"].layer is None
    assert m["lm_head.weight"].depth == 1.0
    assert m["model.norm.weight"].depth == 1.0
    assert m["model.layers.0.mlp.up_proj.weight"].depth == 0.0
    assert m["model.layers.1.mlp.up_proj.weight"].depth == 0.5
    assert m["model.layers.2.self_attn.q_proj.weight"].depth == 1.0
    assert m["model.layers.1.self_attn.q_proj.weight"].layer == 1


def test_llama_layer_map_kinds():
    m = build_layer_map(LLAMA_NAMES)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert m[f"model.layers.1.self_attn.{name}.weight"].kind == "attn"
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert m[f"model.layers.1.mlp.{name}.weight"].kind == "mlp"
    for name in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        assert m[name].kind == "other"


def test_llama_norms_inside_layers_are_other_not_attn():
    # Norms belong to neither attention nor MLP (recipe.py: "'default' value for the other tensors
    # (norms, embeddings, head)"); mergekit's `filter: self_attn` does not match them either.
    m = build_layer_map(LLAMA_NAMES)
    assert m["model.layers.1.input_layernorm.weight"].kind == "other"
    assert m["model.layers.1.post_attention_layernorm.weight"].kind == "other"


def test_gpt2_layer_map():
    m = build_layer_map(GPT2_NAMES)
    assert m.num_layers == 2
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        assert (m[name].depth, m[name].kind, m[name].layer) == (0.0, "other", None)
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
        assert (m[name].depth, m[name].kind) == (1.0, "other")
    assert (
        m["transformer.h.0.attn.c_attn.weight"].depth,
        m["transformer.h.0.attn.c_attn.weight"].kind,
    ) == (0.0, "attn")
    assert (
        m["transformer.h.1.mlp.c_fc.weight"].depth,
        m["transformer.h.1.mlp.c_fc.weight"].kind,
    ) == (1.0, "mlp")
    assert m["transformer.h.1.mlp.c_proj.weight"].kind == "mlp"
    assert m["transformer.h.1.attn.c_proj.weight"].kind == "attn"
    assert m["transformer.h.1.ln_1.weight"].kind == "other"


def test_unmappable_names_are_an_error_naming_them():
    with pytest.raises(MergeError) as err:
        build_layer_map(["model.layers.0.mlp.up_proj.weight", "vision_tower.patch_conv.weight"])
    msg = str(err.value)
    assert "cannot place 1 tensor" in msg
    assert "vision_tower.patch_conv.weight" in msg
    assert "merging/layers.py" in msg


def test_no_layer_tensors_is_an_error():
    with pytest.raises(MergeError, match="no layer-indexed tensors"):
        build_layer_map(["model.embed_tokens.weight", "lm_head.weight"])


def test_overflow_in_the_cast_to_float16_is_caught():
    # finite in float32, inf once written into a float16 model: the candidate must fail
    from merging.engine import NonFiniteMergeError, TensorInputs, TensorScalars, merge_tensor
    from merging.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {"method": "task_arithmetic", "base": "b", "models": [{"path": "m", "weight": 1.0}]}
    )
    scalars = TensorScalars(weights=(1.0,), densities=(1.0,), lam=1.0, t=0.5)
    inputs = TensorInputs(base=torch.zeros(4), deltas=[torch.full((4,), 1.0e5)])
    merge_tensor(recipe, "x", scalars, inputs, torch.empty(4))  # float32 holds 1e5
    with pytest.raises(NonFiniteMergeError, match="'x'"):
        merge_tensor(recipe, "x", scalars, inputs, torch.empty(4, dtype=torch.float16))


def test_all_finite_sees_nan_and_inf_and_survives_a_sum_that_overflows():
    big = torch.full((8,), 3e38)  # finite entries whose float32 sum overflows to inf
    assert methods.all_finite(big)
    assert methods.all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.ones(1000)
        t[417] = bad
        assert not methods.all_finite(t)
    both = torch.tensor([1.0, float("inf"), float("-inf")])  # their sum is NaN, not inf
    assert not methods.all_finite(both)
    # float16 sum overflows too
    assert methods.all_finite(torch.full((4,), 6e4, dtype=torch.float16))
