"""A quantized transducer as an integer program for the int8 accelerator, and its greedy decoding.

Scope: the **RNN-T** (``encoder="lstm"``: LSTM transcriber, predictor, joiner) here, and the **Conformer
transducer** (``encoder="conformer"``), whose integer encoder is :mod:`sub8.emulator.conformer_program`; the
predictor, the joiner, the greedy search, the calibration rule, the conversion of the weights and the packed file
are this module's and serve both (:func:`to_integer_program` and :func:`build_program` take either). What follows
describes the RNN-T; the Conformer's encoder, and what of it runs in float, is described in that module.

The program (B batch, T input frames, S frames stacked, T' = ceil(T / S), F features, D encoder width, E embedding
width, H predictor width, J joint width, V vocabulary with blank = 0)::

    encoder    feats (B, T, F) float32 ─quantize (s_feat)→ int8 ─stack S frames→ (B, T', S·F) int8
               ─IntegerLSTMCell per layer per step (int16 Q4.11 cell state)→ (B, T', D) int8
               ─IntegerLayerNorm→ enc (B, T', D) int8 (s_enc)
               ─enc_proj: int32 accumulator + int32 bias, requantized per channel→ (B, T', J) int16 Q3.12
    predictor  token ─embedding row lut[codes] (int8), requantized per row to s_emb→ (B, E) int8
               ─IntegerLSTMCell per layer→ (B, H) int8 ─pred_proj→ (B, J) int16 Q3.12 (once per emitted token)
    joiner     sat16(enc16[t] + pred16) Q3.12 ─TANH table→ Q0.15 int16 ─requantize→ int8 (scale 1/127)
               ─output linear: int32 accumulator + int32 bias ─requantize per channel to one scale→ (B, V) int32
               ─argmax (no softmax: greedy search needs only the largest logit)

Conversion rules
----------------
* **Weights**: the int8 values the device multiplies, ``lut[codes]`` (b-bit codes expanded through their int8 lookup
  table, :meth:`PackedTensor.int8_weight`), so uniform, S8BQAT, GQ and native exports all convert the same way.
  Their float scale (per output channel or per tensor) is folded into the requantization multiplier of the layer's
  accumulator, ``s_in · s_w[c] / s_out``. A row whose codes are all zero may carry a degenerate scale (the
  quantizers clamp it to float32's ``tiny``); any scale represents a zero row exactly, so it gets the tensor's
  largest row scale, which keeps its multiplier and bias in range.
* **Biases**: int32 at the accumulator's scale ``s_in · s_w[c]``, rounded half to even (offline); a bias that does
  not fit is an ``OverflowError`` naming the layer. An LSTM's two biases are summed first.
* **Activations**: int8, symmetric (zero point 0), one scale per tensor, fixed offline. Calibrated sites run a few
  calibration utterances (:func:`calibration_features`, from the dev split) through the float **fake-quant** model
  (the float model with exactly the exported weights, :func:`fake_quant_model`). Rule: ``s = r / 127`` with ``r``
  the ``percentile``-th percentile (default 99.99; 100 is max-abs) of ``|x|`` over the valid (unpadded) positions.
  Calibrated: the stacked input features and the encoder's LayerNorm output. Fixed by a bound, no data: every LSTM
  hidden state (encoder and predictor) at ``r = 1`` (|o·tanh(c)| < 1; a calibrated h scale clipped hidden states of
  test utterances beyond the calibration set's range, up to 13 steps of error per layer on the synthetic test model,
  against ≤ 1.3 with the bound; ``hidden="calibrated"`` keeps the percentile rule, capped at 1, on the encoder's
  frames and on the token paths the fake-quant model decodes); the embedding, ``s_emb`` = the table's own max-abs /
  127, so its per-row requantization never saturates; the joint sum in Q3.12 (±8 covers tanh's non-saturated input);
  the tanh output at 1/127 (its range is (−1, 1)). Native QAT's trained activation ranges (and its 4-bit
  activations, where its plan has them) are not used: this program's activations are int8 with these scales.
* **Requantization**: fixed-point multiplier and shift (:func:`~sub8.emulator.kernels.quantize_multiplier`, 31-bit
  mantissa) with one named rounding rule (``"half_to_even"`` by default, or ``"half_away_from_zero"``) applied to
  the exact rational value, then saturation to the target dtype. The logits: the output layer's per-channel
  accumulators are requantized to one common int32 scale, the coarsest channel's ``s_t · s_w``: every multiplier
  is then ≤ 1, so the int32 logits cannot saturate and greedy argmax compares like with like.
* **LSTM**: :class:`~sub8.emulator.kernels.IntegerLSTMCell` per layer per step: int8 x and h, int16 gate
  pre-activations (Q3.12), sigmoid/tanh by int16 tables, int16 cell state (Q4.11). The LayerNorm:
  :class:`~sub8.emulator.kernels.IntegerLayerNorm` (integer mean, variance and square root).

What runs in float (:data:`FLOAT_OPS`): per step, only the **quantization of the input features** to int8 (the
boundary between the float front end — log-mel and CMVN, outside this program — and the accelerator). Offline,
once: calibration, the multipliers, the tables, the bias rounding.

Decoding cost (numpy, one process, not benchmarked here): per encoder step and layer one cell call on the whole
batch; per frame one joiner call for the utterances still emitting and one predictor step (on the emitting rows
only) when any emitted. The cell's int64 pointwise passes over (B, 4H) arrays and :func:`matmul_integer`'s float64
copy of the weight on every call dominate, so batching amortises them. Estimate for rnnt_small (3×256) at decode's
20,000-frame batches (~50 utterances): ~7 ms per cell call, ~3 s per batch of ~200 s of audio, RTF ~0.015 on one
free core — within the issue's 0.05, with less margin on a loaded machine. (Seen: the 2×32 smoke model decoded the
smoke test split, 125 s of audio, in 1.3 s.)
"""

from __future__ import annotations

import contextvars
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from sub8.emulator.kernels import (
    ACT_FRAC_BITS,
    GATE_FRAC_BITS,
    TANH,
    IntegerLayerNorm,
    IntegerLSTMCell,
    Rounding,
    ROUNDING_RULES,
    matmul_integer,
    quantize_multiplier,
    requantize,
    saturate,
)
from sub8.emulator.packing import PackedTensor, load_packed_model, save_packed_model
from sub8.models.transducer import BLANK, TransducerConfig

CALIBRATION_PERCENTILE = 99.99
INT8_MAX = 127
TANH_OUT_SCALE = 1.0 / INT8_MAX  # tanh ∈ (−1, 1): the whole int8 range, no calibration needed
MIN_RANGE = 1e-4  # floor of a calibrated range: a site that is always ~0 still gets multipliers in range
PROGRAM_KIND = "sub8.integer_rnnt"
PROGRAM_VERSION = 1
HiddenRule = Literal["bound", "calibrated"]
HIDDEN_RULES: tuple[str, ...] = ("bound", "calibrated")

FLOAT_OPS: tuple[str, ...] = (
    "input features → int8 (x / s_feat, rounded by the named rule, saturated): the float front end's output "
    "entering the accelerator, once per 10 ms frame",
)


class ConversionError(ValueError):
    """A model the converter cannot turn into an integer program; the message says which piece and why."""


# ---------------------------------------------------------------------------------------------------------------
# Recording intermediates (tests and notebooks check that every one is integer)
# ---------------------------------------------------------------------------------------------------------------


class Intermediate(NamedTuple):
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    lo: int
    hi: int


_RECORD: contextvars.ContextVar[list[Intermediate] | None] = contextvars.ContextVar("sub8_program_record", default=None)


@contextmanager
def record_intermediates() -> Iterator[list[Intermediate]]:
    """Within the block, every named intermediate the program computes is appended to the yielded list (name,
    dtype, shape, min, max). Off by default: recording costs a min/max pass per intermediate."""
    log: list[Intermediate] = []
    token = _RECORD.set(log)
    try:
        yield log
    finally:
        _RECORD.reset(token)


def _record(name: str, x: np.ndarray) -> np.ndarray:
    log = _RECORD.get()
    if log is not None:
        lo, hi = (int(x.min()), int(x.max())) if x.size and x.dtype.kind in "iu" else (0, 0)
        log.append(Intermediate(name, x.dtype, tuple(x.shape), lo, hi))
    return x


# ---------------------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------------------


def int8_weight(packed: PackedTensor) -> tuple[np.ndarray, np.ndarray]:
    """The weight the MAC array sees and its scale per output channel.

    Returns:
        weight: ``packed.shape`` int8, ``lut[codes]``.
        scale: (C,) float64, C = shape[0]: a per-tensor scale broadcast; all-zero rows get the largest scale of
            the tensor (1.0 if every row is zero) — exact, since a zero row is zero at any scale.
    """
    weight = packed.int8_weight()
    rows = weight.reshape(weight.shape[0], -1)
    scale = np.broadcast_to(packed.scale.astype(np.float64), (weight.shape[0],)).copy()
    zero = ~rows.any(axis=1)
    scale[zero] = scale[~zero].max() if (~zero).any() else 1.0
    return weight, scale


def int32_bias(bias: np.ndarray, acc_scale: np.ndarray, where: str) -> np.ndarray:
    """Float bias (O,) → int32 at the accumulator scale (O,), rounded half to even; OverflowError if it does not
    leave the int32 accumulator room (|bias| must stay below 2^30)."""
    q = np.rint(np.asarray(bias, np.float64) / acc_scale)
    if np.abs(q).max(initial=0) >= 2**30:
        raise OverflowError(f"{where}: bias {np.abs(bias).max():g} is {np.abs(q).max():.3g} accumulator units, "
                            "too large for the int32 accumulator")
    return q.astype(np.int32)


@dataclass(frozen=True)
class IntegerLinear:
    """y = requant(x · Wᵀ + b) for int8 x at one scale, symmetric int8 W (zero point 0).

    Attributes:
        weight: (O, I) int8.
        bias: (O,) int32 at the scale x_scale · w_scale.
        mult: (m (O,) int64, shift (O,) int64) from the accumulator scale to ``out_scale``.
        out_dtype: int8, int16 (Q3.12) or int32 (logits).
    """

    weight: np.ndarray
    bias: np.ndarray
    mult: tuple[np.ndarray, np.ndarray]
    out_scale: float
    out_dtype: type
    rounding: Rounding
    name: str = "linear"

    @classmethod
    def from_int8(cls, weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None, x_scale: float,
                  out_scale: float | None, out_dtype: type, rounding: Rounding, name: str) -> IntegerLinear:
        """weight (O, I) int8 with per-row scale (O,); float bias (O,) or None; ``out_scale`` None: the largest
        accumulator scale (every multiplier ≤ 1, the int32 logits' rule)."""
        acc_scale = x_scale * w_scale
        out_scale = float(acc_scale.max()) if out_scale is None else out_scale
        bias = np.zeros(weight.shape[0]) if bias is None else bias
        return cls(weight, int32_bias(bias, acc_scale, name), quantize_multiplier(acc_scale / out_scale),
                   out_scale, out_dtype, rounding, name)

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        """x: (..., I) int8 → (..., O) int32 accumulator (bias included)."""
        return _record(f"{self.name}.acc", matmul_integer(x, self.weight.T, 0, 0, self.bias))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (..., I) int8 → (..., O) ``out_dtype`` at ``out_scale``."""
        out = requantize(self.accumulate(x), *self.mult, 0, self.rounding, self.out_dtype)
        return _record(self.name, out)


def _round(x: np.ndarray, rounding: Rounding) -> np.ndarray:
    """Round float values to integers (as float) by the named rule."""
    if rounding == "half_to_even":
        return np.rint(x)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_features(feats: np.ndarray, feat_lens: np.ndarray, scale: float, multiple: int,
                      rounding: Rounding) -> np.ndarray:
    """The float front end's output entering the accelerator (the one per-frame float operation, :data:`FLOAT_OPS`):
    feats (B, T, F) float, feat_lens (B,) → (B, ceil(T / multiple) · multiple, F) int8 at ``scale``; frames past
    each length are zero (as the float models mask them), and so is the padding up to the multiple (the encoder's
    time reduction)."""
    frames = feats.shape[1]
    q = saturate(_round(feats.astype(np.float64) / scale, rounding), np.int8)
    q[np.arange(frames)[None, :] >= feat_lens[:, None]] = 0
    return np.pad(q, ((0, 0), (0, -(-frames // multiple) * multiple - frames), (0, 0)))


def run_lstm_layer(cell: IntegerLSTMCell, x: np.ndarray, name: str = "lstm") -> np.ndarray:
    """One LSTM layer over a sequence from the zero state: x (B, T, I) int8 → h (B, T, H) int8."""
    batch, steps, _ = x.shape
    hidden = cell.w_hh.shape[1]
    h = np.zeros((batch, hidden), np.int8)
    c = np.zeros((batch, hidden), np.int16)
    out = np.empty((batch, steps, hidden), np.int8)
    for t in range(steps):
        h, c = cell(x[:, t], h, c)
        out[:, t] = h
    _record(f"{name}.c", c)
    return _record(name, out)


# ---------------------------------------------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegerEncoder:
    """Frame stacking, integer LSTM layers and the integer LayerNorm of :class:`~sub8.models.lstm.LSTMTranscriber`."""

    stack: int
    input_dim: int
    feat_scale: float
    cells: tuple[IntegerLSTMCell, ...]
    norm: IntegerLayerNorm
    rounding: Rounding

    def quantize_features(self, feats: np.ndarray, feat_lens: np.ndarray) -> np.ndarray:
        """feats (B, T, F) float, feat_lens (B,) → stacked (B, T', S·F) int8, T' = ceil(T / S)."""
        q = quantize_features(feats, feat_lens, self.feat_scale, self.stack, self.rounding)
        return _record("encoder.input", q.reshape(q.shape[0], -1, self.stack * q.shape[2]))

    def __call__(self, feats: np.ndarray, feat_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """feats (B, T, F) float32, feat_lens (B,) int64 → enc (B, T', D) int8, out_lens (B,) int64."""
        x = self.quantize_features(feats, feat_lens)
        for k, cell in enumerate(self.cells):
            x = run_lstm_layer(cell, x, f"encoder.lstm.l{k}")
        enc = _record("encoder.norm", self.norm(x))
        return enc, (feat_lens + self.stack - 1) // self.stack


PredictorState = list[tuple[np.ndarray, np.ndarray]]  # per layer (h (B, H) int8, c (B, H) int16 Q4.11)


@dataclass(frozen=True)
class IntegerPredictor:
    """Embedding + integer LSTM layers, one token at a time.

    Attributes:
        embedding: (V, E) int8 rows ``lut[codes]``.
        embedding_mult: (m (V,), shift (V,)): row scale / s_emb, requantizing a looked-up row to the LSTM's input
            scale s_emb (≤ 1 by the choice of s_emb, so it never saturates).
    """

    embedding: np.ndarray
    embedding_mult: tuple[np.ndarray, np.ndarray]
    cells: tuple[IntegerLSTMCell, ...]
    rounding: Rounding

    def initial_state(self, batch: int) -> PredictorState:
        return [(np.zeros((batch, c.w_hh.shape[1]), np.int8), np.zeros((batch, c.w_hh.shape[1]), np.int16))
                for c in self.cells]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """tokens (B,) int64 → (B, E) int8 at s_emb."""
        rows = self.embedding[tokens].astype(np.int64)
        m, shift = self.embedding_mult
        return _record("predictor.embedding", requantize(rows, m[tokens, None], shift[tokens, None], 0,
                                                         self.rounding, np.int8))

    def step(self, tokens: np.ndarray, state: PredictorState) -> tuple[np.ndarray, PredictorState]:
        """tokens (B,), state → (h of the last layer (B, H) int8, new state)."""
        x = self.embed(tokens)
        new_state = []
        for k, (cell, (h, c)) in enumerate(zip(self.cells, state)):
            h, c = cell(x, h, c)
            new_state.append((_record(f"predictor.lstm.l{k}", h), _record(f"predictor.lstm.l{k}.c", c)))
            x = h
        return x, new_state


@dataclass(frozen=True)
class IntegerJoiner:
    """tanh(enc_proj(enc) + pred_proj(pred)) → output linear, in integers; the projections give Q3.12 int16."""

    enc_proj: IntegerLinear
    pred_proj: IntegerLinear
    tanh_mult: tuple[np.ndarray, np.ndarray]  # Q0.15 → int8 at TANH_OUT_SCALE
    output: IntegerLinear
    rounding: Rounding

    def logits(self, enc16: np.ndarray, pred16: np.ndarray) -> np.ndarray:
        """enc16, pred16: (..., J) int16 Q3.12 (broadcastable) → (..., V) int32 logits at ``output.out_scale``."""
        joint = _record("joiner.sum", saturate(enc16.astype(np.int32) + pred16, np.int16))
        activated = _record("joiner.tanh", TANH(joint, self.rounding))
        t = _record("joiner.tanh_int8", requantize(activated, *self.tanh_mult, 0, self.rounding, np.int8))
        return self.output(t)


# ---------------------------------------------------------------------------------------------------------------
# The transducer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ProgramSource:
    """What the program is built from, kept for the packed model file: the weights as packed, the float
    parameters that become int32 biases / the integer LayerNorm, and the calibrated activation scales."""

    config: dict[str, Any]
    packed: dict[str, PackedTensor]
    float_params: dict[str, np.ndarray]
    activation_scales: dict[str, float]
    norm_eps: float
    rounding: Rounding
    calibration: dict[str, Any] = field(default_factory=dict)


class EncoderProgram(Protocol):
    """An integer encoder (:class:`IntegerEncoder`, or the Conformer's
    :class:`~sub8.emulator.conformer_program.IntegerConformerEncoder`): ``(feats (B, T, F) float32, feat_lens (B,)
    int64) → (enc (B, T', D) int8 at the joiner's input scale, out_lens (B,) int64)``."""

    input_dim: int

    def __call__(self, feats: np.ndarray, feat_lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class IntegerTransducer(nn.Module):
    """The integer transducer (RNN-T or Conformer: the encoder differs, the predictor, joiner and greedy search are
    the same). An ``nn.Module`` only so that :func:`sub8.evaluate.decode` and ``evaluate`` take it as they take the
    float model: it holds no torch weights, and one empty parameter tells ``decode`` its device (the CPU; numpy does
    the work)."""

    float_ops = FLOAT_OPS  # the same one for both encoders

    def __init__(self, encoder: EncoderProgram, predictor: IntegerPredictor, joiner: IntegerJoiner,
                 source: ProgramSource) -> None:
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.joiner = joiner
        self.source = source
        self.rounding = source.rounding
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def activation_scales(self) -> dict[str, float]:
        return dict(self.source.activation_scales)

    def predict(self, tokens: np.ndarray, state: PredictorState) -> tuple[np.ndarray, PredictorState]:
        """A predictor step and its joint projection: tokens (B,) → (pred16 (B, J) int16 Q3.12, state)."""
        h, state = self.predictor.step(tokens, state)
        return self.joiner.pred_proj(h), state

    def greedy_decode(self, feats: torch.Tensor | np.ndarray, feat_lens: torch.Tensor | np.ndarray,
                      max_symbols_per_frame: int = 5) -> list[list[int]]:
        """Batched greedy search with the contract of :meth:`Transducer.greedy_decode`: frame by frame, each
        utterance emits until the argmax is blank or it has emitted ``max_symbols_per_frame`` tokens at the frame;
        the predictor advances only for the utterances that emitted.

        Args:
            feats: (B, T, F) float features (CMVN applied), padded; torch or numpy.
            feat_lens: (B,) valid frames, each ≥ 1.
        Returns: per utterance, the token ids without blanks.
        """
        feats, feat_lens = decoder_inputs(feats, feat_lens, self.encoder.input_dim)
        batch = feats.shape[0]
        if batch == 0:
            return []
        enc, out_lens = self.encoder(feats[:, : int(feat_lens.max())], feat_lens)
        enc16 = self.joiner.enc_proj(enc)  # (B, T', J): once per frame, independent of the predictor
        pred16, state = self.predict(np.full(batch, BLANK, np.int64), self.predictor.initial_state(batch))

        def predict(tokens: np.ndarray, flat: State) -> tuple[np.ndarray, State]:  # per-layer (h, c) <-> flat list
            new_pred, new_state = self.predict(tokens, list(zip(flat[0::2], flat[1::2])))
            return new_pred, [x for layer in new_state for x in layer]

        return greedy_search(enc16, out_lens, pred16, [x for layer in state for x in layer], self.joiner.logits,
                             predict, max_symbols_per_frame)


State = list[np.ndarray]  # a decoder's recurrent state as arrays with the batch on one axis (greedy_search's)


def greedy_search(enc_proj: np.ndarray, out_lens: np.ndarray, pred: np.ndarray, state: State,
                  joint: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  predict: Callable[[np.ndarray, State], tuple[np.ndarray, State]],
                  max_symbols_per_frame: int = 5, state_axis: int = 0) -> list[list[int]]:
    """Batched greedy search with the contract of :meth:`Transducer.greedy_decode`, over any joiner and predictor
    (the integer program's, ONNX Runtime's): frame by frame, each utterance emits until the argmax is blank or it
    has emitted ``max_symbols_per_frame`` tokens at the frame; the predictor advances only for the utterances that
    emitted.

    Args:
        enc_proj: (B, T', J) the encoder's joint projection; out_lens: (B,) valid frames.
        pred: (B, J) the predictor's joint projection after the start symbol; updated in place.
        state: the predictor state after the start symbol, arrays with the batch on ``state_axis``; updated in place.
        joint: (enc (b, J), pred (b, J)) → logits (b, V).
        predict: (tokens (b,), state of those b utterances) → (pred (b, J), their new state).
    Returns: per utterance, the token ids without blanks.
    """
    hyps: list[list[int]] = [[] for _ in range(enc_proj.shape[0])]
    lead = (slice(None),) * state_axis
    for t in range(enc_proj.shape[1]):
        active = np.flatnonzero(t < out_lens)
        for _ in range(max_symbols_per_frame):
            best = joint(enc_proj[active, t], pred[active]).argmax(axis=-1)
            active, best = active[best != BLANK], best[best != BLANK]
            if not active.size:
                break
            new_pred, new_state = predict(best, [np.take(s, active, axis=state_axis) for s in state])
            pred[active] = new_pred
            for s, new in zip(state, new_state):
                s[(*lead, active)] = new
            for b, token in zip(active.tolist(), best.tolist()):
                hyps[b].append(token)
    return hyps


def decoder_inputs(feats: torch.Tensor | np.ndarray, feat_lens: torch.Tensor | np.ndarray,
                   input_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``feats`` (B, T, input_dim) as float32 and ``feat_lens`` (B,) as int64 numpy arrays, checked."""
    feats, feat_lens = as_numpy(feats, np.float32), as_numpy(feat_lens, np.int64)
    if feats.ndim != 3 or feats.shape[-1] != input_dim:
        raise ValueError(f"feats: expected (B, T, {input_dim}), got {feats.shape}")
    if feat_lens.size and feat_lens.min() < 1:
        raise ValueError(f"feat_lens: every utterance needs at least one frame, got {feat_lens.tolist()}")
    return feats, feat_lens


def as_numpy(x: torch.Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------


def _conformer() -> Any:
    """:mod:`sub8.emulator.conformer_program` (the Conformer's encoder), imported when first needed: it builds on
    this module, so importing it at the top would be circular."""
    from sub8.emulator import conformer_program

    return conformer_program


def _lstm_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.weight_{kind}_l{k}" for k in range(layers) for kind in ("ih", "hh")]


def _lstm_biases(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}.bias_{kind}_l{k}" for k in range(layers) for kind in ("ih", "hh")]


def weight_names(config: TransducerConfig) -> list[str]:
    """The quantized weights the integer transducer runs (every one must be in the export)."""
    encoder = (_conformer().encoder_weight_names(config) if config.encoder == "conformer"
               else _lstm_names("transcriber.lstm", config.lstm_layers))
    return [*encoder, "predictor.embedding.weight", *_lstm_names("predictor.lstm", config.pred_layers),
            "joiner.enc_proj.weight", "joiner.pred_proj.weight", "joiner.output.weight"]


def float_param_names(config: TransducerConfig) -> list[str]:
    """The float parameters it converts itself: LSTM biases, LayerNorm gains and biases, linear (and conv) biases."""
    encoder = (_conformer().encoder_float_param_names(config) if config.encoder == "conformer"
               else [*_lstm_biases("transcriber.lstm", config.lstm_layers), "transcriber.norm.weight",
                     "transcriber.norm.bias"])
    return [*encoder, *_lstm_biases("predictor.lstm", config.pred_layers), "joiner.enc_proj.bias",
            "joiner.pred_proj.bias", "joiner.output.bias"]


def _check_supported(model: nn.Module, exported: dict[str, Any]) -> TransducerConfig:
    """Raise :class:`ConversionError` for anything the integer program does not run; returns the model's config."""
    config = getattr(model, "config", None)
    if not isinstance(config, TransducerConfig):
        raise ConversionError(f"to_integer_program takes a sub8 Transducer, got {type(model).__name__}")
    lstms = [("predictor.lstm", model.predictor.lstm)]
    if config.encoder == "conformer":
        _conformer().check_encoder(model)
    else:
        lstms.insert(0, ("transcriber.lstm", model.transcriber.lstm))
        if not isinstance(model.transcriber.norm, nn.LayerNorm) or not model.transcriber.norm.elementwise_affine:
            raise ConversionError(f"transcriber.norm: expected an affine nn.LayerNorm, got {model.transcriber.norm}")
    for where, lstm in lstms:
        if lstm.bidirectional or lstm.proj_size or not lstm.batch_first or lstm.mode != "LSTM":
            raise ConversionError(f"{where}: only unidirectional LSTMs without projection (proj_size=0), "
                                  f"batch_first, are supported; got {lstm}")
    params = dict(model.named_parameters())
    skip = tuple(f"{m}." for m in getattr(model, "training_only", ()))
    needed = weight_names(config)
    missing = [n for n in needed if n not in exported]
    if missing:
        raise ConversionError(f"the export lacks quantized weight(s) {missing}: the int8 device multiplies only "
                              "int8 weights; export with a plan that covers every weight (e.g. QuantPlan.uniform)")
    extra = sorted(n for n in exported if n not in needed and not n.startswith(skip))
    if extra:
        raise ConversionError(f"the export holds weight(s) {extra} that the integer program does not run")
    known = set(needed) | set(float_param_names(config))
    unknown = sorted(n for n in params if n not in known and not n.startswith(skip))
    if unknown:
        raise ConversionError(f"unsupported parameter(s) {unknown}: the integer program has no place for them")
    for name in needed:
        if tuple(exported[name].codes.shape) != tuple(params[name].shape):
            raise ConversionError(f"{name}: exported codes {tuple(exported[name].codes.shape)} do not match the "
                                  f"model's weight {tuple(params[name].shape)}")
    return config


@torch.no_grad()
def fake_quant_model(model: nn.Module, exported: dict[str, Any]) -> nn.Module:
    """A copy of ``model`` (eval mode) whose quantized weights are exactly the exported ``lut · scale[codes]``: the
    float model the integer program approximates (and the calibration runs)."""
    reference = copy.deepcopy(model).eval()
    for name, q in exported.items():
        try:
            param = reference.get_parameter(name)
        except AttributeError:
            raise ConversionError(f"exported weight {name!r} is not a parameter of the model") from None
        param.copy_(q.dequantize().to(param.dtype))
    return reference


def calibration_features(fs: Any, cmvn: Any, count: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``count`` utterances of a :class:`~sub8.data.features.FeatureSet` (use the dev split, not test), drawn
    without replacement (seeded), CMVN applied: a list of (T_i, F) float32 tensors."""
    if count < 1:
        raise ValueError(f"calibration_features: count must be ≥ 1, got {count}")
    picks = np.random.default_rng(seed).choice(len(fs), size=min(count, len(fs)), replace=False)
    return [cmvn.apply(fs.feature(int(i))) for i in np.sort(picks)]


def _pad(feats: Sequence[torch.Tensor | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, F) → padded (B, T, F) float32 and lengths (B,) int64."""
    tensors = [torch.as_tensor(np.asarray(f), dtype=torch.float32) for f in feats]
    lens = torch.tensor([len(f) for f in tensors], dtype=torch.int64)
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True), lens


def _layer_outputs(lstm: nn.LSTM, x: torch.Tensor) -> list[torch.Tensor]:
    """Float outputs of every layer of ``lstm`` (nn.LSTM returns only the last): x (B, T, I) → [(B, T, H)]."""
    outputs = []
    for k in range(lstm.num_layers):
        layer = nn.LSTM(x.shape[-1], lstm.hidden_size, 1, bias=lstm.bias, batch_first=True)
        for kind in ("weight_ih", "weight_hh", *(("bias_ih", "bias_hh") if lstm.bias else ())):
            getattr(layer, f"{kind}_l0").data.copy_(getattr(lstm, f"{kind}_l{k}"))
        x, _ = layer(x)
        outputs.append(x)
    return outputs


def _range(values: torch.Tensor, percentile: float, cap: float | None = None) -> float:
    """The calibration rule: ``percentile`` of |values| (100: max-abs), at most ``cap``, at least MIN_RANGE."""
    r = float(np.percentile(values.abs().double().numpy(), percentile)) if values.numel() else 0.0
    return max(min(r, cap) if cap is not None else r, MIN_RANGE)


@torch.no_grad()
def calibrate(reference: nn.Module, calibration_feats: Sequence[torch.Tensor | np.ndarray],
              percentile: float = CALIBRATION_PERCENTILE, hidden: HiddenRule = "bound") -> dict[str, float]:
    """Activation scales (site → scale) from the float fake-quant model on the calibration utterances; the rule is
    the module docstring's. Each site's range r gives scale r / 127. ``hidden``: "bound" gives every LSTM hidden
    state r = 1 (its bound) without looking at data; "calibrated" the percentile rule, capped at 1."""
    if hidden not in HIDDEN_RULES:
        raise ValueError(f"calibrate: hidden must be one of {HIDDEN_RULES}, got {hidden!r}")
    if not len(calibration_feats):
        raise ValueError("calibrate: no calibration utterances")
    if reference.training:
        raise ValueError("calibrate: call eval() on the reference model first (dropout would perturb the ranges)")
    if not 0 < percentile <= 100:
        raise ValueError(f"calibrate: percentile must be in (0, 100], got {percentile}")
    feats, lens = _pad(calibration_feats)
    if reference.config.encoder == "conformer":
        scales = _conformer().calibrate_encoder(reference, feats, lens, percentile)
    else:
        scales = _calibrate_lstm_encoder(reference, feats, lens, percentile, hidden)
    return scales | _calibrate_predictor(reference, feats, lens, percentile, hidden)


def _calibrate_lstm_encoder(reference: nn.Module, feats: torch.Tensor, lens: torch.Tensor, percentile: float,
                            hidden: HiddenRule) -> dict[str, float]:
    """The RNN-T encoder's scales (site → scale) on padded calibration features (B, T, F) and lengths (B,)."""
    transcriber = reference.transcriber
    captured: dict[str, torch.Tensor] = {}
    hooks = [transcriber.lstm.register_forward_hook(lambda m, a, out: captured.__setitem__("x", a[0])),
             transcriber.norm.register_forward_hook(lambda m, a, out: captured.__setitem__("norm", out))]
    try:
        reference.encode(feats, lens)
    finally:
        for hook in hooks:
            hook.remove()
    out_lens = (lens + transcriber.stack - 1) // transcriber.stack
    valid = torch.arange(captured["x"].shape[1])[None, :] < out_lens[:, None]  # (B, T')
    ranges = {"features": _range(captured["x"][valid], percentile),
              "encoder.norm": _range(captured["norm"][valid], percentile)}
    if hidden == "bound":
        ranges |= {f"encoder.lstm.l{k}": 1.0 for k in range(transcriber.lstm.num_layers)}
    else:
        for k, h in enumerate(_layer_outputs(transcriber.lstm, captured["x"])):
            ranges[f"encoder.lstm.l{k}"] = _range(h[valid], percentile, cap=1.0)
    return {site: r / INT8_MAX for site, r in ranges.items()}


def _calibrate_predictor(reference: nn.Module, feats: torch.Tensor, lens: torch.Tensor, percentile: float,
                         hidden: HiddenRule) -> dict[str, float]:
    """The predictor's hidden-state scales: at their bound, or ("calibrated") by the percentile rule on the token
    paths the fake-quant model decodes (start symbol + its hypothesis), capped at the bound."""
    predictor = reference.predictor
    if hidden == "bound":
        return {f"predictor.lstm.l{k}": 1.0 / INT8_MAX for k in range(predictor.lstm.num_layers)}
    hyps = reference.greedy_decode(feats, lens)
    tokens = nn.utils.rnn.pad_sequence([torch.tensor([BLANK, *h], dtype=torch.long) for h in hyps], batch_first=True)
    token_valid = torch.arange(tokens.shape[1])[None, :] <= torch.tensor([len(h) for h in hyps])[:, None]
    return {f"predictor.lstm.l{k}": _range(h[token_valid], percentile, cap=1.0) / INT8_MAX
            for k, h in enumerate(_layer_outputs(predictor.lstm, predictor.embedding(tokens)))}


def pack_exported(exported: dict[str, Any]) -> dict[str, PackedTensor]:
    """export_quantized's {name: QuantizedTensor} → {name: PackedTensor} (codes packed at their bits)."""
    return {name: PackedTensor.from_codes(q.codes.cpu().numpy(), q.bits, q.lut.cpu().numpy(),
                                          q.scale.detach().cpu().numpy())
            for name, q in exported.items()}


def _lstm_cells(prefix: str, layers: int, packed: dict[str, PackedTensor], floats: dict[str, np.ndarray],
                x_scale: float, h_scales: list[float], rounding: Rounding) -> tuple[IntegerLSTMCell, ...]:
    """Integer cells of a stacked LSTM; layer k reads the previous layer's h at its scale."""
    cells = []
    for k in range(layers):
        w_ih, s_ih = int8_weight(packed[f"{prefix}.weight_ih_l{k}"])
        w_hh, s_hh = int8_weight(packed[f"{prefix}.weight_hh_l{k}"])
        bias = floats[f"{prefix}.bias_ih_l{k}"].astype(np.float64) + floats[f"{prefix}.bias_hh_l{k}"]
        int32_bias(bias, x_scale * s_ih, f"{prefix} layer {k}")  # the cell rounds it itself; check the range
        cells.append(IntegerLSTMCell.from_int8(w_ih, s_ih, w_hh, s_hh, bias, x_scale, 0, h_scales[k], 0, rounding))
        x_scale = h_scales[k]
    return tuple(cells)


def build_program(source: ProgramSource) -> IntegerTransducer:
    """The integer program from packed weights, float biases and norm, and activation scales (no float model)."""
    config = TransducerConfig.from_dict(source.config)
    packed, floats, scales, r = source.packed, source.float_params, source.activation_scales, source.rounding
    if r not in ROUNDING_RULES:
        raise ValueError(f"unknown rounding rule {r!r}; expected one of {ROUNDING_RULES}")
    if config.encoder == "conformer":
        encoder = _conformer().build_encoder(config, source)
        enc_scale = encoder.out_scale
    else:
        enc_scales = [scales[f"encoder.lstm.l{k}"] for k in range(config.lstm_layers)]
        encoder = IntegerEncoder(
            config.lstm_stack, config.input_dim, scales["features"],
            _lstm_cells("transcriber.lstm", config.lstm_layers, packed, floats, scales["features"], enc_scales, r),
            IntegerLayerNorm.from_float(floats["transcriber.norm.weight"].astype(np.float64),
                                        floats["transcriber.norm.bias"].astype(np.float64), source.norm_eps,
                                        enc_scales[-1], 0, scales["encoder.norm"], 0, r),
            r,
        )
        enc_scale = scales["encoder.norm"]
    embedding, row_scale = int8_weight(packed["predictor.embedding.weight"])
    emb_scale = scales["predictor.embedding"]
    pred_scales = [scales[f"predictor.lstm.l{k}"] for k in range(config.pred_layers)]
    predictor = IntegerPredictor(
        embedding, quantize_multiplier(row_scale / emb_scale),
        _lstm_cells("predictor.lstm", config.pred_layers, packed, floats, emb_scale, pred_scales, r), r,
    )
    gate_unit = 2.0**-GATE_FRAC_BITS

    def linear(name: str, x_scale: float, out_scale: float | None, dtype: type) -> IntegerLinear:
        weight, w_scale = int8_weight(packed[f"{name}.weight"])
        return IntegerLinear.from_int8(weight, w_scale, floats[f"{name}.bias"], x_scale, out_scale, dtype, r, name)

    joiner = IntegerJoiner(
        linear("joiner.enc_proj", enc_scale, gate_unit, np.int16),
        linear("joiner.pred_proj", pred_scales[-1], gate_unit, np.int16),
        quantize_multiplier(2.0**-ACT_FRAC_BITS / scales["joiner.tanh"]),
        linear("joiner.output", scales["joiner.tanh"], None, np.int32),
        r,
    )
    return IntegerTransducer(encoder, predictor, joiner, source)


def to_integer_program(model: nn.Module, exported: dict[str, Any],
                       calibration_feats: Sequence[torch.Tensor | np.ndarray],
                       percentile: float = CALIBRATION_PERCENTILE,
                       rounding: Rounding = "half_to_even", hidden: HiddenRule = "bound") -> IntegerTransducer:
    """Convert a quantized transducer (RNN-T or Conformer) to its integer program.

    Args:
        model: the Transducer (``encoder="lstm"`` or ``"conformer"``); its float biases and LayerNorms are read, and a
            copy with the exported weights calibrates the activation scales.
        exported: :func:`sub8.quant.export_quantized` of the model (uniform, S8BQAT, GQ or native: codes, int8 LUT,
            scale), covering every weight the program runs.
        calibration_feats: a few utterances' (T_i, F) features, CMVN applied (:func:`calibration_features`).
        percentile: the calibration percentile of |x| (100: max-abs).
        rounding: the requantization rounding rule.
        hidden: the LSTM hidden states' scale: "bound" (1/127) or "calibrated" (see :func:`calibrate`).
    Raises:
        ConversionError: an unsupported LSTM or Conformer variant, a missing or extra weight, a shape mismatch.
    """
    config = _check_supported(model, exported)
    reference = fake_quant_model(model, exported)
    scales = calibrate(reference, calibration_feats, percentile, hidden)
    packed = pack_exported({n: q for n, q in exported.items() if n in set(weight_names(config))})
    embedding, row_scale = int8_weight(packed["predictor.embedding.weight"])
    scales["predictor.embedding"] = max(float((np.abs(embedding.astype(np.float64)).max(axis=1) * row_scale).max()),
                                        MIN_RANGE) / INT8_MAX
    scales["joiner.tanh"] = TANH_OUT_SCALE
    params = dict(model.named_parameters())
    floats = {name: params[name].detach().cpu().float().numpy().copy()
              for name in float_param_names(config) if name in params}
    lstms = [("predictor.lstm", config.pred_layers)]
    if config.encoder == "lstm":
        lstms.insert(0, ("transcriber.lstm", config.lstm_layers))
    for prefix, layers in lstms:
        width = params[f"{prefix}.weight_hh_l0"].shape[1]
        for k in range(layers):  # an LSTM built with bias=False has none: zeros
            for kind in ("ih", "hh"):
                floats.setdefault(f"{prefix}.bias_{kind}_l{k}", np.zeros(4 * width, np.float32))
    # Every LayerNorm of the encoder has this eps (the Conformer's check makes sure).
    eps = next(m.eps for m in model.transcriber.modules() if isinstance(m, nn.LayerNorm))
    source = ProgramSource(config.to_dict(), packed, floats, scales, float(eps), rounding,
                           {"percentile": percentile, "hidden": hidden, "utterances": len(calibration_feats)})
    return build_program(source)


# ---------------------------------------------------------------------------------------------------------------
# The packed model file
# ---------------------------------------------------------------------------------------------------------------


def save_integer_program(path: str | Path, program: IntegerTransducer) -> None:
    """Write the program as a packed model file (:mod:`sub8.emulator.packing`): the packed weights as tensors; the
    config, activation scales, rounding rule and the float parameters (float32 values, exact in JSON) as metadata."""
    s = program.source
    metadata = {
        "kind": PROGRAM_KIND,
        "version": PROGRAM_VERSION,
        "config": s.config,
        "activation_scales": s.activation_scales,
        "norm_eps": s.norm_eps,
        "rounding": s.rounding,
        "calibration": s.calibration,
        "float_params": {name: {"shape": list(v.shape), "values": v.astype(np.float32).ravel().tolist()}
                         for name, v in s.float_params.items()},
    }
    save_packed_model(path, s.packed, metadata)


def load_integer_program(path: str | Path) -> IntegerTransducer:
    """Read a file written by :func:`save_integer_program` and rebuild the same program (bit for bit).

    Raises:
        PackedFormatError: a truncated, altered or foreign file (from :func:`load_packed_model`).
        ConversionError: a valid packed file that is not an integer RNN-T program of this version.
    """
    tensors, metadata = load_packed_model(path)
    if metadata.get("kind") != PROGRAM_KIND or metadata.get("version") != PROGRAM_VERSION:
        raise ConversionError(f"{path}: not an integer RNN-T program of version {PROGRAM_VERSION} "
                              f"(kind {metadata.get('kind')!r}, version {metadata.get('version')!r})")
    floats = {name: np.asarray(entry["values"], np.float32).reshape(entry["shape"])
              for name, entry in metadata["float_params"].items()}
    source = ProgramSource(metadata["config"], tensors, floats,
                           {k: float(v) for k, v in metadata["activation_scales"].items()},
                           float(metadata["norm_eps"]), metadata["rounding"], metadata.get("calibration", {}))
    return build_program(source)


__all__ = [
    "CALIBRATION_PERCENTILE",
    "FLOAT_OPS",
    "ConversionError",
    "EncoderProgram",
    "IntegerEncoder",
    "IntegerJoiner",
    "IntegerLinear",
    "IntegerPredictor",
    "IntegerTransducer",
    "Intermediate",
    "ProgramSource",
    "build_program",
    "calibrate",
    "calibration_features",
    "fake_quant_model",
    "float_param_names",
    "int8_weight",
    "load_integer_program",
    "pack_exported",
    "quantize_features",
    "record_intermediates",
    "run_lstm_layer",
    "save_integer_program",
    "to_integer_program",
    "weight_names",
]
