"""Quantizers: bit widths, nearest-level search, the int8 grid, uniform, Lloyd-Max (against exact DP), MRACos."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from sub8.quant import (
    FixedLevels,
    LloydMaxQuantizer,
    UniformQuantizer,
    check_bits,
    dequantize,
    int8_levels,
    linear_ramp,
    lloyd_max_levels,
    mracos,
    mracos_sum,
    nearest_level,
    snap_to_int8_grid,
)
from sub8.quant import kernels
from sub8.quant.lloyd_max import SortedWeights, lloyd
from sub8.quant.mu_law import mu_law_compress, mu_law_expand, mu_law_levels


@pytest.mark.parametrize("bits", [0, 9, 2.5, "4", True, -1])
def test_check_bits_rejects_bad_widths(bits):
    with pytest.raises(ValueError, match=repr(bits).replace(".", r"\.")):
        check_bits(bits)


def test_check_bits_accepts_1_to_8():
    assert [check_bits(b) for b in range(1, 9)] == list(range(1, 9))


def test_nearest_level_matches_brute_force_per_tensor_and_per_channel():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, 3, generator=gen)
    levels = torch.sort(torch.randn(8, generator=gen)).values
    brute = (w[..., None] - levels).abs().argmin(-1)
    assert torch.equal(nearest_level(w, levels), brute)
    row_levels = torch.sort(torch.randn(5, 8, generator=gen), dim=1).values
    brute_rows = (w[..., None] - row_levels[:, None, None, :]).abs().argmin(-1)
    codes = nearest_level(w, row_levels)
    assert torch.equal(codes, brute_rows)
    expected = torch.gather(row_levels, 1, brute_rows.reshape(5, -1)).reshape(w.shape)
    assert torch.equal(dequantize(codes, row_levels), expected)


def test_snap_to_int8_grid_keeps_levels_within_half_a_step():
    levels = torch.tensor([-0.31, -0.02, 0.0, 0.011, 0.5])
    lut, scale = snap_to_int8_grid(levels)
    assert lut.dtype == torch.int8 and int(lut.abs().max()) == 127
    assert torch.allclose(scale, torch.tensor(0.5 / 127))
    assert (int8_levels(lut, scale) - levels).abs().max() <= scale / 2 + 1e-7
    rows = torch.stack([levels, 2 * levels])
    lut_rows, scales = snap_to_int8_grid(rows)
    assert lut_rows.shape == (2, 5) and scales.shape == (2,) and torch.equal(lut_rows[0], lut_rows[1])


@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_levels_scale_and_straight_through_gradient(per_channel):
    w = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    quantizer = UniformQuantizer(4, per_channel=per_channel)
    scale = quantizer.scale(w)
    absmax = w.detach().abs().amax(dim=1) if per_channel else w.detach().abs().amax()
    assert torch.allclose(scale, absmax / 7)
    out = quantizer.fake_quantize(w)
    s = scale[:, None] if per_channel else scale
    assert torch.allclose(out, torch.clamp(torch.round(w.detach() / s), -7, 7) * s)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    codes, lut, scale8 = quantizer.quantize_int8(w)
    assert lut.dtype == torch.int8 and lut.numel() == 15 and codes.max() <= 14
    assert torch.allclose(dequantize(codes, int8_levels(lut, scale8)), out.detach())


def test_uniform_refuses_one_bit():
    with pytest.raises(ValueError, match="at least 2 bits"):
        UniformQuantizer(1)


def optimal_distortion(x: np.ndarray, k: int) -> float:
    """Least mean squared error of any k-level quantizer of the samples x: optimal 1-D clusters are contiguous in
    sorted order, so D[m][j] = min_i D[m-1][i] + SSE(x[i:j]) over the sorted samples (exact dynamic programming)."""
    x = np.sort(x.astype(np.float64))
    n = len(x)
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    count = np.maximum(j - i, 1)
    sse = np.where(j > i, (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / count, np.inf)
    best = sse[0]
    for _ in range(k - 1):
        best = np.min(best[:, None] + sse, axis=0)
    return best[n] / n


def sample(kind: str, n: int = 3000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if kind == "gaussian":
        return torch.randn(n, generator=gen)
    if kind == "laplacian":
        return _laplace(n, gen)
    # trained-like: a sharp peak at zero with heavy, slightly asymmetric tails (a Student-t-like mixture)
    narrow = 0.02 * torch.randn(n // 2, generator=gen)
    wide = 0.1 * torch.randn(n - n // 2, generator=gen) / torch.rand(n - n // 2, generator=gen).clamp_min(0.2) + 0.01
    return torch.cat([narrow, wide])


def _laplace(n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


@pytest.mark.parametrize("kind", ["gaussian", "laplacian", "trained"])
def test_lloyd_max_distortion_within_one_percent_of_optimal(kind):
    w = sample(kind)
    for k in (2, 4, 8, 16):
        levels = lloyd_max_levels(w, k)
        assert levels.shape == (k,) and torch.all(levels[1:] >= levels[:-1])
        distortion = float(((w - dequantize(nearest_level(w, levels), levels)) ** 2).mean())
        assert distortion <= 1.01 * optimal_distortion(w.numpy(), k), (kind, k)


def test_lloyd_max_reseeds_empty_cells_and_handles_few_distinct_values():
    # 97% of the weights are 0: the quantile initialisation puts most levels on 0, so cells empty out.
    w = torch.cat([torch.zeros(970), torch.linspace(1.0, 3.0, 30)])
    levels = lloyd_max_levels(w, 8)
    assert torch.isfinite(levels).all() and levels.unique().numel() == 8
    assert float(levels.max()) > 2.0  # the tail got levels of its own
    two_values = torch.tensor([0.0, 1.0]).repeat(50)
    levels = LloydMaxQuantizer(3).levels(two_values)
    assert torch.isfinite(levels).all() and set(levels.unique().tolist()) == {0.0, 1.0}


def test_sorted_weights_are_the_float64_sort_of_any_float_precision():
    # narrower floats sort before widening; with zeros, whose signs each sort chooses, as a float64 sort gives them
    gen = torch.Generator().manual_seed(4)
    signed_zeros = torch.round(torch.randn(5000, generator=gen) * 4) / 4  # many 0.0 and -0.0
    assert torch.signbit(signed_zeros[signed_zeros == 0]).unique().numel() == 2
    for w in (sample("trained"), signed_zeros, signed_zeros.abs(), signed_zeros.half(), signed_zeros.bfloat16()):
        x = np.sort(w.double().numpy())
        prefix = np.stack([np.concatenate([[0.0], np.cumsum(x)]), np.arange(x.size + 1.0),
                           np.concatenate([[0.0], np.cumsum(x * x)])], axis=1)
        sw = SortedWeights.of(w)
        for got, want in ((sw.x, x), (sw.prefix, prefix)):
            assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))


def test_lloyd_returns_the_distortion_of_its_levels():
    # lloyd's distortion comes from its last iteration's cells, computed in place; also with cells re-seeded
    w = sample("trained")
    mostly_zero = torch.cat([torch.zeros(970), torch.linspace(1.0, 3.0, 30)])
    for v, k in ((w, 2), (w, 16), (mostly_zero, 8)):
        sw, x = SortedWeights.of(v), v.double().numpy()
        levels, distortion = lloyd(sw, sw.quantiles((np.arange(k) + 0.5) / k), max_iter=100, tol=1e-6)
        direct = ((x - levels[np.abs(x[:, None] - levels).argmin(1)]) ** 2).sum()
        assert np.all(levels[1:] >= levels[:-1]) and distortion == pytest.approx(direct, rel=1e-9, abs=1e-12)


def test_fixed_levels_keeps_its_int8_grid():
    lut = torch.tensor([-127, -3, 5, 90], dtype=torch.int8)
    quantizer = FixedLevels(2, lut, torch.tensor(0.01))
    w = torch.randn(10, 3)
    codes, lut_out, scale = quantizer.quantize_int8(w)
    assert torch.equal(lut_out, lut) and float(scale) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="int8 LUT"):
        FixedLevels(1, lut, torch.tensor(0.01))


LEVELS = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0])


def test_mracos_zero_on_levels_one_at_midpoints():
    assert torch.equal(mracos(LEVELS, LEVELS), torch.zeros(5))
    midpoints = (LEVELS[1:] + LEVELS[:-1]) / 2
    assert torch.allclose(mracos(midpoints, LEVELS), torch.ones(4))
    grid = torch.linspace(-1.0, 2.0, 3001)
    assert float(mracos(grid, LEVELS).max()) <= 1.0 + 1e-6


def test_mracos_outside_is_a_continuous_linear_pull():
    r = mracos(torch.tensor([-1.0 - 1e-6, -1.375, 2.0 + 1e-6, 2.75]), LEVELS)
    assert r[0] < 1e-4 and r[2] < 1e-4  # continuous at the end levels
    assert torch.allclose(r[[1, 3]], torch.ones(2))  # half an end cell outside: R = 1


def test_mracos_gradient_points_to_the_nearest_level():
    grid = torch.linspace(-2.0, 3.0, 5001, dtype=torch.float64)
    nearest = LEVELS.double()[nearest_level(grid, LEVELS.double())]
    away = grid - nearest
    keep = away.abs() > 1e-9  # on a level and at midpoints the (sub)gradient is 0
    midpoints = (LEVELS[1:] + LEVELS[:-1]).double() / 2
    keep &= (grid[:, None] - midpoints).abs().min(1).values > 1e-9
    w = grid.clone().requires_grad_()
    mracos(w, LEVELS.double()).sum().backward()
    # gradient descent moves w by -grad: towards the nearest level means grad has the sign of (w - nearest)
    assert torch.equal(torch.sign(w.grad[keep]), torch.sign(away[keep]))


def test_mracos_sum_on_the_int8_grid_matches_mracos_and_its_gradient():
    lut = torch.tensor([-127, -40, -3, 0, 3, 3, 51, 100], dtype=torch.int8)  # a merged level included
    scale = torch.tensor(0.01)
    w = torch.linspace(-1.6, 1.4, 2001, dtype=torch.float32).requires_grad_()
    expected = mracos(w, torch.unique(lut).float() * scale).sum()
    expected.backward()
    grad, w.grad = w.grad.clone(), None
    got = mracos_sum(w, lut, scale)
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-4)
    # On a midpoint (R's maximum) any value in [-π/Δ, π/Δ] is a subgradient: mracos gives the sign of a rounded
    # cos(π/2), mracos_sum 0.
    levels = torch.unique(lut).float() * scale
    off_midpoints = (w.detach()[:, None] - (levels[1:] + levels[:-1]) / 2).abs().min(1).values > 1e-6
    assert off_midpoints.sum() >= 1990
    assert torch.allclose(w.grad[off_midpoints], grad[off_midpoints], rtol=1e-3, atol=1e-2)


def test_mracos_torch_version_gives_every_weight_the_same_gradient_whatever_the_chunking():
    module = importlib.import_module("sub8.quant.mracos")
    torch.manual_seed(0)
    w = torch.randn(3000) * 0.4
    cells = module._Int8GridCells(torch.tensor([-127, -60, -9, 0, 20, 77, 127], dtype=torch.int8), 0.006, w.device)
    grad, total = module._gradient_by_torch(w, cells, 1 << 16)
    chunked_grad, chunked_total = module._gradient_by_torch(w, cells, 256)  # 12 chunks, the last one short
    assert torch.equal(chunked_grad, grad)
    assert torch.allclose(chunked_total, total, rtol=1e-6)


def test_mracos_kernel_and_torch_versions_agree_with_the_exact_regularizer(monkeypatch):
    """The C kernel (the CPU path) and the PyTorch ops (the CUDA path) against R and dR/dw in float64, on weights
    inside, outside and on the levels of a grid with unequal cells; both to float rounding."""
    lut, scale = torch.tensor([-127, -60, -9, 0, 20, 77, 127], dtype=torch.int8), torch.tensor(0.006)
    torch.manual_seed(1)
    # Interior levels (R's gradient is 0 there) but not the end levels: R has a kink there, where float rounding
    # of w / scale picks either side.
    interior = torch.unique(lut).float()[1:-1] * scale
    w = torch.cat([torch.randn(20000) * 0.3, interior, torch.tensor([-2.0, 2.0])])
    exact = w.double().requires_grad_()
    r = mracos(exact, torch.unique(lut).double() * scale.double())
    r.sum().backward()
    for use_kernel in (True, False):
        monkeypatch.setattr(kernels, "usable", lambda *tensors, use=use_kernel: use)
        x = w.clone().requires_grad_()
        total = mracos_sum(x, lut, scale)
        total.backward()
        assert float(total.detach()) == pytest.approx(float(r.sum().detach()), rel=1e-5)
        # dR/dw reaches π/Δ (~500 here): float rounding of w/scale moves u by ~1e-7, the gradient by ~1e-4
        torch.testing.assert_close(x.grad.double(), exact.grad, rtol=1e-5, atol=2e-3)


def test_kernels_give_the_same_numbers_at_any_thread_count(monkeypatch):
    """Determinism: 1 and 3 PyTorch threads give the same bits, for MRACos and for GQ's forward and backward
    (values, weight, scale and level gradients), with the kernels' per-block sums over several blocks."""
    from sub8.quant.gq import GQQuantizer

    monkeypatch.setattr(kernels, "BLOCK", 1024)  # 11 blocks, the last one short
    torch.manual_seed(2)
    w = torch.randn(10_500) * 0.3
    lut, scale = torch.tensor([-127, -60, -9, 0, 20, 77, 127], dtype=torch.int8), torch.tensor(0.006)
    quantizer = GQQuantizer.fit(w, 4)

    def run():
        x = w.clone().requires_grad_()
        total = mracos_sum(x, lut, scale)
        (grad_r,) = torch.autograd.grad(total, x)
        soft = quantizer.soft_quantize(x, alpha_hat=2.0, hard=False)
        return (total, grad_r, soft, *torch.autograd.grad(soft.square().sum(), (x, quantizer.log_scale, quantizer.u)))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(3)
        three = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


def test_mracos_kernel_stays_in_its_tables_for_non_finite_weights():
    """A NaN or infinite weight must not read outside the kernel's 256-entry tables; the NaN reaches the loss (which
    the training loop refuses), an infinite weight is pulled back to the end level."""
    w = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, 0.5]).requires_grad_()
    total = mracos_sum(w, torch.tensor([-100, 0, 100], dtype=torch.int8), torch.tensor(0.01))
    total.backward()
    assert total.isnan()
    assert torch.equal(w.grad[1:4].sign(), torch.tensor([1.0, -1.0, 1.0]))


def test_mracos_sum_refuses_a_second_backward_through_one_graph():
    w = torch.linspace(-1, 1, 101).requires_grad_()
    total = mracos_sum(w, torch.tensor([-100, 0, 100], dtype=torch.int8), torch.tensor(0.01))
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


def test_linear_ramp():
    assert [linear_ramp(s, 2.0, 4) for s in (1, 2, 4, 9)] == [0.5, 1.0, 2.0, 2.0]
    assert linear_ramp(1, 2.0, 0) == 2.0
    assert math.isclose(linear_ramp(3, 1.0, 10), 0.3)


def test_mu_law_expand_inverts_compress_and_levels_are_sorted_and_symmetric():
    x = torch.linspace(-1, 1, 101)
    assert torch.allclose(mu_law_compress(mu_law_expand(x, 255.0), 255.0), x, atol=1e-6)
    for bits in range(1, 9):
        levels = mu_law_levels(bits, 0.5, 255.0)
        assert levels.numel() == 2**bits and bool((levels[1:] > levels[:-1]).all())
        assert torch.allclose(levels, -levels.flip(0)) and levels[-1] == 0.5
    with pytest.raises(ValueError, match="bit width"):
        mu_law_levels(9, 1.0, 255.0)
