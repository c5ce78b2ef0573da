"""The quantized RNN-T as ONNX models in QDQ form, run by ONNX Runtime: a real measured CPU latency beside the
modelled one (:mod:`sub8.emulator.device`), and a second, independent integer implementation to decode with.

The export is of the integer program's source (:class:`~sub8.emulator.program.ProgramSource`): the same int8
weights ``lut[codes]`` with their per-output-channel scales, the same float biases and LayerNorm, and the same
activation scales (:func:`~sub8.emulator.program.calibrate`'s rule), so the ONNX model, the integer program and the
fake-quant model are three renderings of one quantized network.

Three graphs, split as the streaming device runs them (B batch, T input frames, S stacked, T' = ceil(T / S),
F features, L layers, D encoder width, H predictor width, J joint width, V vocabulary)::

    <prefix>.encoder.onnx    feats (B, T, F) float32, feat_lens (B,) int64, h0, c0 (L_enc, B, D) float32
                             → enc_proj (B, T', J) float32, out_lens (B,) int64, h, c (L_enc, B, D)
    <prefix>.predictor.onnx  tokens (B,) int64, h0, c0 (L_pred, B, H) → pred_proj (B, J), h, c (L_pred, B, H)
    <prefix>.joiner.onnx     enc_proj (B, J), pred_proj (B, J) → logits (B, V)

The encoder's LSTM state in and out makes it streamable: chunks whose lengths are multiples of S, the state carried
from one call to the next (LSTM ``sequence_lens`` = out_lens, so each utterance's state is taken at its own last
frame); a whole utterance is one chunk from the zero state.

QDQ form. Every quantized weight is an int8 initializer (the device's values) followed by ``DequantizeLinear`` with
the per-output-channel scales (zero point 0; ``axis`` is the output-channel axis of the stored layout: 1 for a
MatMul's (I, O) weight, 0 for the embedding's (V, E) rows). A linear layer's bias is int32 at the accumulator scale
s_x · s_w[c] (the device's bias, rounded as the program rounds it) behind its own DequantizeLinear. Every activation
the integer program holds in int8 gets a ``QuantizeLinear``/``DequantizeLinear`` pair at the program's scale: the
stacked input features, each LSTM layer's output h, the LayerNorm output, the embedding row, the tanh output.

What ORT makes of it (:func:`optimized_op_counts`, checked by the tests): the encoder's 3-D projection becomes
``MatMulIntegerToFloat`` (int8 × int8 → int32, scaled to float), the predictor's and joiner's 2-D ones ``QGemm``
(int8 GEMM with the int32 bias, float output; with a float bias ORT would fuse MatMul + Add into a float Gemm of
the dequantized operands first). What stays float: the masking and frame stacking, the LayerNorm, the joint sum and
tanh, the LSTM's gate arithmetic. The projections' outputs are float where the program holds int16 Q3.12: ORT has
no int16 matmul output, and float is the finer of the two.

The LSTM (``lstm_op``):

* ``"DynamicQuantizeLSTM"`` (default): ORT's contrib integer LSTM. Its weights are the int8 ``lut[codes]`` with
  per-channel scales (the device's weights, exactly; prepacked for MLAS's u8×s8 GEMM at load); it quantizes the
  float input of each GEMM to uint8 with a scale from that input's own range (x once per call, h at every step)
  and multiplies in int8. A real integer LSTM kernel — the ONNX ``LSTM`` op has no integer form, and ORT fuses no
  QDQ pattern into it. Its dynamic scales are not the device's static ones, so its results move slightly with the
  batch and the chunking (measured on the tests' model: ≤ 0.13 on an enc_proj of standard deviation ~2.3, batched
  against one utterance at a time).
* ``"LSTM"``: the standard op on ``DequantizeLinear``'d int8 weights: an fp32 LSTM on the quantized weights, with
  the device's static scales at its input and output (batch- and chunk-independent). ORT does not constant-fold
  DequantizeLinear (it keeps QDQ patterns for its fusions), so the weights are dequantized on every call — once
  per utterance in the encoder, but at every predictor step.

Seen (benchmarks/onnx_runtime.py, default profile, 200 test utterances one at a time, 1 thread, on a loaded 2-core
machine): DynamicQuantizeLSTM decodes about 2.2× faster than the LSTM op and 2× faster than the fp32 ONNX graphs,
with the same hypotheses; the LSTM op is slower than fp32 ONNX (the per-call dequantization). Hence the default.

The fp32 graphs (:func:`export_onnx_fp32`) are the same three graphs with float weights and no QDQ: the float
baseline's ONNX rendering, for the int8-vs-fp32 timing in one runtime.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sub8.emulator.program import (
    CALIBRATION_PERCENTILE,
    ConversionError,
    HiddenRule,
    ProgramSource,
    State,
    decoder_inputs,
    greedy_search,
    int32_bias,
    float_param_names,
    int8_weight,
    to_integer_program,
    weight_names,
)
from sub8.io import atomic_write_bytes
from sub8.models.transducer import BLANK, TransducerConfig

OPSET = 17  # LayerNormalization; per-axis DequantizeLinear needs 13
MS_OPSET = 1  # com.microsoft: DynamicQuantizeLSTM
IR_VERSION = 9
LstmOp = Literal["DynamicQuantizeLSTM", "LSTM"]
LSTM_OPS: tuple[str, ...] = ("DynamicQuantizeLSTM", "LSTM")
PARTS: tuple[str, ...] = ("encoder", "predictor", "joiner")
# Graph inputs and outputs of each part, in order (the runner checks a loaded file against them).
SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "encoder": (("feats", "feat_lens", "h0", "c0"), ("enc_proj", "out_lens", "h", "c")),
    "predictor": (("tokens", "h0", "c0"), ("pred_proj", "h", "c")),
    "joiner": (("enc_proj", "pred_proj"), ("logits",)),
}
# ONNX gate order (i, o, f, c) as row blocks of PyTorch's (i, f, g, o).
_ONNX_GATES = (0, 3, 1, 2)


class OnnxModelError(ValueError):
    """An ONNX file that cannot be loaded as this RNN-T's part; the message names the file and the problem."""


@dataclass(frozen=True)
class OnnxRnnt:
    """The three ONNX files of one exported RNN-T."""

    encoder: Path
    predictor: Path
    joiner: Path

    @classmethod
    def at(cls, prefix: str | Path) -> OnnxRnnt:
        """The files ``<prefix>.encoder.onnx``, ``<prefix>.predictor.onnx``, ``<prefix>.joiner.onnx``."""
        return cls(*(Path(f"{prefix}.{part}.onnx") for part in PARTS))

    def paths(self) -> dict[str, Path]:
        return {part: getattr(self, part) for part in PARTS}


# ---------------------------------------------------------------------------------------------------------------
# What a graph is built from
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weight:
    """A weight as the graph stores it: int8 ``values`` with a per-row ``scale`` (C,) (quantized), or float32
    ``values`` and ``scale`` None. Rows are PyTorch's output channels."""

    values: np.ndarray
    scale: np.ndarray | None = None


@dataclass(frozen=True)
class GraphSource:
    """Everything the three graphs are built from.

    Attributes:
        config: the RNN-T's architecture.
        weights: every name of :func:`~sub8.emulator.program.weight_names`, as :class:`Weight`.
        floats: LSTM biases (absent: zero, an LSTM built with bias=False), LayerNorm gain and bias, linear biases
            (float32, by parameter name).
        activation_scales: site → int8 scale (program.py's sites); None: the fp32 graph, no QDQ.
        norm_eps: the LayerNorm's epsilon.
    """

    config: TransducerConfig
    weights: dict[str, Weight]
    floats: dict[str, np.ndarray]
    activation_scales: dict[str, float] | None
    norm_eps: float

    @classmethod
    def from_program(cls, source: ProgramSource) -> GraphSource:
        """The quantized graphs' source: the program's int8 weights and scales (all-zero rows get a usable scale,
        as :func:`~sub8.emulator.program.int8_weight` gives them), float parameters and activation scales."""
        weights = {name: Weight(*int8_weight(packed)) for name, packed in source.packed.items()}
        return cls(TransducerConfig.from_dict(source.config), weights, source.float_params,
                   dict(source.activation_scales), source.norm_eps)

    @classmethod
    def from_float_model(cls, model: nn.Module) -> GraphSource:
        """The fp32 graphs' source: the model's own float parameters."""
        config = model.config
        params = {name: p.detach().cpu().float().numpy() for name, p in model.named_parameters()}
        floats = {name: params[name] for name in float_param_names(config) if name in params}
        return cls(config, {name: Weight(params[name]) for name in weight_names(config)}, floats, None,
                   float(model.transcriber.norm.eps))

    @property
    def quantized(self) -> bool:
        return self.activation_scales is not None


# ---------------------------------------------------------------------------------------------------------------
# Graph building
# ---------------------------------------------------------------------------------------------------------------


def _gate_rows(w: np.ndarray) -> np.ndarray:
    """(4H, ...) in PyTorch's gate order → ONNX's."""
    return np.concatenate([np.split(w, 4, axis=0)[g] for g in _ONNX_GATES], axis=0)


class _Builder:
    """Nodes and initializers of one graph, with unique names, and the layers the three graphs share."""

    def __init__(self, source: GraphSource, lstm_op: LstmOp) -> None:
        self.source = source
        self.lstm_op = lstm_op
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: Counter[str] = Counter()

    def name(self, base: str) -> str:
        """``base`` on its first use (so graph outputs keep their names), then ``base_1``, ``base_2``…"""
        self._used[base] += 1
        return base if self._used[base] == 1 else f"{base}_{self._used[base] - 1}"

    def const(self, base: str, value: Any) -> str:
        """An initializer; float64 values are stored as float32."""
        array = np.asarray(value)
        self.initializers.append(numpy_helper.from_array(
            array.astype(np.float32) if array.dtype == np.float64 else array, name := self.name(base)))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | Sequence[str], domain: str = "",
           **attrs: Any) -> Any:
        """Append a node; ``out``: its output's name (one output) or names; returns the name(s) given."""
        names = [self.name(n) for n in ([out] if isinstance(out, str) else out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(f"{names[0]}.node"),
                                           domain=domain, **attrs))
        return names[0] if isinstance(out, str) else names

    def fake_quant(self, x: str, site: str) -> str:
        """x → QuantizeLinear → DequantizeLinear at the site's int8 scale (identity in the fp32 graph)."""
        if not self.source.quantized:
            return x
        scale = self.const(f"{site}.scale", np.float32(self.source.activation_scales[site]))
        zero = self.const(f"{site}.zero_point", np.int8(0))
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, scale, zero], f"{site}.q"), scale, zero],
                       f"{site}.dq")

    def weight(self, name: str, values: np.ndarray, scale: np.ndarray | None, axis: int) -> str:
        """A weight: int8 initializer + DequantizeLinear with per-channel ``scale`` (C,) along ``axis``, or (scale
        None) a float32 initializer."""
        if scale is None:
            return self.const(name, values.astype(np.float32))
        q = self.const(f"{name}.int8", values.astype(np.int8))
        s = self.const(f"{name}.scale", scale.astype(np.float32))
        zero = self.const(f"{name}.zero_point", np.zeros(scale.shape, np.int8))
        return self.op("DequantizeLinear", [q, s, zero], f"{name}.dq", axis=axis)

    def linear(self, x: str, module: str, x_site: str, out: str | None = None) -> str:
        """x (..., I), fake-quantized at ``x_site`` → x · Wᵀ + b (..., O); W is stored transposed, (I, O), so its
        output channels are axis 1. In the quantized graph the bias is int32 at the accumulator scale s_x · s_w[c]
        (the device's bias): with it ORT turns a 2-D MatMul + Add into one QGemm (int8 GEMM, int32 bias, float
        output); with a float bias it makes a float Gemm of the dequantized operands instead."""
        w = self.source.weights[f"{module}.weight"]
        bias = self.source.floats[f"{module}.bias"]
        y = self.op("MatMul", [x, self.weight(f"{module}.weight", w.values.T, w.scale, 1)], f"{module}.matmul")
        if w.scale is None:
            return self.op("Add", [y, self.const(f"{module}.bias", bias)], out or module)
        acc_scale = np.float32(self.source.activation_scales[x_site]) * w.scale.astype(np.float32)
        b = self.op("DequantizeLinear", [self.const(f"{module}.bias.int32", int32_bias(bias, acc_scale, module)),
                                         self.const(f"{module}.bias.scale", acc_scale),
                                         self.const(f"{module}.bias.zero_point", np.zeros(acc_scale.shape, np.int32))],
                    f"{module}.bias.dq", axis=0)
        return self.op("Add", [y, b], out or module)

    def lstm_layer(self, x: str, prefix: str, site: str, seq_lens: str, h0: str, c0: str,
                   squeeze: Sequence[int]) -> tuple[str, str, str]:
        """Layer ``k`` of ``prefix`` (site: ``<encoder|predictor>.lstm.l<k>``): x (T, B, I) time-major, h0/c0
        (1, B, H) → (y fake-quantized at the site's scale, h (1, B, H), c (1, B, H)); y is the op's (T, 1, B, H)
        output with the axes ``squeeze`` removed: [1] (T, B, H), or [0, 1] (B, H) for one step, squeezed before
        the QDQ so that the QDQ pair meets the MatMul it feeds."""
        k = site.rsplit(".l", 1)[1]
        w_ih, w_hh = (self.source.weights[f"{prefix}.weight_{kind}_l{k}"] for kind in ("ih", "hh"))
        hidden = w_hh.values.shape[1]
        zero = np.zeros(4 * hidden, np.float32)
        bias = self.const(f"{site}.B", np.concatenate(
            [_gate_rows(self.source.floats.get(f"{prefix}.bias_{kind}_l{k}", zero)) for kind in ("ih", "hh")])[None])
        outs = [f"{site}.y4", f"{site}.h", f"{site}.c"]
        if self.lstm_op == "DynamicQuantizeLSTM":
            # The contrib op's layout: W (1, I, 4H), R (1, H, 4H) int8, per-channel scales and zero points (1, 4H).
            w, r = ([self.const(f"{site}.{kind}.int8", _gate_rows(wt.values).T[None].astype(np.int8)),
                     self.const(f"{site}.{kind}.scale", _gate_rows(wt.scale)[None].astype(np.float32)),
                     self.const(f"{site}.{kind}.zero_point", np.zeros((1, 4 * hidden), np.int8))]
                    for kind, wt in (("W", w_ih), ("R", w_hh)))
            y, h, c = self.op("DynamicQuantizeLSTM", [x, w[0], r[0], bias, seq_lens, h0, c0, "", *w[1:], *r[1:]],
                              outs, "com.microsoft", hidden_size=hidden)
        else:
            w, r = (self.weight(f"{site}.{kind}", _gate_rows(wt.values)[None],
                                None if wt.scale is None else _gate_rows(wt.scale), 1)
                    for kind, wt in (("W", w_ih), ("R", w_hh)))
            y, h, c = self.op("LSTM", [x, w, r, bias, seq_lens, h0, c0], outs, hidden_size=hidden)
        y = self.op("Squeeze", [y, self.const("axes", list(squeeze))], f"{site}.y")
        return self.fake_quant(y, site), h, c

    def lstm_stack(self, x: str, prefix: str, sites: str, layers: int, seq_lens: str,
                   last_squeeze: Sequence[int] = (1,)) -> str:
        """Stacked layers from the graph inputs h0/c0 (L, B, H) to the graph outputs h/c (L, B, H); x (T, B, I)
        → the last layer's y, its axes ``last_squeeze`` removed (see :meth:`lstm_layer`)."""
        h0s = self.op("Split", ["h0"], [f"{sites}.h0"] * layers, axis=0)
        c0s = self.op("Split", ["c0"], [f"{sites}.c0"] * layers, axis=0)
        hs, cs = [], []
        for k in range(layers):
            x, h, c = self.lstm_layer(x, prefix, f"{sites}.l{k}", seq_lens, h0s[k], c0s[k],
                                      last_squeeze if k == layers - 1 else (1,))
            hs.append(h)
            cs.append(c)
        self.op("Concat", hs, "h", axis=0)
        self.op("Concat", cs, "c", axis=0)
        return x

    def model(self, part: str, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, f"sub8_rnnt_{part}", inputs, outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="sub8")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, {"sub8.part": part, "sub8.quantized": str(self.source.quantized).lower(),
                                       "sub8.lstm_op": self.lstm_op,
                                       "sub8.config": json.dumps(self.source.config.to_dict())})
        return model


def _io(name: str, dtype: int, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def encoder_graph(source: GraphSource, lstm_op: LstmOp) -> onnx.ModelProto:
    """Mask, stack S frames, QDQ, LSTM layers (QDQ after each), LayerNorm, QDQ, enc_proj (the module docstring's
    signature; QDQ only in the quantized graph)."""
    c = source.config
    g = _Builder(source, lstm_op)
    s = c.lstm_stack
    time = g.op("Shape", ["feats"], "time", start=1, end=2)  # (1,) int64
    # Zero the frames past each length, as the float model does, so a partial last group is padded alike.
    index = g.op("Range", [g.const("zero_i", np.int64(0)), g.op("Squeeze", [time], "time_scalar"),
                           g.const("one_i", np.int64(1))], "frame_index")
    valid = g.op("Less", [g.op("Unsqueeze", [index, g.const("axis0", [0])], "frame_row"),
                          g.op("Unsqueeze", ["feat_lens", g.const("axis1", [1])], "len_column")], "valid")
    x = g.op("Where", [g.op("Unsqueeze", [valid, g.const("axis2", [2])], "valid3"), "feats",
                       g.const("zero_f", np.float32(0))], "masked")
    # Pad T up to a multiple of S (pads = [0, 0, 0, 0, (S − T mod S) mod S, 0]), stack, go time-major.
    stack = g.const("stack", [s])
    pad = g.op("Mod", [g.op("Sub", [stack, g.op("Mod", [time, stack], "time_mod")], "short"), stack], "pad")
    pads = g.op("Concat", [g.const("pads_head", [0, 0, 0, 0]), pad, g.const("pads_tail", [0])], "pads", axis=0)
    x = g.op("Reshape", [g.op("Pad", [x, pads], "padded"), g.const("stacked_shape", [0, -1, s * c.input_dim])],
             "stacked")
    x = g.fake_quant(g.op("Transpose", [x], "stacked_tbf", perm=[1, 0, 2]), "features")
    out_lens = g.op("Div", [g.op("Add", ["feat_lens", g.const("stack_m1", np.int64(s - 1))], "lens_up"),
                            g.const("stack_i", np.int64(s))], "out_lens")
    y = g.lstm_stack(x, "transcriber.lstm", "encoder.lstm", c.lstm_layers,
                     g.op("Cast", [out_lens], "seq_lens", to=TensorProto.INT32))
    norm = g.op("LayerNormalization", [y, g.const("norm.weight", source.floats["transcriber.norm.weight"]),
                                       g.const("norm.bias", source.floats["transcriber.norm.bias"])], "norm",
                axis=-1, epsilon=source.norm_eps)
    proj = g.linear(g.fake_quant(norm, "encoder.norm"), "joiner.enc_proj", "encoder.norm")
    g.op("Transpose", [proj], "enc_proj", perm=[1, 0, 2])
    state = [c.lstm_layers, "batch", c.lstm_hidden]
    return g.model("encoder",
                   [_io("feats", TensorProto.FLOAT, ["batch", "time", c.input_dim]),
                    _io("feat_lens", TensorProto.INT64, ["batch"]),
                    _io("h0", TensorProto.FLOAT, state), _io("c0", TensorProto.FLOAT, state)],
                   [_io("enc_proj", TensorProto.FLOAT, ["batch", "frames", c.joiner_dim]),
                    _io("out_lens", TensorProto.INT64, ["batch"]),
                    _io("h", TensorProto.FLOAT, state), _io("c", TensorProto.FLOAT, state)])


def predictor_graph(source: GraphSource, lstm_op: LstmOp) -> onnx.ModelProto:
    """Embedding row (per-row DQ, then QDQ at s_emb), LSTM layers one step (QDQ after each), pred_proj."""
    c = source.config
    g = _Builder(source, lstm_op)
    table = source.weights["predictor.embedding.weight"]
    emb = g.op("Gather", [g.weight("predictor.embedding.weight", table.values, table.scale, 0), "tokens"],
               "embedding", axis=0)
    x = g.op("Unsqueeze", [g.fake_quant(emb, "predictor.embedding"), g.const("axis0", [0])], "embedding_tbe")
    y = g.lstm_stack(x, "predictor.lstm", "predictor.lstm", c.pred_layers, "", last_squeeze=(0, 1))  # (B, H)
    g.linear(y, "joiner.pred_proj", f"predictor.lstm.l{c.pred_layers - 1}", "pred_proj")
    state = [c.pred_layers, "batch", c.pred_hidden]
    return g.model("predictor",
                   [_io("tokens", TensorProto.INT64, ["batch"]),
                    _io("h0", TensorProto.FLOAT, state), _io("c0", TensorProto.FLOAT, state)],
                   [_io("pred_proj", TensorProto.FLOAT, ["batch", c.joiner_dim]),
                    _io("h", TensorProto.FLOAT, state), _io("c", TensorProto.FLOAT, state)])


def joiner_graph(source: GraphSource, lstm_op: LstmOp) -> onnx.ModelProto:
    """tanh(enc_proj + pred_proj), QDQ at 1/127, output linear → logits."""
    c = source.config
    g = _Builder(source, lstm_op)
    joint = g.op("Tanh", [g.op("Add", ["enc_proj", "pred_proj"], "joint_sum")], "joint")
    g.linear(g.fake_quant(joint, "joiner.tanh"), "joiner.output", "joiner.tanh", "logits")
    return g.model("joiner",
                   [_io("enc_proj", TensorProto.FLOAT, ["batch", c.joiner_dim]),
                    _io("pred_proj", TensorProto.FLOAT, ["batch", c.joiner_dim])],
                   [_io("logits", TensorProto.FLOAT, ["batch", c.vocab_size])])


GRAPHS: dict[str, Callable[[GraphSource, LstmOp], onnx.ModelProto]] = {
    "encoder": encoder_graph, "predictor": predictor_graph, "joiner": joiner_graph}


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def write_onnx(source: GraphSource, path_prefix: str | Path, lstm_op: LstmOp = "DynamicQuantizeLSTM") -> OnnxRnnt:
    """Build the three graphs, check them all (``onnx.checker``, full), then write each atomically; returns the
    paths."""
    if lstm_op not in LSTM_OPS:
        raise ValueError(f"lstm_op must be one of {LSTM_OPS}, got {lstm_op!r}")
    if lstm_op == "DynamicQuantizeLSTM" and not source.quantized:
        raise ValueError("DynamicQuantizeLSTM runs int8 weights: the fp32 graphs take lstm_op='LSTM'")
    models = {part: build(source, lstm_op) for part, build in GRAPHS.items()}
    for model in models.values():
        onnx.checker.check_model(model, full_check=True)
    files = OnnxRnnt.at(path_prefix)
    for part, path in files.paths().items():
        atomic_write_bytes(path, models[part].SerializeToString())
    return files


def export_onnx_qdq(model: nn.Module, exported: dict[str, Any], calibration_feats: Sequence[torch.Tensor | np.ndarray],
                    path_prefix: str | Path, *, lstm_op: LstmOp = "DynamicQuantizeLSTM",
                    percentile: float = CALIBRATION_PERCENTILE, hidden: HiddenRule = "bound") -> OnnxRnnt:
    """Write the quantized RNN-T as three QDQ ONNX models (the module docstring's graphs).

    Args:
        model, exported, calibration_feats, percentile, hidden: as :func:`~sub8.emulator.program.to_integer_program`
            takes them (the same checks, the same calibration on the fake-quant model, the same scales).
        path_prefix: the files are ``<prefix>.{encoder,predictor,joiner}.onnx``.
        lstm_op: "DynamicQuantizeLSTM" (int8 kernel) or "LSTM" (float kernel on the dequantized int8 weights).
    Raises:
        ConversionError: what the integer program does not convert (a Conformer, a missing weight…).
    """
    program = to_integer_program(model, exported, calibration_feats, percentile, hidden=hidden)
    return write_onnx(GraphSource.from_program(program.source), path_prefix, lstm_op)


def export_onnx_fp32(model: nn.Module, path_prefix: str | Path) -> OnnxRnnt:
    """Write the float RNN-T as the same three graphs, float weights and no QDQ (the fp32 comparison)."""
    config = getattr(model, "config", None)
    if not isinstance(config, TransducerConfig) or config.encoder != "lstm":
        raise ConversionError(f"export_onnx_fp32 takes a sub8 RNN-T (encoder 'lstm'), got {type(model).__name__}"
                              f"{'' if config is None else f' with encoder {config.encoder!r}'}")
    return write_onnx(GraphSource.from_float_model(model), path_prefix, "LSTM")


# ---------------------------------------------------------------------------------------------------------------
# Running: ONNX Runtime sessions and greedy decoding
# ---------------------------------------------------------------------------------------------------------------


def session_options(threads: int = 1, optimized_model_path: str | Path | None = None) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads, one inter-op thread, all graph optimizations (the QDQ
    fusions included); ``optimized_model_path``: where ORT writes the graph it runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def load_session(path: str | Path, part: str, options: ort.SessionOptions) -> ort.InferenceSession:
    """An ORT CPU session of one part's file, checked against the part's inputs and outputs.

    Raises:
        OnnxModelError: a missing, truncated or corrupted file, or a model that is not this part.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: no such ONNX file")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's own messages say "Protobuf parsing failed" for a truncated file: add which one
        raise OnnxModelError(f"{path}: ONNX Runtime cannot load it, truncated or corrupted? ({e})") from e
    names = (tuple(i.name for i in session.get_inputs()), tuple(o.name for o in session.get_outputs()))
    if names != SIGNATURES[part]:
        raise OnnxModelError(f"{path}: not an RNN-T {part} graph: inputs/outputs {names}, expected "
                             f"{SIGNATURES[part]}")
    return session


def optimized_op_counts(path: str | Path, part: str, threads: int = 1) -> Counter[str]:
    """Op types of the graph ORT actually runs for one part's file (after its fusions), e.g. how many MatMuls
    became ``MatMulIntegerToFloat``; read from ORT's ``optimized_model_filepath`` output."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = session_options(threads, optimized)
        options.log_severity_level = 3  # ORT warns that a fully optimized graph is machine-specific: it is read here
        load_session(path, part, options)
        return Counter(node.op_type for node in onnx.load(optimized).graph.node)


class OnnxTransducer(nn.Module):
    """The exported RNN-T run by ONNX Runtime: three CPU sessions and batched greedy decoding. An ``nn.Module``
    only so that :func:`sub8.evaluate.decode` takes it as it takes the float model (one empty parameter tells it the
    device, the CPU).

    Args:
        files: the three files (:class:`OnnxRnnt`, e.g. ``OnnxRnnt.at(prefix)``).
        threads: ORT intra-op threads per session.
    Raises:
        OnnxModelError: a file that is missing, truncated, corrupted, or not the part it should be.
    """

    def __init__(self, files: OnnxRnnt, threads: int = 1) -> None:
        super().__init__()
        options = session_options(threads)
        self.files = files
        self.sessions = {part: load_session(path, part, options) for part, path in files.paths().items()}
        self.input_dim = int(self.sessions["encoder"].get_inputs()[0].shape[2])
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def zero_state(self, part: str, batch: int) -> State:
        """The zero LSTM state [h, c] of the encoder or the predictor, each (L, B, width)."""
        layers, _, width = self.sessions[part].get_inputs()[-1].shape  # c0: (L, "batch", width)
        return [np.zeros((layers, batch, width), np.float32) for _ in range(2)]

    def encode(self, feats: np.ndarray, feat_lens: np.ndarray, state: State) -> tuple[np.ndarray, np.ndarray, State]:
        """feats (B, T, F) float32, feat_lens (B,) int64, state [h, c] (L, B, D) → enc_proj (B, T', J), out_lens
        (B,), the state after each utterance's last frame."""
        enc, out_lens, h, c = self.sessions["encoder"].run(None, {"feats": feats, "feat_lens": feat_lens,
                                                                  "h0": state[0], "c0": state[1]})
        return enc, out_lens, [h, c]

    def predict(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """tokens (B,) int64, state [h, c] (L, B, H) → pred_proj (B, J), new state."""
        pred, h, c = self.sessions["predictor"].run(None, {"tokens": tokens, "h0": state[0], "c0": state[1]})
        return pred, [h, c]

    def joint(self, enc: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """enc (B, J), pred (B, J) float32 → logits (B, V)."""
        return self.sessions["joiner"].run(None, {"enc_proj": enc, "pred_proj": pred})[0]

    def greedy_decode(self, feats: torch.Tensor | np.ndarray, feat_lens: torch.Tensor | np.ndarray,
                      max_symbols_per_frame: int = 5) -> list[list[int]]:
        """Batched greedy search (:func:`greedy_search`) with the contract of :meth:`Transducer.greedy_decode`.

        Args:
            feats: (B, T, F) float features (CMVN applied), padded; torch or numpy.
            feat_lens: (B,) valid frames, each ≥ 1.
        Returns: per utterance, the token ids without blanks.
        """
        feats, feat_lens = decoder_inputs(feats, feat_lens, self.input_dim)
        batch = feats.shape[0]
        if batch == 0:
            return []
        enc, out_lens, _ = self.encode(np.ascontiguousarray(feats[:, : int(feat_lens.max())]), feat_lens,
                                       self.zero_state("encoder", batch))
        pred, state = self.predict(np.full(batch, BLANK, np.int64), self.zero_state("predictor", batch))
        return greedy_search(enc, out_lens, pred, state, self.joint, self.predict, max_symbols_per_frame,
                             state_axis=1)


__all__ = [
    "LSTM_OPS",
    "GraphSource",
    "OnnxModelError",
    "OnnxRnnt",
    "OnnxTransducer",
    "Weight",
    "encoder_graph",
    "export_onnx_fp32",
    "export_onnx_qdq",
    "joiner_graph",
    "load_session",
    "optimized_op_counts",
    "predictor_graph",
    "session_options",
    "write_onnx",
]
