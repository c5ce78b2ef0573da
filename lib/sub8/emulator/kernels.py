"""Integer kernels of the int8 accelerator: matmul, conv, requantization, saturation, and the nonlinear layers of
the two encoders in integer form (LSTM cell, sigmoid/tanh/GLU/SiLU, LayerNorm, masked softmax).

Tensors are **numpy** integer arrays: fixed-width int8/int16/int32/int64 dtypes with vectorised shifts, the types
ONNX Runtime (the reference) takes and returns and the packing works in bytes of, and no autograd to switch off.

Where float appears in the integer path, and why it is exact
-------------------------------------------------------------
* Matmul and conv accumulate in **float64 BLAS**: every operand is an integer of at most 9 bits after the zero
  point is subtracted, every product and every partial sum is an integer whose magnitude is bounded by
  :func:`accumulator_bound`, which is asserted to fit int32 (< 2^31) before the product runs. float64 represents
  every integer below 2^53 exactly and adds integers below 2^53 exactly, so the result equals the int32 sum
  bit for bit whatever the summation order. (numpy's integer matmul does not use BLAS.)
* :func:`requantize_ort` reproduces ONNX Runtime's float32 requantization (see there); it is the reference's
  arithmetic, not the accelerator's. The accelerator's requantization, :func:`requantize`, is pure int64.
* :func:`integer_sqrt` (LayerNorm) starts from a float64 estimate and corrects it to the exact integer root.
* Offline only, never per step: :func:`quantize_multiplier` (real scale → multiplier, shift), the tables
  (:meth:`ActivationTable.build`, :meth:`IntegerSoftmax.from_scale`) and the ``from_float`` conversions.
  Every per-step operation is integer; nothing is left to a float vector unit.

Rounding rules are named: ``"half_to_even"`` and ``"half_away_from_zero"``; both round the exact rational value
``acc * m / 2^(31 - shift)`` once (no double rounding as in gemmlowp's two-step high-mul + rounding shift).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

Rounding = Literal["half_to_even", "half_away_from_zero"]
ROUNDING_RULES: tuple[str, ...] = ("half_to_even", "half_away_from_zero")

INT32_MAX = 2**31 - 1
# quantize_multiplier's m lies in [2^30, 2^31); with |acc| < 2^31 the int64 product stays below 2^62.
_MAX_RIGHT_SHIFT = 62


def _int_range(dtype: np.dtype | type) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def accumulator_bound(depth: int, a_bits: int = 8, b_bits: int = 8, bias_bound: int = 0) -> int:
    """Largest |acc| of a ``depth``-term dot product of zero-point-shifted ``a_bits`` × ``b_bits`` operands plus bias.

    With any zero point inside the operand's range, ``|a − a_zp| ≤ 2^a_bits − 1`` (int8: 127 − (−128) = 255), so
    ``|acc| ≤ depth · (2^a_bits − 1) · (2^b_bits − 1) + bias_bound``. int8 × int8 admits depth ≤ 33 025.
    """
    if depth < 0 or not 1 <= a_bits <= 16 or not 1 <= b_bits <= 16 or bias_bound < 0:
        raise ValueError(f"bad accumulator_bound arguments: depth={depth} a_bits={a_bits} b_bits={b_bits} "
                         f"bias_bound={bias_bound}")
    return depth * (2**a_bits - 1) * (2**b_bits - 1) + bias_bound


def check_accumulator(depth: int, a_bits: int = 8, b_bits: int = 8, bias_bound: int = 0) -> None:
    """Raise ``OverflowError`` if an int32 accumulator could overflow for these shapes and bit widths."""
    bound = accumulator_bound(depth, a_bits, b_bits, bias_bound)
    if bound > INT32_MAX:
        raise OverflowError(
            f"int32 accumulator may overflow: depth {depth} × {a_bits}-bit × {b_bits}-bit (+ bias {bias_bound}) "
            f"bounds |acc| by {bound} > {INT32_MAX}"
        )


def _exact_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of integer-valued float64 arrays whose accumulation was checked to fit int32, as int32."""
    return np.matmul(a, b).astype(np.int32)


def _max_abs(bias: np.ndarray | None) -> int:
    return 0 if bias is None else int(np.abs(bias.astype(np.int64)).max(initial=0))


def _centered(x: np.ndarray, zero_point: int | np.ndarray, name: str) -> np.ndarray:
    if x.dtype not in (np.int8, np.uint8):
        raise TypeError(f"{name} must be int8 or uint8, got {x.dtype}")
    return x.astype(np.float64) - np.asarray(zero_point, dtype=np.float64)


def matmul_integer(
    a: np.ndarray,
    b: np.ndarray,
    a_zero_point: int = 0,
    b_zero_point: int | np.ndarray = 0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """ONNX ``MatMulInteger``: ``(a − a_zp) @ (b − b_zp)`` accumulated in int32, plus an optional int32 bias.

    Args:
        a: (..., M, K) int8/uint8.
        b: (..., K, N) int8/uint8.
        a_zero_point: scalar (per tensor).
        b_zero_point: scalar or (N,) (per output column).
        bias: None or (N,) int32, added to the accumulator (the int32 bias of a linear layer).
    Returns:
        (..., M, N) int32.
    """
    check_accumulator(a.shape[-1], 8, 8, _max_abs(bias))
    acc = _exact_product(_centered(a, a_zero_point, "a"), _centered(b, b_zero_point, "b"))
    return acc if bias is None else acc + bias.astype(np.int32)


def conv_integer(
    x: np.ndarray,
    w: np.ndarray,
    x_zero_point: int = 0,
    w_zero_point: int = 0,
    stride: Sequence[int] | int = 1,
    padding: Sequence[tuple[int, int]] | None = None,
    groups: int = 1,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """ONNX ``ConvInteger`` for 1-D and 2-D convolutions, int32 accumulation (no dilation).

    Padding is with the zero point (a padded element contributes exactly 0), as ONNX Runtime does. The Conformer's
    causal convolutions are ``padding=[(kernel − 1, 0)]`` (depthwise: ``groups=C``) and its subsampling
    ``padding=[(1, 0), (0, 0)], stride=2``.

    Args:
        x: (N, C, *S) int8/uint8, S one or two spatial sizes.
        w: (O, C / groups, *kernel) int8/uint8.
        stride: per spatial dim, or one int for all.
        padding: (before, after) per spatial dim; None for no padding.
        bias: None or (O,) int32.
    Returns:
        (N, O, *S_out) int32, S_out = (S + before + after − kernel) // stride + 1.
    """
    spatial = x.ndim - 2
    if spatial not in (1, 2) or w.ndim != x.ndim:
        raise ValueError(f"conv_integer takes (N, C, *S) with 1 or 2 spatial dims and a matching weight, "
                         f"got x {x.shape} w {w.shape}")
    out_channels, group_in, *kernel = w.shape
    channels = x.shape[1]
    if channels % groups or out_channels % groups or channels // groups != group_in:
        raise ValueError(f"groups={groups} does not fit x channels {channels}, weight {w.shape}")
    strides = (stride,) * spatial if isinstance(stride, int) else tuple(stride)
    pads = tuple(padding) if padding is not None else ((0, 0),) * spatial
    depth = group_in * int(np.prod(kernel))
    check_accumulator(depth, 8, 8, _max_abs(bias))

    xc = np.pad(_centered(x, x_zero_point, "x"), ((0, 0), (0, 0), *pads))
    windows = np.lib.stride_tricks.sliding_window_view(xc, kernel, axis=tuple(range(2, 2 + spatial)))
    windows = windows[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
    out_size = windows.shape[2:2 + spatial]
    batch = x.shape[0]
    # (N, G, Cg, *S_out, *k) -> (N, G, *S_out, Cg, *k) -> (N, G, P, Cg·Πk): one matmul per group.
    windows = windows.reshape(batch, groups, group_in, *out_size, *kernel)
    order = (0, 1, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial))
    patches = windows.transpose(order).reshape(batch, groups, -1, depth)
    wc = _centered(w, w_zero_point, "w").reshape(groups, out_channels // groups, depth).transpose(0, 2, 1)
    acc = _exact_product(patches, wc)  # (N, G, P, O/G)
    acc = acc.transpose(0, 1, 3, 2).reshape(batch, out_channels, *out_size)
    return acc if bias is None else acc + bias.astype(np.int32).reshape(-1, *(1,) * spatial)


def quantize_multiplier(real_multiplier: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real multiplier → (m, shift) with ``real ≈ m · 2^(shift − 31)``, ``m`` an int32 in [2^30, 2^31).

    The mantissa is rounded to 31 bits half to even (relative error ≤ 2^-31). Works elementwise (per channel).
    Raises ``ValueError`` for non-positive multipliers or ones outside [2^-32, 2^30).
    """
    real = np.asarray(real_multiplier, dtype=np.float64)
    if not np.all(np.isfinite(real)) or np.any(real <= 0):
        raise ValueError(f"real multipliers must be finite and > 0, got {real}")
    mantissa, shift = np.frexp(real)  # real = mantissa · 2^shift, mantissa in [0.5, 1)
    m = np.rint(np.ldexp(mantissa, 31)).astype(np.int64)  # exact scaling by 2^31, then one rounding
    carry = m == 2**31
    m = np.where(carry, m // 2, m)
    shift = shift.astype(np.int64) + carry
    right_shift = 31 - shift
    if np.any(right_shift < 1) or np.any(right_shift > _MAX_RIGHT_SHIFT):
        raise ValueError(f"real multiplier outside the supported range [2^-32, 2^30): {real}")
    return m, shift


def rounding_divide(x: np.ndarray, divisor: int | np.ndarray, rounding: Rounding) -> np.ndarray:
    """``x / divisor`` (divisor > 0) rounded to an integer by the named rule, exactly, in int64."""
    if rounding not in ROUNDING_RULES:
        raise ValueError(f"unknown rounding rule {rounding!r}; expected one of {ROUNDING_RULES}")
    x = np.asarray(x, dtype=np.int64)
    divisor = np.asarray(divisor, dtype=np.int64)
    floor = x // divisor  # floor division, also for negative x
    twice_remainder = 2 * (x - floor * divisor)  # in [0, 2·divisor)
    if rounding == "half_to_even":
        on_tie = floor & 1
    else:
        on_tie = (x >= 0).astype(np.int64)
    round_up = np.where(twice_remainder == divisor, on_tie, (twice_remainder > divisor).astype(np.int64))
    return floor + round_up


def rounding_right_shift(x: np.ndarray, n: int | np.ndarray, rounding: Rounding) -> np.ndarray:
    """``x / 2^n`` rounded to an integer by the named rule, exactly, in int64 (1 ≤ n ≤ 62)."""
    return rounding_divide(x, np.int64(1) << np.asarray(n, dtype=np.int64), rounding)


def multiply_by_quantized_multiplier(
    acc: np.ndarray, m: int | np.ndarray, shift: int | np.ndarray, rounding: Rounding
) -> np.ndarray:
    """``round(acc · m / 2^(31 − shift))`` in int64, the one rounding by the named rule. acc int32-valued."""
    acc = np.asarray(acc, dtype=np.int64)
    if np.any(np.abs(acc) > 2**31):
        raise OverflowError("accumulator outside int32")
    return rounding_right_shift(acc * np.asarray(m, dtype=np.int64), 31 - np.asarray(shift, dtype=np.int64), rounding)


def saturate(x: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """Clip to ``dtype``'s range and cast (int8: [−128, 127], int16: [−32768, 32767])."""
    lo, hi = _int_range(dtype)
    return np.clip(x, lo, hi).astype(dtype)


def requantize(
    acc: np.ndarray,
    m: int | np.ndarray,
    shift: int | np.ndarray,
    zero_point: int,
    rounding: Rounding,
    dtype: np.dtype | type = np.int8,
) -> np.ndarray:
    """int32 accumulator → ``dtype`` by fixed-point multiplier and shift, plus zero point, saturated. int64 only."""
    return saturate(multiply_by_quantized_multiplier(acc, m, shift, rounding) + zero_point, dtype)


def requantize_ort(
    acc: np.ndarray, scale: np.ndarray | float, zero_point: int, dtype: np.dtype | type = np.int8
) -> np.ndarray:
    """int32 → ``dtype`` exactly as ONNX Runtime's MLAS ``MlasRequantizeOutput`` does it (float32 path).

    MLAS converts acc to float32 (round to nearest even above 2^24), multiplies by the float32 scale, clamps to
    [min − zp, max − zp], converts to int32 with the default SSE/NEON rounding (nearest, ties to even), adds zp.
    """
    lo, hi = _int_range(dtype)
    scaled = acc.astype(np.float32) * np.asarray(scale, dtype=np.float32)
    scaled = np.clip(scaled, np.float32(lo - zero_point), np.float32(hi - zero_point))
    return (np.rint(scaled).astype(np.int32) + zero_point).astype(dtype)


def ort_output_scale(a_scale: float, b_scale: float | np.ndarray, y_scale: float) -> np.ndarray:
    """QLinearMatMul's requantization scale as ORT computes it: ``a_scale · b_scale / y_scale`` in float32."""
    return np.float32(a_scale) * np.asarray(b_scale, dtype=np.float32) / np.float32(y_scale)


def qlinear_matmul(
    a: np.ndarray,
    a_scale: float,
    a_zero_point: int,
    b: np.ndarray,
    b_scale: float | np.ndarray,
    b_zero_point: int | np.ndarray,
    y_scale: float,
    y_zero_point: int,
    dtype: np.dtype | type = np.int8,
) -> np.ndarray:
    """ONNX ``QLinearMatMul`` bit-exactly as ONNX Runtime (CPU) computes it: int32 matmul, then
    :func:`requantize_ort` with :func:`ort_output_scale`. b's scale/zero point: scalar or (N,) per column."""
    acc = matmul_integer(a, b, a_zero_point, b_zero_point)
    return requantize_ort(acc, ort_output_scale(a_scale, b_scale, y_scale), y_zero_point, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Activations by int16 lookup table, and the integer LSTM cell.
#
# Fixed-point formats (Qm.n: m integer bits, n fraction bits, one sign bit, int16):
#   gate pre-activations  Q3.12  range [−8, 8)   (sigmoid/tanh are within 3.4e-4 of their limits beyond ±8)
#   activation outputs    Q0.15  range [−1, 1)
#   cell state            Q4.11  range [−16, 16)
# ---------------------------------------------------------------------------------------------------------------

GATE_FRAC_BITS = 12  # Q3.12
ACT_FRAC_BITS = 15  # Q0.15
CELL_FRAC_BITS = 11  # Q4.11
TABLE_INDEX_BITS = 9  # 2^9 intervals over the int16 input range, 513 entries with the right end point
_TABLE_FRAC_BITS = 16 - TABLE_INDEX_BITS  # low input bits used to interpolate between entries


@dataclass(frozen=True)
class ActivationTable:
    """f over Q3.12 int16 inputs → Q0.15 int16, from a 513-entry int16 table with linear interpolation.

    Entry j holds ``round(f(−8 + j/32) · 2^15)`` (saturated to int16): the top 9 bits of the input pick the
    interval, the low 7 bits interpolate in integer arithmetic. Max error: sigmoid ≤ 2^-14, tanh ≤ 2^-13
    (tested over every int16 input).
    """

    name: str
    table: np.ndarray  # (513,) int16

    @classmethod
    def build(cls, name: str, fn: Callable[[np.ndarray], np.ndarray]) -> ActivationTable:
        points = np.arange(2**TABLE_INDEX_BITS + 1, dtype=np.float64) * 2.0 ** (_TABLE_FRAC_BITS - GATE_FRAC_BITS) - 8.0
        return cls(name, saturate(np.rint(fn(points) * 2.0**ACT_FRAC_BITS), np.int16))

    def __call__(self, x: np.ndarray, rounding: Rounding = "half_to_even") -> np.ndarray:
        """x: int16 Q3.12 (any shape) → int16 Q0.15 (same shape)."""
        offset = x.astype(np.int64) + 2**15  # [0, 2^16)
        index = offset >> _TABLE_FRAC_BITS
        fraction = offset & (2**_TABLE_FRAC_BITS - 1)
        low = self.table[index].astype(np.int64)
        step = self.table[index + 1].astype(np.int64) - low
        return saturate(low + rounding_right_shift(step * fraction, _TABLE_FRAC_BITS, rounding), np.int16)


SIGMOID = ActivationTable.build("sigmoid", lambda x: 1.0 / (1.0 + np.exp(-x)))
TANH = ActivationTable.build("tanh", np.tanh)


def sigmoid_gate(x: np.ndarray, gate: np.ndarray, rounding: Rounding = "half_to_even") -> np.ndarray:
    """``x · sigmoid(gate)``, both int16 Q3.12 (same shape) → int16 Q3.12: the Conformer's GLU (x, gate = the two
    halves of the pointwise expansion) and SiLU (``sigmoid_gate(x, x)``). Q3.12 · Q0.15 ≫ 15 = Q3.12, never
    saturates since |sigmoid| < 1."""
    product = x.astype(np.int64) * SIGMOID(gate, rounding).astype(np.int64)
    return rounding_right_shift(product, ACT_FRAC_BITS, rounding).astype(np.int16)


def _symmetric_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 quantization: (int8 weight, (rows,) float64 scale); an all-zero row gets scale 1/127."""
    row_max = np.abs(weight).max(axis=1)
    scale = np.where(row_max > 0, row_max, 1.0) / 127.0
    return saturate(np.rint(weight / scale[:, None]), np.int8), scale


@dataclass(frozen=True)
class IntegerLSTMCell:
    """One LSTM step in integer arithmetic, PyTorch gate order (i, f, g, o).

    gates = sat16(requant(x·W_ihᵀ + b) + requant(h·W_hhᵀ)) in Q3.12; i, f, o = SIGMOID, g = TANH (Q0.15);
    c' = sat16(f·c ≫ 15 + i·g ≫ 19) in Q4.11; h' = requant_int8(o · TANH(sat16(c' ≪ 1))). Every product and
    shift is exact integer arithmetic with the one named rounding rule.

    Attributes:
        w_ih: (4H, I) int8, w_hh: (4H, H) int8 (symmetric, zero point 0).
        bias: (4H,) int32 at the scale x_scale · w_ih_scale.
        x_mult, h_mult: (m, shift) per gate row taking each accumulator to Q3.12.
        out_mult: (m, shift) taking o · tanh(c) (Q0.30) to the int8 hidden state.
    """

    w_ih: np.ndarray
    w_hh: np.ndarray
    bias: np.ndarray
    x_zero_point: int
    h_zero_point: int
    x_mult: tuple[np.ndarray, np.ndarray]
    h_mult: tuple[np.ndarray, np.ndarray]
    out_mult: tuple[np.ndarray, np.ndarray]
    rounding: Rounding = "half_to_even"

    @classmethod
    def from_float(
        cls,
        w_ih: np.ndarray,
        w_hh: np.ndarray,
        bias: np.ndarray,
        x_scale: float,
        x_zero_point: int,
        h_scale: float,
        h_zero_point: int,
        rounding: Rounding = "half_to_even",
    ) -> IntegerLSTMCell:
        """Quantize float weights (4H, I), (4H, H) per row to int8, then as :meth:`from_int8`."""
        return cls.from_int8(*_symmetric_int8(w_ih), *_symmetric_int8(w_hh), bias,
                             x_scale, x_zero_point, h_scale, h_zero_point, rounding)

    @classmethod
    def from_int8(
        cls,
        w_ih: np.ndarray,
        w_ih_scale: np.ndarray | float,
        w_hh: np.ndarray,
        w_hh_scale: np.ndarray | float,
        bias: np.ndarray,
        x_scale: float,
        x_zero_point: int,
        h_scale: float,
        h_zero_point: int,
        rounding: Rounding = "half_to_even",
    ) -> IntegerLSTMCell:
        """From int8 weights (e.g. b-bit codes expanded through their table) with scales () or (4H,), and the
        float bias (4H,) (b_ih + b_hh), which is rounded to int32 at the scale x_scale · w_ih_scale."""
        gate_unit = 2.0**-GATE_FRAC_BITS
        return cls(
            w_ih, w_hh, np.rint(bias / (x_scale * w_ih_scale)).astype(np.int32), x_zero_point, h_zero_point,
            quantize_multiplier(x_scale * np.asarray(w_ih_scale) / gate_unit),
            quantize_multiplier(h_scale * np.asarray(w_hh_scale) / gate_unit),
            quantize_multiplier(2.0 ** -(2 * ACT_FRAC_BITS) / h_scale),
            rounding,
        )

    def __call__(self, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: (B, I) int8, h: (B, H) int8, c: (B, H) int16 Q4.11 → (h', c') of the same shapes and dtypes."""
        r = self.rounding
        acc_x = matmul_integer(x, self.w_ih.T, self.x_zero_point, 0, self.bias)
        acc_h = matmul_integer(h, self.w_hh.T, self.h_zero_point, 0)
        gates = saturate(requantize(acc_x, *self.x_mult, 0, r, np.int16).astype(np.int32)
                         + requantize(acc_h, *self.h_mult, 0, r, np.int16), np.int16)
        activations = (SIGMOID, SIGMOID, TANH, SIGMOID)
        i, f, g, o = (fn(part, r).astype(np.int64) for fn, part in zip(activations, np.split(gates, 4, axis=1)))
        # Q0.15·Q4.11 = Q4.26 → Q4.11 is ≫15; Q0.15·Q0.15 = Q0.30 → Q4.11 is ≫19.
        c_next = saturate(rounding_right_shift(f * c.astype(np.int64), ACT_FRAC_BITS, r)
                          + rounding_right_shift(i * g, 2 * ACT_FRAC_BITS - CELL_FRAC_BITS, r), np.int16)
        c_as_gate = saturate(c_next.astype(np.int32) << (GATE_FRAC_BITS - CELL_FRAC_BITS), np.int16)  # Q4.11 → Q3.12
        h_product = o * TANH(c_as_gate, r).astype(np.int64)  # Q0.30, |·| < 2^30
        h_next = requantize(h_product, *self.out_mult, self.h_zero_point, r, np.int8)
        return h_next, c_next


def integer_sqrt(x: np.ndarray) -> np.ndarray:
    """``floor(sqrt(x))`` of int64 ``x`` in [0, 2^62], exact: a float64 estimate (off by at most one) corrected in
    integer arithmetic."""
    x = np.asarray(x, dtype=np.int64)
    root = np.floor(np.sqrt(x.astype(np.float64))).astype(np.int64)
    root -= root * root > x
    root += (root + 1) * (root + 1) <= x
    return root


NORM_FRAC_BITS = 10  # normalised values (x − mean) / std in Q5.10: |·| ≤ sqrt(D − 1) < 32 for D ≤ 1024
_NORM_ROOT_BITS = 8  # fraction bits of the integer square root


@dataclass(frozen=True)
class IntegerLayerNorm:
    """LayerNorm over the last axis of an int8 tensor, in integer arithmetic, to int8.

    With d = x − x_zp (the input scale cancels in (x − mean) / std): e = D·d − Σd = D·(d − mean) exactly,
    S = Σe² + eps_term = D³·(var + eps/x_scale²), r = isqrt(S · 2^16 / D) ≈ D·std·2^8, n = round(e · 2^18 / r) in
    Q5.10; then y = requant_int8(n · gamma_q + beta_q) like a linear layer (gamma_q int16, beta_q int32 at the
    scale gamma_scale · 2^-10). Every step is int64; only :meth:`from_float` uses float.

    Attributes:
        gamma: (D,) int16, beta: (D,) int32, eps_term: D³ · eps / x_scale² rounded (≥ 1, so S > 0).
        out_mult: (m, shift) from gamma_scale · 2^-10 to the output scale.
    """

    gamma: np.ndarray
    beta: np.ndarray
    eps_term: int
    x_zero_point: int
    out_mult: tuple[np.ndarray, np.ndarray]
    y_zero_point: int
    rounding: Rounding = "half_to_even"

    @classmethod
    def from_float(
        cls,
        gamma: np.ndarray,
        beta: np.ndarray,
        eps: float,
        x_scale: float,
        x_zero_point: int,
        y_scale: float,
        y_zero_point: int,
        rounding: Rounding = "half_to_even",
    ) -> IntegerLayerNorm:
        dim = gamma.shape[0]
        eps_term = max(1, round(dim**3 * eps / x_scale**2))
        # S · 2^16 must fit int64: (D³ · 255² + eps_term) · 2^16 < 2^62 (D = 1024 fits).
        if (dim**3 * 255**2 + eps_term) << (2 * _NORM_ROOT_BITS) >= 2**62:
            raise OverflowError(f"IntegerLayerNorm: D = {dim} with eps / x_scale² = {eps / x_scale**2:g} "
                                "could overflow the int64 sum of squares")
        gamma_scale = max(float(np.abs(gamma).max()), 1e-12) / (2**15 - 1)
        beta_q = np.rint(beta / (gamma_scale * 2.0**-NORM_FRAC_BITS))
        if np.abs(beta_q).max(initial=0) > INT32_MAX - 2**30:  # n · gamma_q < 2^30, so the sum fits int32
            raise OverflowError("LayerNorm bias too large relative to its gain for an int32 accumulator")
        return cls(
            saturate(np.rint(gamma / gamma_scale), np.int16),
            beta_q.astype(np.int32),
            eps_term,
            x_zero_point,
            quantize_multiplier(gamma_scale * 2.0**-NORM_FRAC_BITS / y_scale),
            y_zero_point,
            rounding,
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (..., D) int8 → (..., D) int8."""
        dim = x.shape[-1]
        d = x.astype(np.int64) - self.x_zero_point
        e = dim * d - d.sum(axis=-1, keepdims=True)
        total = (e * e).sum(axis=-1, keepdims=True) + self.eps_term
        root = integer_sqrt(rounding_divide(total << (2 * _NORM_ROOT_BITS), dim, self.rounding))
        normalised = rounding_divide(e << (NORM_FRAC_BITS + _NORM_ROOT_BITS), root, self.rounding)
        acc = saturate(normalised, np.int16).astype(np.int64) * self.gamma + self.beta
        return requantize(acc, *self.out_mult, self.y_zero_point, self.rounding, np.int8)


PROB_FRAC_BITS = 8  # softmax output: uint8 probabilities at scale 2^-8 (1.0 saturates to 255/256)


@dataclass(frozen=True)
class IntegerSoftmax:
    """Softmax over the last axis of int8 scores under a boolean mask, to uint8 probabilities (scale 2^-8).

    The scores' scale is fixed per layer, so exp needs only the 256 differences d = x − max(x) ∈ [−255, 0]:
    ``table[255 + d] = round(exp(d · x_scale) · 2^15)`` (int16, built offline). Then p = round(e · 2^8 / Σe),
    int64 throughout. A row whose mask is all False gives all zeros.
    """

    table: np.ndarray  # (256,) int16
    rounding: Rounding = "half_to_even"

    @classmethod
    def from_scale(cls, x_scale: float, rounding: Rounding = "half_to_even") -> IntegerSoftmax:
        differences = np.arange(-255, 1, dtype=np.float64)
        return cls(saturate(np.rint(np.exp(differences * x_scale) * 2.0**ACT_FRAC_BITS), np.int16), rounding)

    def __call__(self, x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """x: (..., L) int8; mask: bool broadcastable to x, True where a key may be attended → (..., L) uint8."""
        keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
        scores = x.astype(np.int64)
        row_max = np.where(keep, scores, -128).max(axis=-1, keepdims=True)
        difference = np.where(keep, scores - row_max, -255)  # masked keys may exceed the kept maximum
        e = np.where(keep, self.table[255 + difference].astype(np.int64), 0)
        total = np.maximum(e.sum(axis=-1, keepdims=True), 1)  # all-masked rows: 0 / 1
        return saturate(rounding_divide(e << PROB_FRAC_BITS, total, self.rounding), np.uint8)
