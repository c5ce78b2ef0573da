"""Integer kernels: bit-exact against ONNX Runtime (CPU) and against exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from onnx import TensorProto

from sub8.emulator import kernels as K
from sub8.emulator.reference import run_onnx_node


def rand_int8(rng: np.random.Generator, shape: tuple[int, ...], dtype=np.int8) -> np.ndarray:
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    return rng.integers(lo, hi + 1, shape).astype(dtype)


@pytest.mark.parametrize("a_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("batch, m, k, n", [((), 1, 1, 1), ((), 3, 7, 5), ((), 16, 64, 33), ((2, 4), 96, 17, 9)])
def test_matmul_integer_matches_ort(batch, m, k, n, a_dtype):
    rng = np.random.default_rng(m * k + n)
    a = rand_int8(rng, (*batch, m, k), a_dtype)
    # ORT's u8×s8 kernel on AVX2 without VNNI (vpmaddubsw) saturates pairwise sums at int16, so it is exact only
    # for 7-bit weights (ORT's own "reduce_range" advice); with full-range s8 weights ORT is off there, not we.
    b = rand_int8(rng, (k, n)) if a_dtype == np.int8 else rng.integers(-64, 64, (k, n)).astype(np.int8)
    az = np.array(int(rng.integers(-5, 5)) + (128 if a_dtype == np.uint8 else 0), a_dtype)
    bz = np.array(-3, np.int8)
    expected = run_onnx_node("MatMulInteger", {"a": a, "b": b, "az": az, "bz": bz}, TensorProto.INT32)
    got = K.matmul_integer(a, b, int(az), int(bz))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected)


def test_matmul_integer_bias_and_per_column_zero_point():
    rng = np.random.default_rng(1)
    a, b = rand_int8(rng, (4, 9)), rand_int8(rng, (9, 6))
    bz = rng.integers(-4, 4, 6).astype(np.int8)
    expected = run_onnx_node("MatMulInteger", {"a": a, "b": b, "az": np.array(2, np.int8), "bz": bz}, TensorProto.INT32)
    np.testing.assert_array_equal(K.matmul_integer(a, b, 2, bz), expected)
    bias = rng.integers(-1000, 1000, 6).astype(np.int32)
    exact = (a.astype(np.int64) - 2) @ (b.astype(np.int64) - bz) + bias
    np.testing.assert_array_equal(K.matmul_integer(a, b, 2, bz, bias), exact)


@pytest.mark.parametrize(
    "x_shape, w_shape, pads, strides, group",
    [
        ((2, 6, 11), (6, 1, 5), [4, 0], [1], 6),  # Conformer depthwise Conv1d, causal left padding
        ((2, 6, 11), (9, 6, 1), [0, 0], [1], 1),  # pointwise Conv1d
        ((1, 6, 12), (4, 3, 3), [1, 1], [2], 2),  # grouped, strided
        ((2, 1, 13, 20), (5, 1, 3, 3), [1, 0, 0, 0], [2, 2], 1),  # subsampling Conv2d: time left pad, stride 2
        ((1, 5, 9, 9), (5, 5, 3, 3), [1, 0, 0, 0], [2, 2], 1),  # second subsampling Conv2d
    ],
)
def test_conv_integer_matches_ort(x_shape, w_shape, pads, strides, group):
    rng = np.random.default_rng(len(x_shape) * 100 + group)
    x, w = rand_int8(rng, x_shape, np.uint8), rand_int8(rng, w_shape)
    xz, wz = np.array(131, np.uint8), np.array(2, np.int8)  # x_zp ≠ 0 checks padding is by the zero point
    expected = run_onnx_node("ConvInteger", {"x": x, "w": w, "xz": xz, "wz": wz}, TensorProto.INT32,
                        pads=pads, strides=strides, group=group)
    spatial = len(x_shape) - 2
    padding = list(zip(pads[:spatial], pads[spatial:]))
    got = K.conv_integer(x, w, int(xz), int(wz), stride=strides, padding=padding, groups=group)
    np.testing.assert_array_equal(got, expected)


def test_conv_integer_bias_and_errors():
    rng = np.random.default_rng(2)
    x, w = rand_int8(rng, (1, 4, 6)), rand_int8(rng, (2, 4, 1))
    bias = np.array([5, -7], np.int32)
    difference = K.conv_integer(x, w, bias=bias) - K.conv_integer(x, w)
    np.testing.assert_array_equal(difference, np.broadcast_to(bias[:, None], (1, 2, 6)))
    with pytest.raises(ValueError, match="groups=3"):
        K.conv_integer(x, w, groups=3)


def exact_round(value: Fraction, rounding: str) -> int:
    floor = value.numerator // value.denominator
    rest = value - floor
    if rest == Fraction(1, 2):
        return floor + (floor & 1 if rounding == "half_to_even" else int(value > 0))
    return floor + int(rest > Fraction(1, 2))


@pytest.mark.parametrize("rounding", K.ROUNDING_RULES)
def test_fixed_point_requantize_equals_exact_rational(rounding):
    rng = np.random.default_rng(3)
    reals = np.concatenate([rng.uniform(1e-6, 0.999, 40), [0.5, 0.25, 2.0**-20, 1.5, 3.0]])
    m, shift = K.quantize_multiplier(reals)
    assert np.all((m >= 2**30) & (m < 2**31))
    # Includes ties: odd accumulators times 0.5 and multiples of 2 times 0.25 sit exactly on k + 0.5.
    acc = np.concatenate([rng.integers(-2**31, 2**31, 40), [-5, -3, -1, 1, 3, 5, 6, -6, 2**31 - 1, -2**31]])
    got = K.multiply_by_quantized_multiplier(acc[:, None], m[None, :], shift[None, :], rounding)
    for i, a in enumerate(acc.tolist()):
        for j, (mj, sj) in enumerate(zip(m.tolist(), shift.tolist())):
            assert got[i, j] == exact_round(Fraction(a * mj, 2 ** (31 - sj)), rounding)


def test_rounding_rules_differ_exactly_on_negative_ties():
    acc = np.array([-5, -3, -1, 1, 3, 5, -4, 4])
    m, shift = K.quantize_multiplier(0.5)
    even = K.multiply_by_quantized_multiplier(acc, m, shift, "half_to_even")
    away = K.multiply_by_quantized_multiplier(acc, m, shift, "half_away_from_zero")
    np.testing.assert_array_equal(even, [-2, -2, 0, 0, 2, 2, -2, 2])
    np.testing.assert_array_equal(away, [-3, -2, -1, 1, 2, 3, -2, 2])
    with pytest.raises(ValueError, match="unknown rounding"):
        K.multiply_by_quantized_multiplier(acc, m, shift, "half_up")


def test_quantize_multiplier_accuracy_and_range():
    reals = np.geomspace(2.0**-32, 2.0**29, 200)
    m, shift = K.quantize_multiplier(reals)
    approx = m * np.exp2(shift.astype(np.float64) - 31)
    assert np.all(np.abs(approx - reals) <= reals * 2.0**-31)
    for bad in (0.0, -1.0, 2.0**31, 2.0**-40):
        with pytest.raises(ValueError):
            K.quantize_multiplier(bad)


@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_requantize_saturates(dtype):
    lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
    m, shift = K.quantize_multiplier(0.75)
    acc = np.array([-(2**31), -1_000_000, 0, 1_000_000, 2**31 - 1])
    out = K.requantize(acc, m, shift, zero_point=3, rounding="half_to_even", dtype=dtype)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out[[0, 1, 3, 4]], [lo, lo, hi, hi])
    assert out[2] == 3


def qlinear_inputs(rng, m, k, n, scales):
    a_scale, b_scale, y_scale = scales
    return {
        "a": rand_int8(rng, (m, k)), "a_scale": np.array(a_scale, np.float32), "a_zp": np.array(1, np.int8),
        "b": rand_int8(rng, (k, n)), "b_scale": np.asarray(b_scale, np.float32),
        "b_zp": np.zeros(np.shape(b_scale), np.int8),
        "y_scale": np.array(y_scale, np.float32), "y_zp": np.array(-2, np.int8),
    }


@pytest.mark.parametrize(
    "m, k, n, scales",
    [
        (5, 8, 3, (0.02, 0.01, 0.05)),  # random rounding
        (9, 64, 17, (0.05, 0.02, 0.5)),  # wide accumulators
        (6, 32, 10, (1.0, 0.5, 1.0)),  # scale 0.5: every odd accumulator is a tie k + 0.5
        (4, 16, 8, (0.1, 0.1, 0.001)),  # heavy saturation at −128 / 127
        (7, 12, 5, (0.03, [0.01, 0.02, 0.5, 0.25, 0.003], 0.04)),  # per-column b scale
    ],
)
def test_qlinear_matmul_matches_ort(m, k, n, scales):
    rng = np.random.default_rng(m * k * n)
    inputs = qlinear_inputs(rng, m, k, n, scales)
    expected = run_onnx_node("QLinearMatMul", inputs, TensorProto.INT8)
    got = K.qlinear_matmul(
        inputs["a"], float(inputs["a_scale"]), int(inputs["a_zp"]), inputs["b"], inputs["b_scale"], 0,
        float(inputs["y_scale"]), int(inputs["y_zp"]),
    )
    np.testing.assert_array_equal(got, expected)
    if scales == (0.1, 0.1, 0.001):
        assert (expected == -128).any() and (expected == 127).any()


def test_qlinear_matmul_matches_ort_beyond_float32_integers():
    """|acc| > 2^24: ORT's int32 → float32 conversion rounds the accumulator itself; the emulator must too."""
    rng = np.random.default_rng(6)
    inputs = qlinear_inputs(rng, 4, 1100, 6, (0.01, 0.01, 30.0))
    inputs["a"] = np.where(rng.random((4, 1100)) < 0.97, -128, inputs["a"]).astype(np.int8)
    inputs["b"] = np.where(rng.random((1100, 6)) < 0.97, -128, inputs["b"]).astype(np.int8)
    acc = K.matmul_integer(inputs["a"], inputs["b"], 1, 0)
    assert (np.abs(acc) > 2**24).all() and (acc.astype(np.float32).astype(np.int64) != acc).any()
    expected = run_onnx_node("QLinearMatMul", inputs, TensorProto.INT8)
    got = K.qlinear_matmul(inputs["a"], 0.01, 1, inputs["b"], inputs["b_scale"], 0, 30.0, -2)
    np.testing.assert_array_equal(got, expected)
    assert (np.abs(expected.astype(int)) < 127).all()  # not merely saturated


def test_qlinear_matmul_ties_round_half_to_even_like_fixed_point():
    """With scale 0.5 ORT's float path and the fixed-point half_to_even path agree; half_away_from_zero does not."""
    rng = np.random.default_rng(4)
    inputs = qlinear_inputs(rng, 8, 3, 8, (1.0, 0.5, 1.0))
    inputs["a"] = rng.integers(-20, 20, (8, 3)).astype(np.int8)
    inputs["b"] = rng.integers(-20, 20, (3, 8)).astype(np.int8)
    expected = run_onnx_node("QLinearMatMul", inputs, TensorProto.INT8)
    acc = K.matmul_integer(inputs["a"], inputs["b"], 1, 0)
    assert (acc % 2 == 1).sum() > 10  # many ties
    m, shift = K.quantize_multiplier(0.5)
    np.testing.assert_array_equal(K.requantize(acc, m, shift, -2, "half_to_even"), expected)
    assert (K.requantize(acc, m, shift, -2, "half_away_from_zero") != expected).any()


def test_accumulator_guard():
    assert K.accumulator_bound(33_025) <= K.INT32_MAX < K.accumulator_bound(33_026)
    K.check_accumulator(33_025)
    with pytest.raises(OverflowError, match="depth 33026"):
        K.check_accumulator(33_026)
    with pytest.raises(OverflowError):
        K.matmul_integer(np.zeros((1, 40_000), np.int8), np.zeros((40_000, 1), np.int8))


@pytest.mark.parametrize("table, fn, max_error", [
    (K.SIGMOID, lambda x: 1.0 / (1.0 + np.exp(-x)), 2.0**-14),
    (K.TANH, np.tanh, 2.0**-13),
])
def test_activation_tables_over_every_int16_input(table, fn, max_error):
    x = np.arange(-(2**15), 2**15).astype(np.int16)  # every Q3.12 input
    y = table(x)
    assert y.dtype == np.int16 and table.table.shape == (513,)
    assert np.abs(y / 2.0**15 - fn(x / 2.0**12)).max() <= max_error
    assert np.all(np.diff(y.astype(np.int32)) >= 0)  # monotone, as the functions are


def float_lstm_cell():
    import torch

    torch.manual_seed(0)
    return torch.nn.LSTMCell(10, 16).double()


@pytest.mark.parametrize("rounding", K.ROUNDING_RULES)
def test_integer_lstm_cell_tracks_float_lstm(rounding):
    import torch

    cell = float_lstm_cell()
    weights = [p.detach().numpy() for p in (cell.weight_ih, cell.weight_hh, cell.bias_ih + cell.bias_hh)]
    x_scale, h_scale = 1 / 127, 1 / 128
    qcell = K.IntegerLSTMCell.from_float(*weights, x_scale, 0, h_scale, 0, rounding)
    rng = np.random.default_rng(5)
    h, c = np.zeros((3, 16), np.int8), np.zeros((3, 16), np.int16)
    h_ref = c_ref = torch.zeros(3, 16, dtype=torch.float64)
    for _ in range(40):
        x = K.saturate(np.rint(rng.uniform(-1, 1, (3, 10)) / x_scale), np.int8)
        h, c = qcell(x, h, c)
        h_ref, c_ref = cell(torch.from_numpy(x * x_scale), (h_ref, c_ref))
        assert h.dtype == np.int8 and c.dtype == np.int16
        # Within one int8 step of the float cell fed the same quantized inputs, after 40 recurrent steps.
        assert np.abs(h * h_scale - h_ref.detach().numpy()).max() <= h_scale
        assert np.abs(c * 2.0**-K.CELL_FRAC_BITS - c_ref.detach().numpy()).max() <= 0.01


def test_integer_lstm_cell_saturates_cell_state():
    cell = float_lstm_cell()
    w_ih, w_hh = np.zeros_like(cell.weight_ih.detach().numpy()), np.zeros_like(cell.weight_hh.detach().numpy())
    # All gates saturated open (pre-activation 8): c grows by ~1 per step and must clip at int16's 16 − 2^-11.
    qcell = K.IntegerLSTMCell.from_float(w_ih, w_hh, np.full(64, 8.0), 1 / 127, 0, 1 / 128, 0)
    h, c = np.zeros((1, 16), np.int8), np.zeros((1, 16), np.int16)
    for _ in range(20):
        h, c = qcell(np.zeros((1, 10), np.int8), h, c)
    assert (c == np.iinfo(np.int16).max).all() and (h == 127).all()


def test_sigmoid_gate_is_glu_and_silu():
    rng = np.random.default_rng(8)
    x, gate = (rng.integers(-(2**15), 2**15, 5000).astype(np.int16) for _ in range(2))
    unit = 2.0**-K.GATE_FRAC_BITS
    glu = K.sigmoid_gate(x, gate)
    silu = K.sigmoid_gate(x, x)
    assert glu.dtype == silu.dtype == np.int16
    # Error: table error (≤ 2^-14) times |x| ≤ 8, plus half an output step.
    bound = 8 * 2.0**-14 + unit / 2
    assert np.abs(glu * unit - x * unit / (1 + np.exp(-gate * unit))).max() <= bound
    assert np.abs(silu * unit - x * unit / (1 + np.exp(-x * unit))).max() <= bound


def test_integer_sqrt_is_exact():
    import math

    values = np.concatenate([np.arange(0, 2000), [2**62, 2**62 - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1],
                             np.random.default_rng(9).integers(0, 2**62, 2000)])
    np.testing.assert_array_equal(K.integer_sqrt(values), [math.isqrt(int(v)) for v in values])


@pytest.mark.parametrize("rounding", K.ROUNDING_RULES)
def test_integer_layer_norm_within_one_step_of_float(rounding):
    import torch

    torch.manual_seed(0)
    dim, x_scale, y_scale = 256, 0.05, 0.03
    norm = torch.nn.LayerNorm(dim).double()
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
        norm.bias.uniform_(-0.3, 0.3)
    gamma, beta = norm.weight.detach().numpy(), norm.bias.detach().numpy()
    qnorm = K.IntegerLayerNorm.from_float(gamma, beta, norm.eps, x_scale, 3, y_scale, -1, rounding)
    x = np.random.default_rng(10).integers(-128, 128, (6, dim)).astype(np.int8)
    x[1] //= 16  # small variance
    x[2] = 7  # constant row: zero variance, output is beta
    x[3] = 0
    x[3, 0] = 1  # one outlier
    reference = norm(torch.from_numpy((x.astype(np.float64) - 3) * x_scale)).detach().numpy()
    expected = np.clip(np.rint(reference / y_scale) - 1, -128, 127)
    got = qnorm(x)
    assert got.dtype == np.int8
    assert np.abs(got - expected).max() <= 1
    np.testing.assert_array_equal(got[2], np.clip(np.rint(beta / y_scale) - 1, -128, 127))


@pytest.mark.parametrize("rounding", K.ROUNDING_RULES)
def test_integer_softmax_tracks_float_softmax_under_a_mask(rounding):
    x_scale = 0.08
    softmax = K.IntegerSoftmax.from_scale(x_scale, rounding)
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, (4, 7, 30)).astype(np.int8)
    mask = np.tril(np.ones((7, 30), bool), k=20)[None]  # causal-like, every row keeps ≥ 21 keys
    p = softmax(x, mask)
    scores = np.where(mask, x * x_scale, -np.inf)
    reference = np.exp(scores - scores.max(-1, keepdims=True))
    reference /= reference.sum(-1, keepdims=True)
    assert p.dtype == np.uint8 and (p[~np.broadcast_to(mask, p.shape)] == 0).all()
    assert np.abs(p / 2.0**K.PROB_FRAC_BITS - reference).max() <= 2.0**-K.PROB_FRAC_BITS
    one_hot = softmax(np.array([[127, -128, -128]], np.int8))
    assert one_hot.tolist() == [[255, 0, 0]]  # probability 1 saturates to 255/256
    assert (softmax(x, np.zeros(x.shape, bool)) == 0).all()
