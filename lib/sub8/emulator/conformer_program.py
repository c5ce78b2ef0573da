"""The Conformer transducer's encoder as an integer program for the int8 accelerator.

:func:`sub8.emulator.program.to_integer_program` converts a quantized Conformer transducer with this module's
encoder and :mod:`~sub8.emulator.program`'s predictor, joiner and greedy search (the same as the RNN-T's); the
weights, the biases, the calibration rule (percentile of |x| on dev utterances through the float fake-quant model)
and the requantization (fixed-point multiplier and shift, one named rounding) follow that module's rules. This
module holds what is particular to :class:`~sub8.models.conformer.ConformerTranscriber`, and runs the same
computation as its eval forward: the same causal subsampling and zero padding, the same chunked attention mask
(:func:`~sub8.models.conformer.attention_mask`, bounded look-ahead and ``left_chunks``), the same causal depthwise
convolution. A valid frame depends on no padding, so decoding does not depend on the batch.

The encoder (B batch, T input frames, T' = ceil(T / 4), F features, C subsampling channels, F' = ((F − 1)//2 − 1)//2,
D width, H heads, d = D / H, N ffn width, K depthwise kernel; every int8 tensor at its own calibrated scale)::

    input      feats (B, T, F) float32 ─quantize (s_feat), padding zeroed, padded to 4·T'→ int8
    subsample  conv 3×3 /2 (C) ─requant→ int8 ─ReLU (max(·, 0))→ conv 3×3 /2 (C) ─requant→ int8 ─ReLU
               ─(B, T', C·F') linear─requant→ x (B, T', D) int8
    layer ×L   x1 = add(x,  ½·FFN1(x))                   FFN: LN → linear ─requant→ int16 ─SiLU→ int8
               x2 = add(x1, MHSA(x1))                         → linear ─requant→ int8
               x3 = add(x2, CONV(x2))
               x4 = add(x3, ½·FFN2(x3));  x = LN(x4)
    MHSA       LN → q, k, v (B, H, T', d) int8 (three linears) ─q·kᵀ int32 ─requant (÷√d folded in)→ scores int8
               ─exp table → weights e (B, H, T', T') uint8 (255 at each row's max, 0 where masked)
               ─e·v int32 ÷ Σe (one rounding, per row)→ context int8 ─linear→ int8
    CONV       LN → pointwise linear (2D) ─requant→ int16 ─GLU→ int8 ─depthwise conv (K, causal)→ int8
               ─LN→ int8 ─SiLU→ int8 ─pointwise linear→ int8
    output     enc = the last layer's LN output (B, T', D) int8 → the joiner's enc_proj (program.py)

What is integer
---------------
Everything after the input quantization, per step:

* **Products**: every weight matmul and convolution is int8 × int8 (weights ``lut[codes]``) with int32
  accumulation and int32 bias, requantized per output channel by fixed-point multiplier and shift
  (:class:`~sub8.emulator.program.IntegerLinear`, :class:`IntegerConv`), and so are the two attention products:
  q·kᵀ is int8 × int8, e·v uint8 × int8 (int32 accumulators; :func:`~sub8.emulator.kernels.matmul_integer` asserts
  the int32 bound of every product before it runs, and :func:`accumulator_depths` at conversion).
* **Softmax** (:class:`IntegerAttention`): the exponential is a table of 256 uint8 entries over the int8 score
  differences ``max − s`` (``round(255 · exp(−(max − s)·s_score))``), built offline; normalisation is deferred
  past the e·v product: the int32 context accumulator is divided by the row's integer Σe and rescaled in one
  rounding (``acc · m / (Σe · 2^(31 − shift))``, int64). Why not the normalised uint8 probabilities of
  :class:`~sub8.emulator.kernels.IntegerSoftmax`: at their step 2^-8 a weight below 2^-9 rounds to zero, so a head
  spread evenly over more than 512 keys (20 s of context: every earlier chunk is visible) would lose them all;
  relative to the row's maximum the weights keep 8 bits however many keys share the mass, and Σe bounds the
  accumulator (|acc| ≤ 128 · Σe).
* **LayerNorm**: :class:`~sub8.emulator.kernels.IntegerLayerNorm` (integer mean, variance, square root).
* **SiLU and GLU** (:class:`IntegerGatedUnit`): ``x · sigmoid(g)`` with the SIGMOID int16 table of
  :mod:`~sub8.emulator.kernels` (Q3.12 in, Q0.15 out, ≤ 2^-14 error) and an int64 product requantized to int8. The
  linear before each is requantized to **int16** (its range mapped to 2^12 steps: 8× headroom), not int8, so that
  neither the SiLU's identity branch nor the GLU's value half is clipped or coarsened before the gate.
* **ReLU**: ``max(x, 0)``, exact on a symmetric grid.
* **Residual additions** (:class:`IntegerAdd`): both int8 inputs times fixed-point multipliers (``ADD_FRAC_BITS``
  fraction bits, the macaron ½ folded in) summed in int64 and rounded once to the int8 output scale.

What is float (:data:`FLOAT_OPS`)
---------------------------------
Per step, only the **quantization of the input features** to int8, as for the RNN-T (the float front end's
output entering the accelerator): the same single entry as :data:`sub8.emulator.program.FLOAT_OPS`. Nothing of
the Conformer needs a float vector unit. Offline, once: calibration, the multipliers, the tables, the biases.

Calibration sites (``encoder.…``, each an activation scale): int8 sites ``s = r / 127`` and int16 sites
(``ffn*.hidden``, ``conv.pointwise_in``) ``s = r / 2^12``, r the percentile of |x| over the valid frames (the
scores: over the (query, key) pairs the mask allows, valid queries only). The weights' all-zero rows, the bias
rounding and the rounding rules are :mod:`~sub8.emulator.program`'s.

Native QAT's trained activation ranges (and its 4-bit activations) are not used, as for the RNN-T: this program's
activations are int8 (int16 where said) at these calibrated scales.

Accuracy and cost (measured with :func:`~sub8.evaluate.decode`, 20,000-frame batches, one thread, on the first 500
utterances of the default profile's test split, 1009 s of audio): conformer_small-native-w8a8 fake-quant WER 10.10,
integer 9.73, 97.4% identical hypotheses; the fp32 conformer_small with 8-bit per-channel PTQ weights 10.10 and
10.10, 97.0%. The largest error source is the int8 residual stream: a frame of low spread carries its rounding
errors into the next LayerNorm, which divides them by that spread. Cost: the encoder is vectorised over batch and
time (no per-frame loop), in blocks of :data:`BLOCK_FRAMES` (see :meth:`IntegerConformerEncoder.__call__`); the
predictor and joiner loop per frame as for the RNN-T. CPU time ~0.017 × the audio for conformer_small (7 s for 406
s), within the issue's 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sub8.emulator.kernels import (
    ACT_FRAC_BITS,
    GATE_FRAC_BITS,
    SIGMOID,
    IntegerLayerNorm,
    Rounding,
    check_accumulator,
    conv_integer,
    matmul_integer,
    quantize_multiplier,
    requantize,
    rounding_divide,
    rounding_right_shift,
    saturate,
)
from sub8.emulator.program import (
    FLOAT_OPS,
    INT8_MAX,
    ConversionError,
    IntegerLinear,
    ProgramSource,
    int32_bias,
    _range,
    _record,
    int8_weight,
    quantize_features,
)
from sub8.models.conformer import SUBSAMPLING, ConformerTranscriber, attention_mask
from sub8.models.transducer import TransducerConfig

__all__ = [
    "FLOAT_OPS",
    "IntegerAdd",
    "IntegerAttention",
    "IntegerConformerEncoder",
    "IntegerConformerLayer",
    "IntegerConv",
    "IntegerConvModule",
    "IntegerFeedForward",
    "IntegerGatedUnit",
    "IntegerSubsampling",
    "accumulator_depths",
    "build_encoder",
    "calibrate_encoder",
    "check_encoder",
    "encoder_float_param_names",
    "encoder_weight_names",
]

INT16_STEPS = 2**12  # an int16 site's calibrated range r maps to 4096 steps: 8× headroom, resolution r / 4096
ADD_FRAC_BITS = 24  # fraction bits of the residual additions' multipliers (relative error ≤ 2^-24 / ratio)
EXP_MAX = 255  # the exponential table's value at a row's maximum score (uint8)
# e·v's int64 normalisation: |acc · m| < 128 · Σe · 2^31 and Σe · 2^(31 − shift) must stay below 2^62; with
# 31 − shift ≤ MAX_CONTEXT_RIGHT_SHIFT both hold for Σe < 2^24, i.e. up to MAX_KEYS keys (43 min of audio).
MAX_CONTEXT_RIGHT_SHIFT = 38
MAX_KEYS = (2**24 - 1) // EXP_MAX
BLOCK_FRAMES = 2000  # padded input frames the encoder runs at once (see IntegerConformerEncoder.__call__)

# The parameterised modules of a Conformer layer (relative to ``transcriber.layers.<k>``): weights quantized,
# biases float → int32; and its LayerNorms (gain and bias float → the integer LayerNorm).
_LAYER_WEIGHTS = ("ffn1.sequential.1", "ffn1.sequential.4", "self_attn.qkv", "self_attn.out",
                  "conv_module.pointwise_in", "conv_module.depthwise", "conv_module.pointwise_out",
                  "ffn2.sequential.1", "ffn2.sequential.4")
_LAYER_NORMS = ("ffn1.sequential.0", "self_attn_layer_norm", "conv_module.layer_norm", "conv_module.depthwise_norm",
                "ffn2.sequential.0", "final_layer_norm")
_SUBSAMPLING_WEIGHTS = ("subsampling.conv.1", "subsampling.conv.4", "subsampling.out")


# ---------------------------------------------------------------------------------------------------------------
# Integer operations
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerConv:
    """y = requant(conv(x, W) + b) to int8, for int8 x at one scale and symmetric int8 W; padding with zeros (the
    zero point), as the float model pads.

    Attributes:
        weight: (O, C / groups, *kernel) int8.
        bias: (O,) int32 at the scale x_scale · w_scale.
        mult: (m (O,), shift (O,)) from the accumulator scale to ``out_scale``.
        padding: (before, after) per spatial dim.
    """

    weight: np.ndarray
    bias: np.ndarray
    mult: tuple[np.ndarray, np.ndarray]
    out_scale: float
    stride: int
    padding: tuple[tuple[int, int], ...]
    groups: int
    rounding: Rounding
    name: str

    @classmethod
    def from_int8(cls, weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray, x_scale: float, out_scale: float,
                  stride: int, padding: tuple[tuple[int, int], ...], groups: int, rounding: Rounding,
                  name: str) -> IntegerConv:
        """weight (O, C / groups, *kernel) int8 with per-channel scale (O,), float bias (O,)."""
        acc_scale = x_scale * w_scale
        return cls(weight, int32_bias(bias, acc_scale, name), quantize_multiplier(acc_scale / out_scale),
                   out_scale, stride, padding, groups, rounding, name)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (N, C, *S) int8 → (N, O, *S_out) int8 at ``out_scale``."""
        acc = _record(f"{self.name}.acc", conv_integer(x, self.weight, 0, 0, self.stride, self.padding, self.groups,
                                                       self.bias))
        # Channels grouped by shift, each group requantized with one scalar shift: the same arithmetic as per
        # channel, but numpy divides by a scalar power of two ~5× faster than by a broadcast array of them (the
        # subsampling's (B, C, T/2, F/2) output is the encoder's largest tensor).
        m, shift = self.mult
        out = np.empty(acc.shape, np.int8)
        trailing = (1,) * (acc.ndim - 2)
        for value in np.unique(shift):
            channels = np.flatnonzero(shift == value)
            out[:, channels] = requantize(acc[:, channels], m[channels].reshape(-1, *trailing), int(value), 0,
                                          self.rounding, np.int8)
        return _record(self.name, out)


@dataclass(frozen=True)
class IntegerGatedUnit:
    """y = x · sigmoid(g) to int8: the GLU (x, g: the two halves of the pointwise expansion) and SiLU (g = x).

    g is requantized to Q3.12, the SIGMOID table's input (sigmoid is within 3.4e-4 of its limits beyond ±8, so
    saturating there costs nothing); the product x · sigmoid (x's scale · 2^-15, |·| < 2^30) is requantized once.

    Attributes:
        gate_mult: (m, shift) from g's scale to 2^-12.
        out_mult: (m, shift) from x's scale · 2^-15 to ``out_scale``.
    """

    gate_mult: tuple[np.ndarray, np.ndarray]
    out_mult: tuple[np.ndarray, np.ndarray]
    out_scale: float
    rounding: Rounding
    name: str

    @classmethod
    def from_scales(cls, x_scale: float, gate_scale: float, out_scale: float, rounding: Rounding,
                    name: str) -> IntegerGatedUnit:
        return cls(quantize_multiplier(gate_scale / 2.0**-GATE_FRAC_BITS),
                   quantize_multiplier(x_scale * 2.0**-ACT_FRAC_BITS / out_scale), out_scale, rounding, name)

    def __call__(self, x: np.ndarray, gate: np.ndarray | None = None) -> np.ndarray:
        """x: int8 or int16 (any shape); gate: the same shape, or None for SiLU (the gate is x) → int8."""
        r = self.rounding
        g = requantize(x if gate is None else gate, *self.gate_mult, 0, r, np.int16)
        product = x.astype(np.int64) * SIGMOID(g, r).astype(np.int64)
        return _record(self.name, requantize(product, *self.out_mult, 0, r, np.int8))


@dataclass(frozen=True)
class IntegerAdd:
    """y = a + b to int8 at the output scale: ``round((a · m_a + b · m_b) / 2^ADD_FRAC_BITS)`` in int64, with
    ``m = round(input scale / output scale · 2^ADD_FRAC_BITS)`` (a factor on an input, the macaron ½, folded in)."""

    a_mult: int
    b_mult: int
    rounding: Rounding
    name: str

    @classmethod
    def from_scales(cls, a_scale: float, b_scale: float, out_scale: float, rounding: Rounding,
                    name: str) -> IntegerAdd:
        mults = [round(s / out_scale * 2**ADD_FRAC_BITS) for s in (a_scale, b_scale)]
        if not all(1 <= m < 2**38 for m in mults):  # a · m_a + b · m_b < 2^46: int64 with room
            raise ConversionError(f"{name}: input/output scale ratios {a_scale / out_scale:g}, "
                                  f"{b_scale / out_scale:g} are outside [2^-{ADD_FRAC_BITS}, 2^14)")
        return cls(*mults, rounding, name)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a, b: int8 of one shape → int8."""
        total = a.astype(np.int64) * self.a_mult + b.astype(np.int64) * self.b_mult
        return _record(self.name, saturate(rounding_right_shift(total, ADD_FRAC_BITS, self.rounding), np.int8))


def _norm(norm: IntegerLayerNorm, x: np.ndarray, name: str) -> np.ndarray:
    return _record(name, norm(x))


# ---------------------------------------------------------------------------------------------------------------
# The blocks
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerSubsampling:
    """The causal ×4 subsampling: two stride-2 3×3 convolutions (one frame of zero padding before, in time) with
    ReLU, and the linear to the model width."""

    conv1: IntegerConv
    conv2: IntegerConv
    out: IntegerLinear

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (B, 4·T', F) int8 → (B, T', D) int8."""
        y = np.maximum(self.conv1(x[:, None]), 0)  # ReLU: exact, the grid is symmetric about 0
        y = np.maximum(self.conv2(y), 0)  # (B, C, T', F')
        batch, channels, frames, bins = y.shape
        return self.out(y.transpose(0, 2, 1, 3).reshape(batch, frames, channels * bins))


@dataclass(frozen=True)
class IntegerFeedForward:
    """LayerNorm → linear (to int16) → SiLU (to int8) → linear (to int8)."""

    norm: IntegerLayerNorm
    hidden: IntegerLinear
    silu: IntegerGatedUnit
    output: IntegerLinear
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (B, T', D) int8 → (B, T', D) int8."""
        return self.output(self.silu(self.hidden(_norm(self.norm, x, f"{self.name}.norm"))))


@dataclass(frozen=True)
class IntegerAttention:
    """Multi-head self-attention under the chunk mask, in integers (the module docstring's MHSA).

    Attributes:
        query, key, value: the rows of the qkv linear, each to int8 at its own scale.
        score_mult: (m, shift) from s_q · s_k to s_score / √d (the softmax's 1/√d folded in).
        exp_table: (256,) uint8, ``round(255 · exp(−j · s_score))`` for a score j steps below its row's maximum.
        context_mult: (m, shift) from s_v to the context's scale (Σe's 255 at the maximum cancels with the division).
    """

    norm: IntegerLayerNorm
    query: IntegerLinear
    key: IntegerLinear
    value: IntegerLinear
    score_mult: tuple[np.ndarray, np.ndarray]
    exp_table: np.ndarray
    context_mult: tuple[np.ndarray, np.ndarray]
    out: IntegerLinear
    heads: int
    rounding: Rounding
    name: str

    @staticmethod
    def build_exp_table(score_scale: float) -> np.ndarray:
        """(256,) uint8: the weight of a score ``j`` int8 steps below its row's maximum, relative to the maximum's
        255."""
        return np.rint(EXP_MAX * np.exp(-np.arange(256) * score_scale)).astype(np.uint8)

    def _heads(self, x: np.ndarray) -> np.ndarray:
        """(B, T', D) → (B, H, T', d)."""
        batch, frames, dim = x.shape
        return x.reshape(batch, frames, self.heads, dim // self.heads).transpose(0, 2, 1, 3)

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x: (B, T', D) int8; mask: (B, 1, T', T') bool, True where query t may attend to key s → (B, T', D) int8."""
        r, n = self.rounding, self.name
        if x.shape[1] > MAX_KEYS:
            raise ValueError(f"{n}: {x.shape[1]} frames exceed the {MAX_KEYS} keys the normalisation supports")
        y = _norm(self.norm, x, f"{n}.norm")
        q, k, v = (self._heads(linear(y)) for linear in (self.query, self.key, self.value))
        acc = _record(f"{n}.scores.acc", matmul_integer(q, k.transpose(0, 1, 3, 2)))  # (B, H, T', T'), depth d
        scores = _record(f"{n}.scores", requantize(acc, *self.score_mult, 0, r, np.int8)).astype(np.int16)
        # Each row's maximum over the keys it may see; a query always sees itself, so every row has one.
        row_max = np.where(mask, scores, -128).max(axis=-1, keepdims=True)
        weights = _record(f"{n}.weights", np.where(mask, self.exp_table[np.clip(row_max - scores, 0, 255)], 0)
                          .astype(np.uint8))
        context = _record(f"{n}.context.acc", matmul_integer(weights, v))  # (B, H, T', d), |·| ≤ 128 · Σe
        total = weights.sum(axis=-1, keepdims=True, dtype=np.int64)  # ≥ 255
        m, shift = self.context_mult
        context = saturate(rounding_divide(context.astype(np.int64) * m, total << (31 - shift), r), np.int8)
        batch, _, frames, _ = context.shape
        context = _record(f"{n}.context", context.transpose(0, 2, 1, 3).reshape(batch, frames, -1))
        return self.out(context)


@dataclass(frozen=True)
class IntegerConvModule:
    """LayerNorm → pointwise linear (to int16) → GLU → causal depthwise conv → LayerNorm → SiLU → pointwise linear."""

    norm: IntegerLayerNorm
    pointwise_in: IntegerLinear
    glu: IntegerGatedUnit
    depthwise: IntegerConv
    depthwise_norm: IntegerLayerNorm
    silu: IntegerGatedUnit
    pointwise_out: IntegerLinear
    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (B, T', D) int8 → (B, T', D) int8."""
        value, gate = np.split(self.pointwise_in(_norm(self.norm, x, f"{self.name}.norm")), 2, axis=-1)
        y = self.depthwise(self.glu(value, gate).transpose(0, 2, 1)).transpose(0, 2, 1)
        return self.pointwise_out(self.silu(_norm(self.depthwise_norm, y, f"{self.name}.depthwise_norm")))


@dataclass(frozen=True)
class IntegerConformerLayer:
    """½ FFN, self-attention, convolution module, ½ FFN, each added to the residual stream (int8), final LayerNorm."""

    ffn1: IntegerFeedForward
    add_ffn1: IntegerAdd
    attn: IntegerAttention
    add_attn: IntegerAdd
    conv: IntegerConvModule
    add_conv: IntegerAdd
    ffn2: IntegerFeedForward
    add_ffn2: IntegerAdd
    final_norm: IntegerLayerNorm
    name: str

    def __call__(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """x: (B, T', D) int8, mask (B, 1, T', T') bool → (B, T', D) int8."""
        x = self.add_ffn1(x, self.ffn1(x))
        x = self.add_attn(x, self.attn(x, mask))
        x = self.add_conv(x, self.conv(x))
        x = self.add_ffn2(x, self.ffn2(x))
        return _norm(self.final_norm, x, f"{self.name}.final_norm")


@dataclass(frozen=True)
class IntegerConformerEncoder:
    """The integer :class:`~sub8.models.conformer.ConformerTranscriber` (an
    :class:`~sub8.emulator.program.EncoderProgram`).

    Attributes:
        out_scale: the scale of ``enc``, the last layer's LayerNorm output (the joiner's input).
    """

    input_dim: int
    out_dim: int
    feat_scale: float
    subsampling: IntegerSubsampling
    layers: tuple[IntegerConformerLayer, ...]
    chunk_frames: int
    left_chunks: int | None
    out_scale: float
    rounding: Rounding

    def __call__(self, feats: np.ndarray, feat_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """feats (B, T, F) float32, feat_lens (B,) int64 → enc (B, T', D) int8, out_lens (B,) int64, T' = ceil(T / 4).

        Runs on blocks of consecutive utterances of at most ``BLOCK_FRAMES`` padded input frames (one utterance
        if longer), each trimmed to its longest: a decoding batch of 20,000 frames makes int64 temporaries of
        hundreds of MB, and numpy's passes over them are memory-bound (measured: 2.2× the CPU time of 8-utterance
        blocks). A valid frame depends on no padding, so blocking changes no valid output; frames past an
        utterance's end (``out_lens``) are set to 0, so the output does not depend on the batch at all."""
        out_lens = (feat_lens + SUBSAMPLING - 1) // SUBSAMPLING
        batch = feats.shape[0]
        enc = np.zeros((batch, -(-feats.shape[1] // SUBSAMPLING), self.out_dim), np.int8)
        start = 0
        while start < batch:
            stop = start + 1
            while stop < batch and (stop + 1 - start) * feat_lens[start:stop + 1].max() <= BLOCK_FRAMES:
                stop += 1
            frames = int(out_lens[start:stop].max())
            enc[start:stop, :frames] = self._encode(feats[start:stop, : frames * SUBSAMPLING], feat_lens[start:stop])
            start = stop
        enc[np.arange(enc.shape[1])[None, :] >= out_lens[:, None]] = 0  # padding, whichever block it was in
        return enc, out_lens

    def _encode(self, feats: np.ndarray, feat_lens: np.ndarray) -> np.ndarray:
        """One block: feats (b, T, F), T ≤ 4 · ceil(max(feat_lens) / 4) → (b, ceil(T / 4), D) int8."""
        x = _record("encoder.input", quantize_features(feats, feat_lens, self.feat_scale, SUBSAMPLING, self.rounding))
        x = self.subsampling(x)
        out_lens = (feat_lens + SUBSAMPLING - 1) // SUBSAMPLING
        mask = attention_mask(torch.from_numpy(out_lens), x.shape[1], self.chunk_frames, self.left_chunks).numpy()
        for layer in self.layers:
            x = layer(x, mask)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def _layer_prefix(k: int) -> str:
    return f"transcriber.layers.{k}"


def encoder_weight_names(config: TransducerConfig) -> list[str]:
    """The quantized weights of the Conformer encoder (every one must be in the export)."""
    return [*(f"transcriber.{m}.weight" for m in _SUBSAMPLING_WEIGHTS),
            *(f"{_layer_prefix(k)}.{m}.weight" for k in range(config.conformer_layers) for m in _LAYER_WEIGHTS)]


def encoder_float_param_names(config: TransducerConfig) -> list[str]:
    """Its float parameters: every linear and convolution bias, every LayerNorm's gain and bias."""
    layers = [f"{_layer_prefix(k)}.{m}.bias" for k in range(config.conformer_layers) for m in _LAYER_WEIGHTS]
    norms = [f"{_layer_prefix(k)}.{m}.{kind}" for k in range(config.conformer_layers) for m in _LAYER_NORMS
             for kind in ("weight", "bias")]
    return [*(f"transcriber.{m}.bias" for m in _SUBSAMPLING_WEIGHTS), *layers, *norms]


def check_encoder(model: nn.Module) -> None:
    """Raise :class:`~sub8.emulator.program.ConversionError` for a Conformer encoder the integer program does not
    run: not a :class:`~sub8.models.conformer.ConformerTranscriber`, a LayerNorm without gain and bias or with
    another eps than the others, a linear or convolution without bias. (Parameters it has no place for are
    :func:`~sub8.emulator.program.to_integer_program`'s check.)"""
    transcriber = model.transcriber
    if not isinstance(transcriber, ConformerTranscriber):
        raise ConversionError(f"transcriber: expected a ConformerTranscriber, got {type(transcriber).__name__}")
    norms = {name: m for name, m in transcriber.named_modules() if isinstance(m, nn.LayerNorm)}
    for name, norm in norms.items():
        if not norm.elementwise_affine or norm.bias is None:
            raise ConversionError(f"transcriber.{name}: expected an affine nn.LayerNorm with a bias, got {norm}")
    eps = {norm.eps for norm in norms.values()}
    if len(eps) > 1:
        raise ConversionError(f"the encoder's LayerNorms have different eps {sorted(eps)}; one is supported")
    for name, m in transcriber.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.bias is None:
            raise ConversionError(f"transcriber.{name}: a linear or convolution without bias is not supported")


def accumulator_depths(config: TransducerConfig) -> dict[str, int]:
    """The reduction depth of every int8 × int8 product of the encoder whose depth the shapes fix (per layer the
    same): ``{product: depth}``. (e·v's depth is the number of keys; its bound is Σe, see :data:`MAX_KEYS`.)"""
    channels = config.conformer_subsampling_channels
    bins = ((config.input_dim - 1) // 2 - 1) // 2
    dim = config.conformer_dim
    return {"subsampling.conv1": 9, "subsampling.conv2": 9 * channels, "subsampling.out": channels * bins,
            "ffn.hidden": dim, "ffn.output": config.conformer_ffn_dim, "attn.qkv": dim,
            "attn.scores": dim // config.conformer_heads, "attn.out": dim, "conv.pointwise_in": dim,
            "conv.depthwise": config.conformer_conv_kernel, "conv.pointwise_out": dim}


def build_encoder(config: TransducerConfig, source: ProgramSource) -> IntegerConformerEncoder:
    """The integer encoder from the packed weights, float biases and norms, and activation scales of ``source``."""
    for product, depth in accumulator_depths(config).items():
        try:
            check_accumulator(depth)
        except OverflowError as e:
            raise ConversionError(f"{product}: {e}") from None
    packed, floats, scales, r = source.packed, source.float_params, source.activation_scales, source.rounding

    def weight(module: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        w, w_scale = int8_weight(packed[f"{module}.weight"])
        return w, w_scale, floats[f"{module}.bias"].astype(np.float64)

    def linear(module: str, x_scale: float, site: str, dtype: type = np.int8,
               rows: slice = slice(None)) -> IntegerLinear:
        w, w_scale, bias = weight(module)
        return IntegerLinear.from_int8(w[rows], w_scale[rows], bias[rows], x_scale, scales[site], dtype, r, site)

    def norm(module: str, x_scale: float, site: str) -> IntegerLayerNorm:
        return IntegerLayerNorm.from_float(floats[f"{module}.weight"].astype(np.float64),
                                           floats[f"{module}.bias"].astype(np.float64), source.norm_eps, x_scale, 0,
                                           scales[site], 0, r)

    def conv(module: str, x_scale: float, site: str, stride: int, padding: tuple[tuple[int, int], ...],
             groups: int) -> IntegerConv:
        return IntegerConv.from_int8(*weight(module), x_scale, scales[site], stride, padding, groups, r, site)

    def feed_forward(module: str, x_scale: float, site: str) -> IntegerFeedForward:
        hidden = linear(f"{module}.sequential.1", scales[f"{site}.norm"], f"{site}.hidden", np.int16)
        return IntegerFeedForward(
            norm(f"{module}.sequential.0", x_scale, f"{site}.norm"), hidden,
            IntegerGatedUnit.from_scales(hidden.out_scale, hidden.out_scale, scales[f"{site}.silu"], r,
                                         f"{site}.silu"),
            linear(f"{module}.sequential.4", scales[f"{site}.silu"], f"{site}.out"), site)

    def attention(layer: str, x_scale: float, site: str) -> IntegerAttention:
        dim, heads = config.conformer_dim, config.conformer_heads
        s_norm = scales[f"{site}.norm"]
        q, k, v = (linear(f"{layer}.self_attn.qkv", s_norm, f"{site}.{part}", rows=slice(i * dim, (i + 1) * dim))
                   for i, part in enumerate(("query", "key", "value")))
        context_mult = quantize_multiplier(v.out_scale / scales[f"{site}.context"])
        if 31 - context_mult[1] > MAX_CONTEXT_RIGHT_SHIFT:
            raise ConversionError(f"{site}: the context's scale is over 2^7 times the values' scale")
        return IntegerAttention(
            norm(f"{layer}.self_attn_layer_norm", x_scale, f"{site}.norm"), q, k, v,
            quantize_multiplier(q.out_scale * k.out_scale / (math.sqrt(dim // heads) * scales[f"{site}.scores"])),
            IntegerAttention.build_exp_table(scales[f"{site}.scores"]), context_mult,
            linear(f"{layer}.self_attn.out", scales[f"{site}.context"], f"{site}.out"), heads, r, site)

    def conv_module(module: str, x_scale: float, site: str) -> IntegerConvModule:
        pointwise_in = linear(f"{module}.pointwise_in", scales[f"{site}.norm"], f"{site}.pointwise_in", np.int16)
        s_in = pointwise_in.out_scale
        return IntegerConvModule(
            norm(f"{module}.layer_norm", x_scale, f"{site}.norm"), pointwise_in,
            IntegerGatedUnit.from_scales(s_in, s_in, scales[f"{site}.glu"], r, f"{site}.glu"),
            conv(f"{module}.depthwise", scales[f"{site}.glu"], f"{site}.depthwise", 1,
                 ((config.conformer_conv_kernel - 1, 0),), config.conformer_dim),
            norm(f"{module}.depthwise_norm", scales[f"{site}.depthwise"], f"{site}.depthwise_norm"),
            IntegerGatedUnit.from_scales(scales[f"{site}.depthwise_norm"], scales[f"{site}.depthwise_norm"],
                                         scales[f"{site}.silu"], r, f"{site}.silu"),
            linear(f"{module}.pointwise_out", scales[f"{site}.silu"], f"{site}.pointwise_out"), site)

    time_pad = ((1, 0), (0, 0))  # one frame before in time, none in frequency
    subsampling = IntegerSubsampling(
        conv("transcriber.subsampling.conv.1", scales["features"], "encoder.subsampling.conv1", 2, time_pad, 1),
        conv("transcriber.subsampling.conv.4", scales["encoder.subsampling.conv1"], "encoder.subsampling.conv2", 2,
             time_pad, 1),
        linear("transcriber.subsampling.out", scales["encoder.subsampling.conv2"], "encoder.subsampling.out"))
    layers = []
    x_scale = scales["encoder.subsampling.out"]
    for k in range(config.conformer_layers):
        module, site = _layer_prefix(k), f"encoder.layers.{k}"

        def add(a_scale: float, b_scale: float, name: str) -> IntegerAdd:
            return IntegerAdd.from_scales(a_scale, b_scale, scales[f"{site}.{name}"], r, f"{site}.{name}")

        ffn1 = feed_forward(f"{module}.ffn1", x_scale, f"{site}.ffn1")
        add_ffn1 = add(x_scale, 0.5 * scales[f"{site}.ffn1.out"], "add_ffn1")
        attn = attention(module, scales[f"{site}.add_ffn1"], f"{site}.attn")
        add_attn = add(scales[f"{site}.add_ffn1"], scales[f"{site}.attn.out"], "add_attn")
        conv_mod = conv_module(f"{module}.conv_module", scales[f"{site}.add_attn"], f"{site}.conv")
        add_conv = add(scales[f"{site}.add_attn"], scales[f"{site}.conv.pointwise_out"], "add_conv")
        ffn2 = feed_forward(f"{module}.ffn2", scales[f"{site}.add_conv"], f"{site}.ffn2")
        add_ffn2 = add(scales[f"{site}.add_conv"], 0.5 * scales[f"{site}.ffn2.out"], "add_ffn2")
        final = norm(f"{module}.final_layer_norm", scales[f"{site}.add_ffn2"], f"{site}.final_norm")
        layers.append(IntegerConformerLayer(ffn1, add_ffn1, attn, add_attn, conv_mod, add_conv, ffn2, add_ffn2,
                                            final, site))
        x_scale = scales[f"{site}.final_norm"]
    return IntegerConformerEncoder(config.input_dim, config.conformer_dim, scales["features"], subsampling,
                                   tuple(layers), config.conformer_chunk_frames, config.conformer_left_chunks, x_scale,
                                   r)


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------


def _frames_valid(lens: torch.Tensor, frames: int, reduction: int) -> torch.Tensor:
    """(B, frames) bool: frame t (after a time reduction by ``reduction``) is within ceil(len / reduction)."""
    return torch.arange(frames)[None, :] < ((lens + reduction - 1) // reduction)[:, None]


@torch.no_grad()
def calibrate_encoder(reference: nn.Module, feats: torch.Tensor, lens: torch.Tensor,
                      percentile: float) -> dict[str, float]:
    """The Conformer encoder's activation scales (site → scale) from the float fake-quant model (eval mode) on
    padded calibration features (B, T, F) and lengths (B,): every module's input and output is captured by a
    forward hook during one ``encode``, and the values no module outputs (scores, GLU, SiLU of the conv module)
    are computed from them as the model does. Rule: the module docstring's."""
    transcriber = reference.transcriber
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [module.register_forward_hook(
        lambda m, args, out, name=name: captured.__setitem__(name, (args[0] if args else None, out)))
        for name, module in transcriber.named_modules() if name]
    try:
        enc, out_lens = reference.encode(feats, lens)
    finally:
        for hook in hooks:
            hook.remove()

    def output(module: str) -> torch.Tensor:
        return captured[module][1]

    def layer_input(module: str) -> torch.Tensor:
        return captured[module][0]

    valid = _frames_valid(lens, enc.shape[1], SUBSAMPLING)  # (B, T')
    input_valid = torch.arange(feats.shape[1])[None, :] < lens[:, None]
    int8 = {"features": feats[input_valid],
            "encoder.subsampling.conv1": output("subsampling.conv.2").transpose(1, 2)[
                _frames_valid(lens, output("subsampling.conv.2").shape[2], 2)],
            "encoder.subsampling.conv2": output("subsampling.conv.5").transpose(1, 2)[
                _frames_valid(lens, output("subsampling.conv.5").shape[2], SUBSAMPLING)],
            "encoder.subsampling.out": output("subsampling.out")[valid]}
    int16 = {}
    mask = attention_mask(out_lens, enc.shape[1], transcriber.chunk_frames, transcriber.left_chunks)
    pairs = mask & valid[:, None, :, None]  # (B, 1, T', T'): allowed keys of valid queries
    for k, layer in enumerate(transcriber.layers):
        m, site = f"layers.{k}", f"encoder.layers.{k}"
        for ffn in ("ffn1", "ffn2"):
            int8[f"{site}.{ffn}.norm"] = output(f"{m}.{ffn}.sequential.0")[valid]
            int16[f"{site}.{ffn}.hidden"] = output(f"{m}.{ffn}.sequential.1")[valid]
            int8[f"{site}.{ffn}.silu"] = output(f"{m}.{ffn}.sequential.2")[valid]
            int8[f"{site}.{ffn}.out"] = output(f"{m}.{ffn}.sequential.4")[valid]
        int8[f"{site}.add_ffn1"] = layer_input(f"{m}.self_attn_layer_norm")[valid]
        int8[f"{site}.attn.norm"] = output(f"{m}.self_attn_layer_norm")[valid]
        qkv = output(f"{m}.self_attn.qkv")
        batch, frames, width = qkv.shape
        heads = layer.self_attn.num_heads
        q, key, v = qkv.view(batch, frames, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4)
        for part, x in zip(("query", "key", "value"), (q, key, v)):
            int8[f"{site}.attn.{part}"] = x.transpose(1, 2)[valid]
        scores = q @ key.transpose(-1, -2) / math.sqrt(q.shape[-1])  # what scaled_dot_product_attention scales
        int8[f"{site}.attn.scores"] = scores[pairs.expand_as(scores)]
        int8[f"{site}.attn.context"] = layer_input(f"{m}.self_attn.out")[valid]
        int8[f"{site}.attn.out"] = output(f"{m}.self_attn.out")[valid]
        int8[f"{site}.add_attn"] = layer_input(f"{m}.conv_module")[valid]
        int8[f"{site}.conv.norm"] = output(f"{m}.conv_module.layer_norm")[valid]
        pointwise_in = output(f"{m}.conv_module.pointwise_in")
        int16[f"{site}.conv.pointwise_in"] = pointwise_in[valid]
        int8[f"{site}.conv.glu"] = F.glu(pointwise_in, dim=-1)[valid]
        int8[f"{site}.conv.depthwise"] = output(f"{m}.conv_module.depthwise").transpose(1, 2)[valid]
        depthwise_norm = output(f"{m}.conv_module.depthwise_norm")
        int8[f"{site}.conv.depthwise_norm"] = depthwise_norm[valid]
        int8[f"{site}.conv.silu"] = F.silu(depthwise_norm)[valid]
        int8[f"{site}.conv.pointwise_out"] = output(f"{m}.conv_module.pointwise_out")[valid]
        int8[f"{site}.add_conv"] = layer_input(f"{m}.ffn2")[valid]
        int8[f"{site}.add_ffn2"] = layer_input(f"{m}.final_layer_norm")[valid]
        int8[f"{site}.final_norm"] = output(f"{m}.final_layer_norm")[valid]
    return ({site: _range(x, percentile) / INT8_MAX for site, x in int8.items()}
            | {site: _range(x, percentile) / INT16_STEPS for site, x in int16.items()})
