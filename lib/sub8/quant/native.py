"""Native integer QAT (design.md §5): every matmul and convolution of the forward runs on integers, weights AND
activations, exactly as an integer accelerator would, and is rescaled to float; gradients are straight-through.

What is quantized
-----------------
* **Weights**: per output channel, symmetric, ``b_w`` bits: ``n = clamp(round(W / s), -q_w, q_w)`` with
  ``q_w = 2^(b_w-1) - 1`` and ``s = max|W_c| / q_w`` (:class:`~sub8.quant.uniform.UniformQuantizer`'s scale), then
  rounded to a 17-bit significand (:func:`weight_scale`). That rounding (a relative change below 2^-17) makes ``q·s``
  exact in float32 (7 + 17 ≤ 24 bits), so the hard-quantized weight ``n·s`` is exact and re-deriving the scale from
  it gives ``s`` again, bit for bit: a model saved after QAT, re-wrapped or exported with
  :func:`~sub8.quant.apply.export_quantized`, runs the very same integers and scales it was trained with.
* **Activations** (the input of every Linear, Conv1d, Conv2d and LSTM matmul, and, when the plan says so, the
  operands of the attention products Q·Kᵀ and P·V): per tensor, ``b_a`` bits, **affine** (asymmetric) with a zero
  point: ``c = clamp(round(x / s_a), -z, q_a - z)``, where ``q_a = 2^b_a - 1``, the stored code is ``c + z`` in
  ``[0, q_a]`` and the matmul takes the centred integer ``c``. The range ``[lo, hi]`` is an exponential moving
  average (momentum 0.99, PyTorch's ``MovingAverageMinMaxObserver`` constant; the first batch initialises it) of
  each training batch's min and max, widened to contain 0 so that zero — the padding of every convolution — is
  exactly code ``z``; ``s_a = (hi - lo) / q_a``, ``z = round(-lo / s_a)``. Updated in training mode, frozen in eval
  mode (and by :func:`native_quantized`). Why affine rather than symmetric: the inputs here are of three shapes —
  LayerNorm outputs and features (roughly symmetric), ReLU outputs (non-negative) and SiLU/GLU/tanh outputs
  (lopsided) — and one affine rule fits all three without knowing which is which: after a ReLU it finds ``lo = 0``,
  ``z = 0`` and uses all 2^b codes for the positive half, where a symmetric grid would waste half of them (at 4
  bits: 15 levels instead of 7 over the SiLU output). The zero point costs the device one per-channel
  correction term folded into the bias (``z·Σ_k n_w``), as ONNX's QLinearMatMul and our emulator's kernels take it.
* **Attention probabilities** P (only with the P·V product quantized): on the fixed grid ``k / q_a``, k in
  ``[0, q_a]``: P is in [0, 1] by construction, so no range needs estimating. Attention dropout multiplies the
  integer codes by a 0/1 mask and folds ``1 / (1 - p)`` into the rescale, so it stays integer.
* **Embedding** (the predictor's): weights only (a lookup has no arithmetic to run in integers).

What stays float: biases (float32, added after the rescale; on the device an int32 bias at scale ``s_a·s_w``),
LayerNorm, softmax, the nonlinearities and the LSTM cell's pointwise gate arithmetic, residual additions.

Exactness of the integer matmul
-------------------------------
The operands are integer-valued float tensors (the STE needs a float graph): ``|c| ≤ q_a`` for an activation (the
zero point lies in ``[0, q_a]``), ``|n| ≤ q_w`` for a weight. Every product and every partial sum of a depth-``d``
reduction — in whatever order or blocking BLAS, oneDNN or cuBLAS sums them, FMA included — is then an integer of
magnitude at most ``d · max|a| · max|b|``. float32 holds every integer up to 2^24 exactly, and an operation whose
exact result is representable returns it exactly, so the float32 matmul IS the integer matmul whenever
``d · max|a| · max|b| ≤ 2^24`` (:func:`max_exact_depth`). Where that fails (e.g. w8a8 in the Conformer's second
feed-forward linear, d = 576 > 518), the reduction is split into chunks that each satisfy it, each chunk runs
as one float32 matmul, and the chunks are summed in float64, exact up to 2^53 (chunking rather than one float64
matmul: the same speed as the float32 matmul, against ~1.8× for float64 on this CPU, measured on a 1500×768×192
linear). Every reduction first asserts the int32 bound of the accelerator with
:func:`sub8.emulator.kernels.check_accumulator` (OverflowError beyond it: int8×int8 allows depth ≤ 33 025). Inputs of
at most 8 bits are exact even where a GPU rounds float32 matmul inputs to TF32 or bf16 (|c| ≤ 255 ≤ 2^8), and
accumulation there is float32. On CUDA, convolutions run with cuDNN off (native im2col + GEMM), because cuDNN may
choose Winograd or FFT algorithms, whose transforms are not exact. The rescale ``acc · (s_a·s_w)`` (+ bias) is the
only rounding: the output is within 2 float32 roundings (plus the bias addition's) of the exact value
``Σ (c·s_a)(n·s_w)`` of the fake-quantized operands.

Straight-through gradients
--------------------------
Rounding passes gradients straight through (:class:`_Quantize`): identity for weights (their scale covers their
range, so nothing is clipped), clipped for activations (zero gradient where the rounded value falls off the grid,
i.e. more than half a step outside ``[lo, hi]``: the mask of PyTorch's fake-quantize ops). The ranges are not
learned (no LSQ/PACT gradient to the scale): the design calibrates them by the EMA, and a learned range would
compete with it.

LSTM
----
With activation quantization the fused LSTM kernel cannot run: it multiplies the float hidden state inside the
recurrence. :class:`NativeLSTM` unrolls the cell: the input projection of all time steps is one integer matmul of
the quantized layer input; per step, the hidden state is quantized (its range: an EMA like the others, started at
[-1, 1], h's bound; updated once per sequence, after it, because the scale must be fixed before h is known) and the
recurrent product is an integer matmul; the gate arithmetic stays float. Measured on one CPU thread at the
rnnt_small encoder's size (3×256, input 320, 20 utterances × 75 steps, forward + backward, best of 5, w4a8): fused
fp32 nn.LSTM 220 ms, :class:`NativeLSTM` 379 ms (1.7×: the price of running what the device runs).

Use
---
Training: ``NativeQAT(native_plan("w4a8"))`` as the hooks of :func:`sub8.train.train`. It leaves a plain model with
hard-quantized weights; the activation ranges are in the hooks' state (``final.pt["hooks"]``). Evaluation must
run activations quantized too::

    hooks = NativeQAT.from_state_dict(checkpoint["hooks"])
    with hooks.evaluating(model):
        ...  # decode: weights and activations quantized, integer matmuls

Size: :func:`native_size` (packed ``b_w``-bit codes + per-channel float32 scales + activation scale and zero point
per site + the float32 rest) and its ratio to float32.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sub8.emulator.kernels import check_accumulator
from sub8.models import deployed_parameters
from sub8.models.conformer import SelfAttention
from sub8.quant.apply import QuantizedTensor, export_quantized
from sub8.quant.base import check_bits
from sub8.quant.uniform import UniformQuantizer
from sub8.train import Hooks

EMA_MOMENTUM = 0.99
SCALE_SIGNIFICAND_BITS = 17  # 17 + 7 bits of q_w ≤ 127 = 24: q_w · s is exact in float32
_FLOAT_EXACT = {torch.float32: 2**24, torch.float64: 2**53}  # every integer up to this is representable
NATIVE_PLANS = ("w8a8", "w4a8", "w4a4", "mixed")


# --- rounding with straight-through gradients -------------------------------------------------------------------


class _Quantize(torch.autograd.Function):
    """``clamp(round(x / scale), lo, hi)`` (round half to even) with a straight-through gradient ``grad / scale``,
    or with ``clip_grad`` zero where the rounded value fell outside ``[lo, hi]`` (PyTorch's fake-quantize mask).

    One function for the division, rounding, clamping and mask, in five fast passes. The separate autograd ops took
    three times as long on this CPU: clamp with tensor bounds, a bool mask and ``torch.where`` run unvectorised
    (measured on 864k floats, one thread: ``where`` 3.0 ms, a bool ``eq`` 0.5 ms, against 0.12 ms for ``eq`` into a
    float tensor and 0.11 ms for a float multiply by the mask); together they made a 576→144 linear's training
    step 1.8× the fp32 one."""

    @staticmethod
    def forward(ctx, x, scale, lo, hi, clip_grad: bool):  # noqa: ANN001 (autograd signature)
        rounded = torch.div(x, scale).round_()
        codes = rounded.clamp_min(lo).clamp_max_(hi)
        ctx.clip_grad = clip_grad
        # The mask as 1.0/0.0 floats: the backward is one float multiply.
        inside = torch.eq(codes, rounded, out=torch.empty_like(codes)) if clip_grad else None
        ctx.save_for_backward(scale, inside)
        return codes

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        scale, inside = ctx.saved_tensors
        if ctx.clip_grad:
            grad = grad * inside
        return grad / scale, None, None, None, None


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale (C,): ``max|W_c| / q_w`` rounded to a 17-bit significand (see the module
    docstring: it makes ``q_w · s`` exact, so the scale re-derived from the hard-quantized weights is ``s``)."""
    s = UniformQuantizer(bits, per_channel=True).scale(w)
    mantissa, exponent = torch.frexp(s)
    return torch.ldexp(torch.round(mantissa * 2**SCALE_SIGNIFICAND_BITS) / 2**SCALE_SIGNIFICAND_BITS, exponent)


def quantize_weight(w: torch.Tensor, bits: int, site: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(n, s): integer-valued ``n`` shaped like ``w`` in ``[-q_w, q_w]`` (straight-through to ``w`` divided by the
    scale) and the (C,) scale; ``n · s`` is the hard-quantized weight."""
    qmax = 2 ** (bits - 1) - 1
    s = weight_scale(w, bits)
    n = _Quantize.apply(w, s.view(-1, *([1] * (w.dim() - 1))), -qmax, qmax, False)
    _record("weight", site, n, -qmax, qmax)
    return n, s


# --- checking value ranges (tests, notebooks) -------------------------------------------------------------------

_RECORD: list[dict[str, Any]] | None = None


@contextmanager
def recording_integer_ranges() -> Iterator[list[dict[str, Any]]]:
    """Within the block, every integer operand and accumulator of the native forward is recorded as a row
    ``{role, site, min, max, lo, hi, integral}``: the value range seen, the range its bit width (or, for an
    accumulator, its bound) allows, and whether every value is an integer. Costs a host sync per tensor."""
    global _RECORD
    previous, _RECORD = _RECORD, []
    try:
        yield _RECORD
    finally:
        _RECORD = previous


def _record(role: str, site: str, values: torch.Tensor, lo: float, hi: float) -> None:
    if _RECORD is None:
        return
    v = values.detach()
    _RECORD.append({"role": role, "site": site, "min": float(v.min()), "max": float(v.max()), "lo": float(lo),
                    "hi": float(hi), "integral": bool(torch.equal(v, torch.round(v)))})


# --- exact integer products ---------------------------------------------------------------------------------------


def act_max(bits: int) -> int:
    """Largest |centred code| of an affine ``bits``-bit activation (the zero point lies in [0, 2^bits - 1])."""
    return 2**bits - 1


def weight_max(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def max_exact_depth(a_max: int, b_max: int, dtype: torch.dtype = torch.float32) -> int:
    """Longest reduction ``Σ_k a_k b_k`` (|a| ≤ a_max, |b| ≤ b_max integers) that ``dtype`` computes exactly in any
    summation order: every partial sum is an integer of magnitude ≤ depth · a_max · b_max ≤ 2^24 (float32)."""
    if dtype not in _FLOAT_EXACT:
        raise TypeError(f"native integer ops run in float32 or float64, not {dtype}")
    return _FLOAT_EXACT[dtype] // (a_max * b_max)


def reduction_chunks(depth: int, a_bits: int, a_max: int, b_bits: int, b_max: int,
                     dtype: torch.dtype = torch.float32) -> int:
    """How many exact float pieces a depth-``depth`` reduction is split into (1: one matmul). Raises OverflowError
    (from the emulator's int32 check) when the accumulator could overflow int32 on the device."""
    check_accumulator(depth, a_bits, b_bits)
    return -(-depth // max_exact_depth(a_max, b_max, dtype)) if depth else 1


def _check_dtype(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != b.dtype or a.dtype not in _FLOAT_EXACT:
        raise TypeError(f"native integer ops need float32/float64 operands of one dtype, got {a.dtype} and {b.dtype}")
    if torch.is_autocast_enabled(a.device.type):
        raise RuntimeError("native integer ops must run outside autocast: a float16 output cannot hold the exact "
                           "accumulator")


def int_linear(c: torch.Tensor, n: torch.Tensor, a_bits: int, w_bits: int, site: str = "") -> torch.Tensor:
    """``c @ n.T`` exactly: c (..., K) centred ``a_bits``-bit activations, n (N, K) ``w_bits``-bit weights. Returns
    the accumulator, integer-valued, in c's dtype (one exact matmul) or float64 (exact chunks summed)."""
    _check_dtype(c, n)
    depth = n.shape[1]
    chunks = reduction_chunks(depth, a_bits, act_max(a_bits), w_bits, weight_max(w_bits), c.dtype)
    if chunks == 1:
        acc = F.linear(c, n)
    else:
        step = -(-depth // chunks)
        acc = sum(F.linear(c[..., i:i + step], n[:, i:i + step]).double() for i in range(0, depth, step))
    _record("accumulator", site, acc, -depth * act_max(a_bits) * weight_max(w_bits),
            depth * act_max(a_bits) * weight_max(w_bits))
    return acc


def int_matmul(a: torch.Tensor, b: torch.Tensor, bits: int, site: str = "") -> torch.Tensor:
    """``a @ b`` exactly for two centred ``bits``-bit activation operands (the attention products), reducing over
    a's last dimension; chunked along it when longer than the exact float32 depth."""
    _check_dtype(a, b)
    depth = a.shape[-1]
    chunks = reduction_chunks(depth, bits, act_max(bits), bits, act_max(bits), a.dtype)
    if chunks == 1:
        acc = a @ b
    else:
        step = -(-depth // chunks)
        acc = sum((a[..., i:i + step] @ b[..., i:i + step, :]).double() for i in range(0, depth, step))
    bound = depth * act_max(bits) ** 2
    _record("accumulator", site, acc, -bound, bound)
    return acc


def int_conv(c: torch.Tensor, n: torch.Tensor, conv: Callable[..., torch.Tensor], options: dict[str, Any],
             a_bits: int, w_bits: int, site: str = "") -> torch.Tensor:
    """``conv(c, n, **options)`` exactly (``F.conv1d``/``F.conv2d``, zero padding). The reduction runs over the
    input channels of a group times the kernel; chunked over input channels when too deep for float32 (groups = 1),
    or computed in float64 (a grouped convolution that deep; none of the presets has one)."""
    _check_dtype(c, n)
    groups = options.get("groups", 1)
    kernel = math.prod(n.shape[2:])
    depth = n.shape[1] * kernel
    a_max, w_max = act_max(a_bits), weight_max(w_bits)
    chunks = reduction_chunks(depth, a_bits, a_max, w_bits, w_max, c.dtype)
    channels = max_exact_depth(a_max, w_max, c.dtype) // kernel  # input channels per exact piece
    # cuDNN may pick Winograd/FFT algorithms (inexact transforms); PyTorch's own kernels are im2col + GEMM or direct.
    with torch.backends.cudnn.flags(enabled=False) if c.is_cuda else nullcontext():
        if chunks == 1:
            acc = conv(c, n, **options)
        elif groups == 1 and channels >= 1:
            step = channels
            acc = sum(conv(c[:, i:i + step], n[:, i:i + step], **options).double()
                      for i in range(0, n.shape[1], step))
        else:
            acc = conv(c.double(), n.double(), **options)
    _record("accumulator", site, acc, -depth * a_max * w_max, depth * a_max * w_max)
    return acc


def _rescale(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """``acc · scale (+ bias)`` with the combined float32 scale, in the accumulator's precision, then ``dtype``
    (one fused pass when the accumulator is already ``dtype``)."""
    scale = scale.to(acc.dtype)
    if bias is None:
        return (acc * scale).to(dtype)
    if acc.dtype == dtype:
        return torch.addcmul(bias, acc, scale)
    return (acc * scale).to(dtype) + bias


# --- activation quantizer -----------------------------------------------------------------------------------------


class ActivationQuantizer(nn.Module):
    """Per-tensor affine ``bits``-bit quantizer with an EMA-calibrated range (see the module docstring).

    Its state (``running_min``, ``running_max``, ``initialized``) is deliberately NOT in the model's state_dict
    (non-persistent buffers): the wrapped model keeps the plain model's keys, and the state travels in the hooks'
    state instead (:func:`activation_state`).
    """

    def __init__(self, bits: int, site: str, momentum: float = EMA_MOMENTUM,
                 init_range: tuple[float, float] | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        self.bits = _check_native_bits(bits, "activation")
        self.qmax = 2**bits - 1
        self.site = site
        self.momentum = momentum
        self.frozen = False
        self.initialized = init_range is not None
        lo, hi = init_range if init_range is not None else (0.0, 0.0)
        self.register_buffer("running_min", torch.tensor(float(lo), device=device), persistent=False)
        self.register_buffer("running_max", torch.tensor(float(hi), device=device), persistent=False)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, site={self.site!r}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Move the range toward ``x``'s min and max (the first call sets it)."""
        lo, hi = torch.aminmax(x.detach().float())
        if self.initialized:
            self.running_min.mul_(self.momentum).add_(lo, alpha=1 - self.momentum)
            self.running_max.mul_(self.momentum).add_(hi, alpha=1 - self.momentum)
        else:
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.initialized = True

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) as 0-dim float32 tensors, from the range widened to contain 0."""
        lo = self.running_min.clamp(max=0.0)
        hi = self.running_max.clamp(min=0.0)
        scale = (hi - lo) / self.qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero input: any scale gives code z
        return scale, torch.round(-lo / scale).clamp(0, self.qmax)

    def quantize(self, x: torch.Tensor, qparams: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, scale) with the current range (or ``qparams``, a :meth:`scale_zero_point` computed once for many
        calls), no update: c integer-valued, centred (code − zero point)."""
        if not self.initialized:
            raise RuntimeError(f"activation range of {self.site!r} was never calibrated: run a training-mode "
                               "forward first, or load the hooks' state")
        scale, zero = qparams if qparams is not None else self.scale_zero_point()
        c = _Quantize.apply(x, scale.to(x.dtype), -zero.to(x.dtype), (self.qmax - zero).to(x.dtype), True)
        if _RECORD is not None:
            _record("activation", self.site, c + zero.to(x.dtype), 0, self.qmax)
        return c, scale

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Observe (training mode, unless frozen), then quantize."""
        if self.training and not self.frozen:
            self.observe(x)
        return self.quantize(x)


def _check_native_bits(bits: object, what: str) -> int:
    bits = check_bits(bits)
    if bits < 2:
        raise ValueError(f"native QAT needs at least 2 {what} bits (a symmetric weight grid with zero needs three "
                         f"codes; a 1-bit activation grid is only {{lo, hi}}), got {bits}")
    return bits


# --- native modules -----------------------------------------------------------------------------------------------


class _NativeWeight:
    """Mixin: the module's ``weight`` quantized per output channel at ``w_bits``."""

    w_bits: int
    site: str

    def integer_weight(self, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight(getattr(self, name), self.w_bits, f"{self.site}.{name}")

    @torch.no_grad()
    def hard_quantize_(self) -> None:
        """Write ``n · s`` into every quantized weight (exact: see :func:`weight_scale`)."""
        for name in self._weight_names():
            w = getattr(self, name)
            n, s = quantize_weight(w, self.w_bits)
            w.copy_(n * s.view(-1, *([1] * (w.dim() - 1))))

    def _weight_names(self) -> list[str]:
        return ["weight"]


class NativeLinear(_NativeWeight, nn.Linear):
    """nn.Linear whose forward is ``int(x) @ int(W).T`` rescaled, plus the float bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s_a = self.input_quantizer(x)
        n, s_w = self.integer_weight()
        return _rescale(int_linear(c, n, self.a_bits, self.w_bits, self.site), s_a * s_w, x.dtype, self.bias)


class _NativeConv(_NativeWeight):
    conv: Callable[..., torch.Tensor]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s_a = self.input_quantizer(x)
        n, s_w = self.integer_weight()
        options = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        acc = int_conv(c, n, type(self).conv, options, self.a_bits, self.w_bits, self.site)
        shape = (-1, *([1] * (n.dim() - 2)))  # channel dimension first of the spatial ones (batched or not)
        return _rescale(acc, (s_a * s_w).view(shape), x.dtype, None if self.bias is None else self.bias.view(shape))


class NativeConv1d(_NativeConv, nn.Conv1d):
    conv = staticmethod(F.conv1d)


class NativeConv2d(_NativeConv, nn.Conv2d):
    conv = staticmethod(F.conv2d)


class NativeEmbedding(_NativeWeight, nn.Embedding):
    """nn.Embedding looking up the hard-quantized rows (a lookup does no arithmetic; its output is the input of
    the next matmul, which quantizes it)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, s = self.integer_weight()
        return F.embedding(tokens, n * s[:, None], self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class NativeLSTM(_NativeWeight, nn.LSTM):
    """nn.LSTM unrolled over time with integer input and recurrent products (see the module docstring). Same
    parameters, same call signature (``batch_first``, optional ``(h0, c0)``, unbatched input); dropout between
    layers as nn.LSTM."""

    def _weight_names(self) -> list[str]:
        return [n for n in self._flat_weights_names if n.startswith(("weight_ih_l", "weight_hh_l"))]

    def forward(self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):  # noqa: A002
        unbatched = input.dim() == 2
        x = input.unsqueeze(1 if not self.batch_first else 0) if unbatched else input
        x = x if self.batch_first else x.transpose(0, 1)  # (B, T, I)
        batch = x.shape[0]
        if hx is None:
            zeros = x.new_zeros(self.num_layers, batch, self.hidden_size)
            hx = (zeros, zeros)
        elif unbatched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        last_h, last_c = [], []
        for layer in range(self.num_layers):
            cx, s_x = self.input_quantizers[layer](x)
            n_ih, s_ih = self.integer_weight(f"weight_ih_l{layer}")
            n_hh, s_hh = self.integer_weight(f"weight_hh_l{layer}")
            bias = (getattr(self, f"bias_ih_l{layer}") + getattr(self, f"bias_hh_l{layer}")) if self.bias else None
            gates_x = _rescale(int_linear(cx, n_ih, self.a_bits, self.w_bits, f"{self.site}.input_l{layer}"),
                               s_x * s_ih, x.dtype, bias)
            hidden = self.hidden_quantizers[layer]
            qparams = hidden.scale_zero_point()  # fixed for the whole sequence
            h, c = hx[0][layer], hx[1][layer]
            outputs = []
            for t in range(x.shape[1]):
                ch, s_h = hidden.quantize(h, qparams)
                acc = int_linear(ch, n_hh, self.a_bits, self.w_bits, f"{self.site}.hidden_l{layer}")
                i, f, g, o = _rescale(acc, s_h * s_hh, x.dtype, gates_x[:, t]).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
            if hidden.training and not hidden.frozen:
                hidden.observe(x)  # after the sequence: the step scales had to be fixed before h was known
            last_h.append(h)
            last_c.append(c)
            if layer < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        out = x if self.batch_first else x.transpose(0, 1)
        h_n, c_n = torch.stack(last_h), torch.stack(last_c)
        if unbatched:
            return out.squeeze(0 if self.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
        return out, (h_n, c_n)


class NativeSelfAttention(SelfAttention):
    """The Conformer's SelfAttention with the score product Q·Kᵀ and/or the value product P·V in integers
    (``scores_bits`` / ``values_bits``; None leaves that product in float). Its projections ``qkv`` and ``out`` are
    whatever the plan made them (usually :class:`NativeLinear`)."""

    scores_bits: int | None
    values_bits: int | None

    def scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Q·Kᵀ / sqrt(d): (B, H, T, d) × (B, H, S, d) -> (B, H, T, S)."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.scores_bits is None:
            return (q @ k.transpose(-1, -2)) * scale
        cq, s_q = self.q_quantizer(q)
        ck, s_k = self.k_quantizer(k)
        acc = int_matmul(cq, ck.transpose(-1, -2), self.scores_bits, f"{self.site}.scores")
        return _rescale(acc, s_q * s_k * scale, q.dtype)

    def values(self, p: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """P·V with dropout on P: (B, H, T, S) × (B, H, S, d) -> (B, H, T, d)."""
        if self.values_bits is None:
            return F.dropout(p, dropout, dropout > 0) @ v
        qmax = act_max(self.values_bits)
        cp = _Quantize.apply(p, p.new_tensor(1 / qmax), 0, qmax, False)  # the fixed grid k / qmax of [0, 1]
        if _RECORD is not None:
            _record("probability", f"{self.site}.p", cp, 0, qmax)
        if dropout > 0:
            cp = cp * torch.empty_like(cp).bernoulli_(1 - dropout)
        cv, s_v = self.v_quantizer(v)
        acc = int_matmul(cp, cv, self.values_bits, f"{self.site}.values")
        return _rescale(acc, s_v / (qmax * (1 - dropout)), p.dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        scores = self.scores(q, k).masked_fill(~mask, float("-inf"))
        y = self.values(torch.softmax(scores, dim=-1), v, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, frames, dim))


# --- plans --------------------------------------------------------------------------------------------------------

Bits = tuple[int, int]  # (w_bits, a_bits)


def native_targets(model: nn.Module) -> dict[str, str]:
    """Everything a native plan can quantize, by name, in ``named_modules`` order: ``"linear"``, ``"conv1d"``,
    ``"conv2d"``, ``"lstm"``, ``"embedding"`` modules, and for every Conformer SelfAttention ``<name>.scores`` (Q·Kᵀ)
    and ``<name>.values`` (P·V), the two products whose operands are both activations. The model's
    ``training_only`` modules (the CTC head) are left out: the device never runs them."""
    targets = {}
    training_only = tuple(getattr(model, "training_only", ()))
    for name, module in model.named_modules():
        if any(name == t or name.startswith(f"{t}.") for t in training_only):
            continue
        if isinstance(module, nn.Linear):
            targets[name] = "linear"
        elif isinstance(module, nn.Conv1d):
            targets[name] = "conv1d"
        elif isinstance(module, nn.Conv2d):
            targets[name] = "conv2d"
        elif isinstance(module, nn.LSTM):
            targets[name] = "lstm"
        elif isinstance(module, nn.Embedding):
            targets[name] = "embedding"
        elif isinstance(module, SelfAttention):
            targets[f"{name}.scores"] = "scores"
            targets[f"{name}.values"] = "values"
    return targets


def _matches(pattern: str, name: str) -> bool:
    """The pattern names the target or a module containing it (as :class:`~sub8.quant.plan.QuantPlan`)."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


class NativePlan:
    """Ordered ``(pattern, w_bits, a_bits)`` rules over :func:`native_targets`; the LAST matching rule wins, so a
    plan reads from general to specific. ``(pattern, None, None)`` leaves the matched targets in float. Patterns
    are ``fnmatch`` globs over target names or the names of modules containing them. For the attention products
    (``*.scores``, ``*.values``) both operands are activations: they take the rule's ``a_bits`` and its ``w_bits``
    is not used; an Embedding has no activation input and uses only ``w_bits``."""

    def __init__(self, rules: Iterable[tuple[str, int | None, int | None]]) -> None:
        rules = [tuple(rule) for rule in rules]
        if not rules:
            raise ValueError("NativePlan: the plan is empty; name at least one rule, e.g. ('*', 4, 8)")
        for rule in rules:
            if len(rule) != 3 or not isinstance(rule[0], str) or not rule[0]:
                raise ValueError(f"NativePlan: rule {rule!r} is not (pattern, w_bits, a_bits) with a non-empty pattern")
            pattern, w_bits, a_bits = rule
            if (w_bits is None) != (a_bits is None):
                raise ValueError(f"NativePlan: pattern {pattern!r}: give both w_bits and a_bits, or None for both "
                                 f"(left in float), got ({w_bits!r}, {a_bits!r})")
            if w_bits is not None:
                try:
                    _check_native_bits(w_bits, "weight")
                    _check_native_bits(a_bits, "activation")
                except ValueError as e:
                    raise ValueError(f"NativePlan: pattern {pattern!r}: {e}") from None
        self.rules: list[tuple[str, int | None, int | None]] = rules

    def to_list(self) -> list[list]:
        """Plain form for checkpoints and results: [[pattern, w_bits, a_bits], ...]."""
        return [list(rule) for rule in self.rules]

    @classmethod
    def from_list(cls, rules: list[list]) -> NativePlan:
        return cls([tuple(rule) for rule in rules])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NativePlan) and self.rules == other.rules

    def __repr__(self) -> str:
        return f"NativePlan({self.rules!r})"

    def resolve(self, model: nn.Module) -> dict[str, Bits]:
        """``{target: (w_bits, a_bits)}`` for every target the plan quantizes, in ``named_modules`` order. Raises
        ValueError when a pattern matches no target (naming the closest ones) or the plan quantizes nothing."""
        targets = native_targets(model)
        bits_of: dict[str, Bits | None] = {}
        for pattern, w_bits, a_bits in self.rules:
            hits = [name for name in targets if _matches(pattern, name)]
            if not hits:
                close = difflib.get_close_matches(pattern, list(targets), n=5, cutoff=0.5)
                raise ValueError(f"NativePlan: pattern {pattern!r} matches no quantizable target; closest: "
                                 f"{', '.join(close or list(targets)[:8])}")
            bits_of.update(dict.fromkeys(hits, None if w_bits is None else (w_bits, a_bits)))
        resolved = {name: bits for name in targets if (bits := bits_of.get(name)) is not None}
        if not resolved:
            raise ValueError("NativePlan: the plan leaves every target in float")
        return resolved


def native_plan(name: str, encoder: str = "conformer", attention_products: bool = True) -> NativePlan:
    """A named plan of the study for a ``"conformer"`` or ``"lstm"`` (RNN-T) transducer.

    - ``w8a8``, ``w4a8``, ``w4a4``: every weight at ``w`` bits, every matmul input at ``a`` bits.
    - ``mixed`` (Conformer only): attention and feed-forward blocks at w4a8; the convolution module, subsampling,
      predictor, joiner and CTC head at w8a8.

    ``attention_products=False`` leaves Q·Kᵀ and P·V in float (their inputs' projections stay quantized).
    """
    if encoder not in ("conformer", "lstm"):
        raise ValueError(f"native_plan: encoder {encoder!r} is not 'conformer' or 'lstm'")
    uniform = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
    if name in uniform:
        rules = [("*", *uniform[name])]
    elif name == "mixed":
        if encoder != "conformer":
            raise ValueError("native_plan: the 'mixed' plan is defined over the Conformer's blocks (attention, "
                             "feed-forward, convolution, subsampling); the RNN-T has w8a8 and w4a8")
        rules = [("*", 8, 8)] + [(f"transcriber.layers.*.{block}", 4, 8) for block in ("self_attn", "ffn1", "ffn2")]
    else:
        raise ValueError(f"native_plan: unknown plan {name!r}; choose one of {NATIVE_PLANS}")
    if not attention_products and encoder == "conformer":
        rules += [("*.scores", None, None), ("*.values", None, None)]
    return NativePlan(rules)


# --- wrapping and unwrapping --------------------------------------------------------------------------------------

_NATIVE_OF = {nn.Linear: NativeLinear, nn.Conv1d: NativeConv1d, nn.Conv2d: NativeConv2d, nn.LSTM: NativeLSTM,
              nn.Embedding: NativeEmbedding}
_NATIVE_TYPES = (*_NATIVE_OF.values(), NativeSelfAttention)


def _rebuild(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A ``cls`` instance with ``module``'s configuration holding the very same Parameter objects (so an
    optimizer that holds them keeps working, and the state_dict keys do not change). Built on the meta device:
    nothing is initialised only to be thrown away."""
    if isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, module.bias is not None, device="meta")
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros":
            raise ValueError(f"native QAT supports zero-padded convolutions only, got padding_mode "
                             f"{module.padding_mode!r}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.groups, module.bias is not None, device="meta")
    elif isinstance(module, nn.LSTM):
        if module.bidirectional or module.proj_size:
            raise ValueError("native QAT supports unidirectional LSTMs without projection")
        new = cls(module.input_size, module.hidden_size, module.num_layers, module.bias, module.batch_first,
                  module.dropout, device="meta")
    elif isinstance(module, nn.Embedding):
        new = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, module.max_norm, module.norm_type,
                  module.scale_grad_by_freq, module.sparse, device="meta")
    elif isinstance(module, SelfAttention):
        with torch.device("meta"):
            new = cls(module.qkv.in_features, module.num_heads, module.dropout)
        new.qkv, new.out = module.qkv, module.out
    else:
        raise TypeError(f"no native form for {type(module).__name__}")
    for name, param in module.named_parameters(recurse=False):
        setattr(new, name, param)
    new.train(module.training)
    return new


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def apply_native(model: nn.Module, plan: NativePlan, momentum: float = EMA_MOMENTUM) -> dict[str, Bits]:
    """Replace, in place, every module the plan quantizes by its native form (same parameters, same state_dict
    keys), with fresh (uncalibrated) activation ranges. Asserts the int32 accumulator bound of every static
    reduction first (OverflowError). Returns the resolved plan."""
    if any(isinstance(m, _NATIVE_TYPES) for m in model.modules()):
        raise ValueError("apply_native: the model already has native modules; remove_native first")
    resolved = plan.resolve(model)
    accumulator_report(model, plan)  # raises before anything is changed
    for name, kind in native_targets(model).items():
        if kind in ("scores", "values") or name not in resolved:
            continue
        module = model.get_submodule(name)
        w_bits, a_bits = resolved[name]
        device = next(module.parameters()).device
        new = _rebuild(module, _NATIVE_OF[type(module)] if type(module) in _NATIVE_OF else _native_class(module))
        new.w_bits, new.a_bits, new.site = w_bits, a_bits, name
        if kind == "lstm":
            new.input_quantizers = nn.ModuleList(
                ActivationQuantizer(a_bits, f"{name}.input_l{k}", momentum, device=device)
                for k in range(module.num_layers))
            # h = o·tanh(c) lies in (-1, 1): the recurrent range starts there (its first step needs a scale).
            new.hidden_quantizers = nn.ModuleList(
                ActivationQuantizer(a_bits, f"{name}.hidden_l{k}", momentum, init_range=(-1.0, 1.0), device=device)
                for k in range(module.num_layers))
        elif kind != "embedding":
            new.input_quantizer = ActivationQuantizer(a_bits, f"{name}.input", momentum, device=device)
        _set_module(model, name, new)
    for name, module in list(model.named_modules()):
        if not isinstance(module, SelfAttention):
            continue
        scores, values = resolved.get(f"{name}.scores"), resolved.get(f"{name}.values")
        if scores is None and values is None:
            continue
        device = module.qkv.weight.device
        new = _rebuild(module, NativeSelfAttention)
        new.site = name
        new.scores_bits = None if scores is None else scores[1]
        new.values_bits = None if values is None else values[1]
        if scores is not None:
            new.q_quantizer = ActivationQuantizer(scores[1], f"{name}.q", momentum, device=device)
            new.k_quantizer = ActivationQuantizer(scores[1], f"{name}.k", momentum, device=device)
        if values is not None:
            new.v_quantizer = ActivationQuantizer(values[1], f"{name}.v", momentum, device=device)
        _set_module(model, name, new)
    return resolved


def _native_class(module: nn.Module) -> type[nn.Module]:
    for base, native in _NATIVE_OF.items():
        if isinstance(module, base):
            raise TypeError(f"{type(module).__name__} is a subclass of {base.__name__}; native QAT wraps only "
                            f"plain {base.__name__} modules (its forward may differ)")
    raise TypeError(f"no native form for {type(module).__name__}")


_PLAIN_OF = {NativeLinear: nn.Linear, NativeConv1d: nn.Conv1d, NativeConv2d: nn.Conv2d, NativeLSTM: nn.LSTM,
             NativeEmbedding: nn.Embedding, NativeSelfAttention: SelfAttention}


def remove_native(model: nn.Module, hard_quantize: bool = True) -> None:
    """Put plain modules back, in place, holding the same Parameters; with ``hard_quantize``, first write the
    hard-quantized weights ``n · s`` into them (what QAT ends with)."""
    for name, module in reversed(list(model.named_modules())):  # children before the attention that holds them
        if not isinstance(module, _NATIVE_TYPES):
            continue
        if hard_quantize and isinstance(module, _NativeWeight):
            module.hard_quantize_()
        plain = _rebuild(module, _PLAIN_OF[type(module)])
        if isinstance(plain, nn.LSTM):
            plain.flatten_parameters()  # cuDNN wants its weights in one chunk; a no-op on the CPU
        _set_module(model, name, plain)


def activation_quantizers(model: nn.Module) -> dict[str, ActivationQuantizer]:
    return {m.site: m for m in model.modules() if isinstance(m, ActivationQuantizer)}


def activation_state(model: nn.Module) -> dict[str, Any]:
    """The calibrated ranges of a wrapped model in plain form (for checkpoints loaded with weights_only=True)."""
    quantizers = activation_quantizers(model).values()

    def stacked(attr: str) -> torch.Tensor:
        return torch.tensor([float(getattr(q, attr)) for q in quantizers], dtype=torch.float32)

    return {
        "sites": [q.site for q in quantizers],
        "bits": [q.bits for q in quantizers],
        "initialized": [q.initialized for q in quantizers],
        "running_min": stacked("running_min"),
        "running_max": stacked("running_max"),
    }


@torch.no_grad()
def load_activation_state(model: nn.Module, state: dict[str, Any]) -> None:
    quantizers = activation_quantizers(model)
    if list(quantizers) != list(state["sites"]) or [q.bits for q in quantizers.values()] != list(state["bits"]):
        missing = sorted(set(quantizers) - set(state["sites"]))
        extra = sorted(set(state["sites"]) - set(quantizers))
        raise ValueError(f"activation state does not fit this model and plan: sites missing from the state "
                         f"{missing[:5]}, sites the model lacks {extra[:5]} (or the bit widths differ)")
    for i, q in enumerate(quantizers.values()):
        q.running_min.copy_(state["running_min"][i])
        q.running_max.copy_(state["running_max"][i])
        q.initialized = bool(state["initialized"][i])


def activation_ranges(state: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per activation site of a saved state: site, bits, the EMA range, and the scale and zero point the
    device uses (for tables and figures of the learned ranges)."""
    rows = []
    for i, site in enumerate(state["sites"]):
        q = ActivationQuantizer(state["bits"][i], site, init_range=(float(state["running_min"][i]),
                                                                    float(state["running_max"][i])))
        scale, zero = q.scale_zero_point()
        rows.append({"site": site, "bits": q.bits, "min": float(q.running_min), "max": float(q.running_max),
                     "scale": float(scale), "zero_point": int(zero)})
    return rows


@contextmanager
def native_quantized(model: nn.Module, plan: NativePlan, activations: dict[str, Any]) -> Iterator[nn.Module]:
    """Run ``model`` (plain, with hard-quantized weights) as the device does inside the block: the plan's modules
    in native form with the saved activation ranges, frozen even in training mode. The plain modules (same
    Parameters, weights untouched) are back afterwards."""
    apply_native(model, plan)
    try:
        load_activation_state(model, activations)
        for q in activation_quantizers(model).values():
            q.frozen = True
        yield model
    finally:
        remove_native(model, hard_quantize=False)


# --- the training hooks -------------------------------------------------------------------------------------------


class NativeQAT(Hooks):
    """Native integer QAT as :class:`sub8.train.Hooks`: ``on_train_start`` wraps the plan's modules (fresh ranges,
    or the checkpoint's on resume); every forward runs integer matmuls of quantized weights and activations;
    ``on_train_end`` writes the hard-quantized weights and puts plain modules back. The activation ranges are in
    :meth:`state_dict` (``final.pt["hooks"]``); :meth:`evaluating` runs a model with them."""

    def __init__(self, plan: NativePlan, momentum: float = EMA_MOMENTUM) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"NativeQAT: momentum must be in [0, 1), got {momentum}")
        self.plan = plan
        self.momentum = momentum
        self._model: nn.Module | None = None  # the wrapped model, between on_train_start and on_train_end
        self._activations: dict[str, Any] | None = None  # the ranges once training ended (or were loaded)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> NativeQAT:
        """The hooks of a finished run, from its ``final.pt["hooks"]``: plan, momentum and activation ranges."""
        hooks = cls(NativePlan.from_list(state["plan"]), state["momentum"])
        hooks.load_state_dict(state)
        return hooks

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        apply_native(model, self.plan, self.momentum)
        self._model = model

    def on_train_end(self, model: nn.Module) -> None:
        self._activations = activation_state(model)
        remove_native(model, hard_quantize=True)
        self._model = None

    def state_dict(self) -> dict[str, Any]:
        activations = activation_state(self._model) if self._model is not None else self._activations
        return {"plan": self.plan.to_list(), "momentum": self.momentum, "activations": activations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if NativePlan.from_list(state["plan"]) != self.plan:
            raise ValueError(f"NativeQAT: the checkpoint was trained with plan {state['plan']}, these hooks have "
                             f"{self.plan.to_list()}")
        if self._model is not None:
            load_activation_state(self._model, state["activations"])
        else:
            self._activations = state["activations"]

    def quantizers(self, model: nn.Module) -> dict[str, UniformQuantizer]:
        """``{parameter name: UniformQuantizer(w_bits)}`` of every quantized weight (for export_quantized: on the
        hard-quantized weights it gives back exactly the codes and scales QAT ran)."""
        quantizers = {}
        for name, (w_bits, _) in self.plan.resolve(model).items():
            if name.endswith((".scores", ".values")):
                continue
            module = model.get_submodule(name)
            names = ([n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight")]
                     if isinstance(module, nn.LSTM) else ["weight"])
            quantizers.update({f"{name}.{n}": UniformQuantizer(w_bits) for n in names})
        return quantizers

    @contextmanager
    def evaluating(self, model: nn.Module) -> Iterator[nn.Module]:
        """The trained model with its activation ranges, as the device runs it (see :func:`native_quantized`).
        During training (the model still wrapped by these hooks) it is the model itself: put it in eval mode to
        freeze the ranges."""
        if model is self._model:
            yield model
            return
        if self._activations is None:
            raise RuntimeError("NativeQAT.evaluating: no activation ranges yet (train, or load_state_dict first)")
        with native_quantized(model, self.plan, self._activations) as native:
            yield native


# --- accounting ---------------------------------------------------------------------------------------------------


def activation_sites(model: nn.Module, plan: NativePlan) -> dict[str, int]:
    """``{site: a_bits}`` of every activation range the plan calibrates and the device stores (the fixed-grid
    attention probabilities need none)."""
    sites = {}
    targets = native_targets(model)
    for name, (_, a_bits) in plan.resolve(model).items():
        kind = targets[name]
        if kind in ("linear", "conv1d", "conv2d"):
            sites[f"{name}.input"] = a_bits
        elif kind == "lstm":
            for k in range(model.get_submodule(name).num_layers):
                sites[f"{name}.input_l{k}"] = sites[f"{name}.hidden_l{k}"] = a_bits
        elif kind == "scores":
            attn = name.rpartition(".")[0]
            sites[f"{attn}.q"] = sites[f"{attn}.k"] = a_bits
        elif kind == "values":
            sites[f"{name.rpartition('.')[0]}.v"] = a_bits
    return sites


def native_size(model: nn.Module, plan: NativePlan) -> dict[str, float]:
    """Bytes the device stores for ``model`` under ``plan``: every quantized weight as packed ``w_bits`` codes
    (⌈N·b/8⌉ bytes; the symmetric uniform code is the integer itself, no lookup table) plus a float32 scale per
    output channel; a float32 scale and a one-byte zero point per activation site; every other parameter
    (biases, norms, anything the plan leaves out) in float32. Also the float32 size and the ratio."""
    weights = weight_scales = 0
    quantized = set()
    for name, (w_bits, _) in plan.resolve(model).items():
        if name.endswith((".scores", ".values")):
            continue
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            if pname == "weight" or pname.startswith(("weight_ih_l", "weight_hh_l")):
                weights += -(-p.numel() * w_bits // 8)
                weight_scales += 4 * p.shape[0]
                quantized.add(f"{name}.{pname}")
    sites = activation_sites(model, plan)
    deployed = deployed_parameters(model)
    floats = sum(4 * p.numel() for n, p in deployed if n not in quantized)
    fp32 = sum(4 * p.numel() for _, p in deployed)
    total = weights + weight_scales + 5 * len(sites) + floats
    return {"weights": weights, "weight_scales": weight_scales, "activation_scales": 5 * len(sites),
            "float_params": floats, "total": total, "fp32": fp32, "ratio_vs_fp32": fp32 / total}


def accumulator_report(model: nn.Module, plan: NativePlan, frames: int = 1500) -> list[dict[str, Any]]:
    """Every integer reduction of ``model`` under ``plan``: its depth, operand bounds, the accumulator bound
    depth·|a|·|b|, and how many exact float32 pieces it runs in. P·V reduces over the keys, whose number depends on
    the utterance: reported for ``frames`` encoder frames (1500 × 40 ms = 60 s). Raises OverflowError (the
    emulator's int32 check) if any could overflow int32."""
    rows = []

    def row(site: str, depth: int, a_bits: int, a_max: int, b_bits: int, b_max: int) -> None:
        rows.append({"site": site, "depth": depth, "a_bits": a_bits, "b_bits": b_bits,
                     "bound": depth * a_max * b_max,
                     "float32_pieces": reduction_chunks(depth, a_bits, a_max, b_bits, b_max)})

    targets = native_targets(model)
    for name, (w_bits, a_bits) in plan.resolve(model).items():
        kind = targets[name]
        if kind == "embedding":
            continue
        module = model.get_submodule(name.rpartition(".")[0] if kind in ("scores", "values") else name)
        w, a = weight_max(w_bits), act_max(a_bits)
        if kind == "linear":
            row(name, module.in_features, a_bits, a, w_bits, w)
        elif kind in ("conv1d", "conv2d"):
            row(name, module.in_channels // module.groups * math.prod(module.kernel_size), a_bits, a, w_bits, w)
        elif kind == "lstm":
            for k in range(module.num_layers):
                row(f"{name}.input_l{k}", module.input_size if k == 0 else module.hidden_size, a_bits, a, w_bits, w)
                row(f"{name}.hidden_l{k}", module.hidden_size, a_bits, a, w_bits, w)
        elif kind == "scores":
            row(name, module.qkv.in_features // module.num_heads, a_bits, a, a_bits, a)
        else:
            row(name, frames, a_bits, a, a_bits, a)
    return rows


def export_native(model: nn.Module, hooks: NativeQAT) -> tuple[dict[str, QuantizedTensor], list[dict[str, Any]]]:
    """The device form of a model after native QAT: every quantized weight (codes, int8 LUT, the QAT scales,
    bit for bit) and every activation site's scale and zero point."""
    if hooks._activations is None:
        raise RuntimeError("export_native: the hooks hold no activation ranges (train, or load_state_dict first)")
    return export_quantized(model, hooks.quantizers(model)), activation_ranges(hooks._activations)
