"""Latency and memory model of the int8 accelerator (design.md §6): a roofline per layer, a residency policy for the
on-chip SRAM, and a streaming simulation of transducer decoding over utterances.

Units: bytes, cycles, seconds (``*_s``), milliseconds only in the ``*_ms`` fields of results. One **encoder frame**
is 40 ms of audio (4 stacked 10 ms feature frames, or the ×4 convolutional subsampling); one **encoder step** is
what the encoder computes at once: one frame for the LSTM, one attention chunk of ``chunk_frames`` frames for the
Conformer (computed when the whole chunk has arrived).

What the device does (the model this file computes)
---------------------------------------------------
* **Weights** are stored packed: ``ceil(N·b/8)`` bytes of codes, the int8 lookup table (LUT) and float32 scales
  (exactly :class:`sub8.emulator.packing.PackedTensor`). Every call expands the codes it uses to int8 through the LUT
  in a decompression unit (``decompress_codes_per_cycle`` codes per cycle, whatever b < 8 is; 8-bit weights are
  stored as their int8 values and skip it), whether the codes come
  from SRAM or stream in from DRAM; a Conformer step expands each weight once and reuses it for the chunk's frames.
  Weights left unquantized are modelled as float32 (4 bytes an element, no LUT): the ``fp32`` reference row, run at
  the same MAC rate.
* **Other parameters** stay resident at device precision: biases int32 (an LSTM's ``b_ih + b_hh`` merged into one
  int32 vector, as :class:`sub8.emulator.kernels.IntegerLSTMCell`), LayerNorm gain int16 and offset int32 (as
  :class:`sub8.emulator.kernels.IntegerLayerNorm`). The sigmoid/tanh/exp tables of the kernels are fixed-function
  ROM and are not counted.
* **State** stays resident: LSTM ``h`` int8 and ``c`` int16 per layer (encoder and predictor); the Conformer's causal
  convolution histories (``kernel − 1`` frames of the depthwise convolution, one input row per subsampling
  convolution); the joiner's cached projections (``enc_proj`` of the current chunk, ``pred_proj`` of the last token).
* **Attention K/V cache**: every earlier chunk stays visible (``conformer_left_chunks=None``), so the cache grows
  with the utterance. It is sized for a stated maximum utterance, ``max_audio_s`` of :func:`workload` (or for the
  model's own left-context bound if it has one, whichever is smaller); :func:`simulate` refuses longer utterances.
  The cache competes with the weights for SRAM like a weight does (below); when not resident, each step reads the
  visible K/V from DRAM and writes the new chunk's.
* **Activation buffers**: layers run one after another, so one buffer region sized for the largest layer (its int8
  inputs and outputs for a whole chunk, plus the Conformer's residual stream, the int16 LSTM gate pre-activations,
  the attention scores and probabilities of one head against the longest context) serves them all. int32
  accumulators live in the MAC array.

Cycle rule (a roofline, as Timeloop/MAESTRO reduce to): per layer per call, with MAC, DRAM and decompression units
pipelined and double-buffered so that they overlap completely,

    cycles = max(MACs / macs_per_cycle,  DRAM bytes / dram_bytes_per_cycle,  codes / decompress_codes_per_cycle).

Element-wise work (LayerNorm, activation tables, softmax, residual adds: O(D) per frame against O(D²) MACs), SRAM
bandwidth, DRAM burst granularity and per-layer launch overheads are not modelled.

Residency policy (:func:`plan_residency`): SRAM first holds what every step reads and writes (activation buffers,
state, biases and norms; if those do not fit, the configuration is refused). The rest holds weights and K/V
caches, possibly **in part** (whole tiles of a weight's rows, or the K/V of some heads): an item of stored size S
with x bytes resident moves ``(1 − x/S)`` of its bytes from DRAM each call. Space goes greedily to the bytes that
save the most cycles per byte of SRAM over the simulated utterances — bytes of layers whose calls are fetch-bound,
in proportion to how many bytes a call fetches and how often it is called. The saving is concave in x (a call stops
saving once it is no longer fetch-bound), so this greedy is the optimum of the total compute over those utterances
(up to rounding the break points to whole bytes). Consequences, checked by the tests: total compute, RTF and mean
per-frame latency never grow with more SRAM, more DRAM bandwidth or fewer bits (an optimum over the same choices
with costs that are no larger); and since the fill order does not depend on the SRAM size, every item's resident
bytes only grow with SRAM, so every step's compute, hence every utterance's UPL, only shrinks. For bits and
bandwidth the per-utterance UPL is not guaranteed by construction (the optimum may move SRAM between layers), only
observed to be monotone too. Bytes that save nothing (compute-bound layers) are then placed in layer order while
space remains.

Streaming and user-perceived latency (:func:`simulate`): step k of an utterance arrives when its last frame's audio
has (``(k+1)·chunk·40 ms``; the last step at the end of the audio, whose partial chunk or frame is flushed with
zero padding — ``flush_at_end=False`` instead waits for the chunk's full duration, the look-ahead wait). A step
computes the encoder, then greedy decoding of its frames: ``frames + tokens`` joiner calls (one per frame, one more
after each emitted token) and ``tokens`` predictor calls (embedding, LSTM, ``pred_proj``); the predictor's output for
the start symbol is a constant computed once. Steps queue on the one accelerator: start = max(arrival, previous
finish). **UPL** (user-perceived latency) = finish of the last step − end of the audio = backlog of queued steps +
look-ahead wait + the last step's compute. The 15 ms by which the 25 ms feature window overhangs its 10 ms hop, the
same for every model, is left out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from torch import nn

from sub8.emulator.packing import PackedTensor, packed_nbytes
from sub8.models.conformer import SUBSAMPLING, ConvSubsampling, SelfAttention
from sub8.quant.apply import QuantizedTensor

Stage = Literal["encoder", "predictor", "joiner"]
STAGES: tuple[str, ...] = ("encoder", "predictor", "joiner")
FLOAT_BITS = 32  # weights left unquantized are stored as float32
INFERENCE_PARTS = ("transcriber", "predictor", "joiner")  # the CTC head is a training aid, not run on the device

KiB = 1024
MiB = 1024 * KiB
GB = 10**9


# ---------------------------------------------------------------------------------------------------------------
# The accelerator
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceleratorConfig:
    """An int8 accelerator for the roofline model.

    Attributes:
        name: label used in tables and figures.
        macs_per_cycle: int8 × int8 multiply-accumulates per clock cycle (MACs/cycle).
        clock_hz: clock frequency (cycles/s).
        sram_bytes: on-chip SRAM available to the network (bytes).
        dram_bytes_per_s: sustained DRAM (or external memory) read bandwidth available to the accelerator (bytes/s).
        decompress_codes_per_cycle: weight codes the LUT decompressor expands to int8 per cycle (codes/cycle),
            independent of the code width.
    """

    name: str
    macs_per_cycle: float
    clock_hz: float
    sram_bytes: int
    dram_bytes_per_s: float
    decompress_codes_per_cycle: float

    def __post_init__(self) -> None:
        positive = {
            "macs_per_cycle": "MACs/cycle",
            "clock_hz": "Hz",
            "dram_bytes_per_s": "bytes/s",
            "decompress_codes_per_cycle": "codes/cycle",
        }
        for field, unit in positive.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"AcceleratorConfig {self.name!r}: {field} must be a finite number > 0 ({unit}), "
                                 f"got {value!r}")
        if isinstance(self.sram_bytes, bool) or not isinstance(self.sram_bytes, (int, np.integer)) \
                or self.sram_bytes < 0:
            raise ValueError(f"AcceleratorConfig {self.name!r}: sram_bytes must be an integer >= 0 (bytes), "
                             f"got {self.sram_bytes!r}")

    @property
    def dram_bytes_per_cycle(self) -> float:
        """DRAM bytes per clock cycle."""
        return self.dram_bytes_per_s / self.clock_hz

    @property
    def tops(self) -> float:
        """Peak int8 throughput in tera-operations/s (one MAC = two operations)."""
        return 2 * self.macs_per_cycle * self.clock_hz / 1e12

    def replace(self, **changes: object) -> AcceleratorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


# Plausible edge NPUs, NOT measured parts: the MAC counts, SRAM sizes and bandwidths resemble published figures of
# the parts named; the decompression rates are our assumption (no datasheet gives one for LUT expansion): one code per
# MAC per cycle, a decoder sized to feed the MAC array in the matrix-vector products of streaming ASR, where every
# weight is used once a frame. (A decoder 1/8 as wide, sized for convolutions where each weight serves many outputs,
# made every resident sub-8-bit LSTM decompression-bound: 8x slower than its MACs, and slower than an 8-bit model,
# which needs no expansion — a property of that guess, not of sub-8-bit weights; `sweep` can vary the rate.)
PRESETS: dict[str, AcceleratorConfig] = {
    # Always-on micro-NPU next to a Cortex-M class CPU. Resembles Arm Ethos-U55-256 / Ethos-U65-256: 256 int8
    # MACs/cycle (the U55 is configurable with 32-256 MACs/cycle, the U65 with 256 or 512; Arm, 2020), at the 500 MHz
    # that Arm's Vela compiler assumes by default for Ethos_U55_256 (0.256 TOPS); 256 KiB of SRAM for the network;
    # 2 GB/s of a shared LPDDR4 channel (the U65 targets DRAM-based systems; the U55's default off-chip flash in Vela
    # gives only 0.5 GB/s).
    "edge_small": AcceleratorConfig(
        name="edge_small", macs_per_cycle=256, clock_hz=500e6, sram_bytes=256 * KiB, dram_bytes_per_s=2 * GB,
        decompress_codes_per_cycle=256,
    ),
    # Entry mobile/IoT NPU. Resembles Arm Ethos-N37: 512 MACs/cycle (1.02 TOPS at 1 GHz), 512 KiB SRAM, designed for
    # "very little DRAM bandwidth, around 3 GB/s or less" (WikiChip, Arm Ethos, 2020).
    "edge_mid": AcceleratorConfig(
        name="edge_mid", macs_per_cycle=512, clock_hz=1e9, sram_bytes=512 * KiB, dram_bytes_per_s=3 * GB,
        decompress_codes_per_cycle=512,
    ),
    # Phone-class NPU. Resembles Arm Ethos-N77: 2048 MACs/cycle (4.1 TOPS at 1 GHz), 1-4 MiB SRAM (2 MiB here),
    # "as much as 8 GB/s or even higher" of DRAM bandwidth at full performance (WikiChip, Arm Ethos, 2020).
    "phone": AcceleratorConfig(
        name="phone", macs_per_cycle=2048, clock_hz=1e9, sram_bytes=2 * MiB, dram_bytes_per_s=8 * GB,
        decompress_codes_per_cycle=2048,
    ),
}
# The study's default: an always-on part is where on-device ASR must live within a few hundred KiB, and where the
# bytes that sub-8-bit weights save decide latency.
DEFAULT_PRESET = "edge_small"


# ---------------------------------------------------------------------------------------------------------------
# The workload: per-layer costs derived from a transducer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs the device. Per *call*: an encoder-stage call is one encoder step of ``n`` frames
    (MACs scale with ``n``, weight fetch and decompression do not); predictor- and joiner-stage calls are one
    token or one joiner evaluation (``n = 1``).

    Attributes:
        name: the weight's parameter name, or the module's name for layers without a weight (LayerNorm, the
            attention score/context products).
        stage: "encoder" (once per encoder step; includes the joiner's ``enc_proj``), "predictor" (once per emitted
            token: embedding, predictor LSTM, ``pred_proj``) or "joiner" (once per joiner call: ``output``).
        bits: stored code width b (1..8); 32 for a weight left in float32; 0 without a weight.
        num_weights: weight elements N.
        code_bytes: packed codes, ``ceil(N·b/8)`` (float32 weights: 4N).
        table_bytes: int8 LUT bytes.
        scale_bytes: float32 scale bytes.
        macs_per_frame: int8 MACs per frame processed (activation × weight, and activation × activation).
        context_macs: attention only: MACs per query frame per visible key frame (QKᵀ and probabilities × V: 2·D).
        codes_per_call: weight codes expanded by the decompressor per call (0 for float32 weights and no weight).
        fetch_bytes_per_call: DRAM bytes a call reads if nothing of the weight is resident: the whole stored weight,
            for an embedding one row (its codes, its LUT and scale).
        kv_bytes_per_frame: attention only: K and V bytes (int8) per cached frame.
        kv_cache_bytes: attention only: the K/V cache at the workload's maximum context.
        param_bytes: unquantized parameters at device precision (bias int32, LayerNorm gain int16 + offset int32).
        state_bytes: persistent state across steps (LSTM h int8 + c int16, convolution histories, joiner caches).
        activation_bytes: activation buffer this layer needs while it runs (a whole chunk; largest context).
    """

    name: str
    stage: Stage
    bits: int = 0
    num_weights: int = 0
    code_bytes: int = 0
    table_bytes: int = 0
    scale_bytes: int = 0
    macs_per_frame: int = 0
    context_macs: int = 0
    codes_per_call: int = 0
    fetch_bytes_per_call: int = 0
    kv_bytes_per_frame: int = 0
    kv_cache_bytes: int = 0
    param_bytes: int = 0
    state_bytes: int = 0
    activation_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        """Stored weight: packed codes + LUT + scales (float32 weights: 4N)."""
        return self.code_bytes + self.table_bytes + self.scale_bytes

    @property
    def movable_bytes(self) -> int:
        """Bytes that may live in SRAM or DRAM: the stored weight, or the K/V cache at maximum context."""
        return self.weight_bytes + self.kv_cache_bytes

    @property
    def physical_bound_bytes(self) -> float:
        """N·b/8 + LUT + scales: the weight's information content, with no padding."""
        return self.num_weights * self.bits / 8 + self.table_bytes + self.scale_bytes


@dataclass(frozen=True)
class Footprint:
    """Device memory of a model (bytes), by part; ``total_bytes`` is their sum."""

    code_bytes: int  # packed codes of the quantized weights
    table_bytes: int  # int8 LUTs
    scale_bytes: int  # float32 scales
    float_weight_bytes: int  # weights left in float32
    param_bytes: int  # biases (int32) and LayerNorm gain (int16) / offset (int32)
    state_bytes: int  # recurrent state, convolution histories, joiner caches
    kv_cache_bytes: int  # attention K/V cache at the maximum context
    activation_bytes: int  # the activation buffer region
    physical_bound_bytes: float  # Σ N·b/8 + LUTs + scales over the weights (float32 ones at 32 bits)

    @property
    def weight_bytes(self) -> int:
        """Stored weights: packed codes + LUTs + scales + float32 weights."""
        return self.code_bytes + self.table_bytes + self.scale_bytes + self.float_weight_bytes

    @property
    def total_bytes(self) -> int:
        return (self.weight_bytes + self.param_bytes + self.state_bytes + self.kv_cache_bytes
                + self.activation_bytes)

    @property
    def packing_ratio(self) -> float:
        """Stored weights ÷ physical bound: the overhead of byte-padding the packed codes (≥ 1)."""
        return self.weight_bytes / self.physical_bound_bytes

    @property
    def total_ratio(self) -> float:
        """Whole footprint ÷ physical bound: padding plus biases, norms, state, K/V cache and buffers."""
        return self.total_bytes / self.physical_bound_bytes


@dataclass(frozen=True)
class Workload:
    """A transducer as the device sees it: its layers and how its encoder steps through time.

    Attributes:
        layers: one :class:`LayerCost` per weight, LayerNorm and attention product.
        frame_s: encoder frame duration (s).
        chunk_frames: encoder frames per encoder step (LSTM: 1; Conformer: its attention chunk).
        left_context_frames: earlier frames attention may see (None: all; 0 for a model without attention).
        max_context_frames: frames the K/V cache is sized for (0 without attention).
        max_audio_s: the longest utterance the workload was sized for (s).
        has_attention: whether the encoder has a K/V cache.
    """

    layers: tuple[LayerCost, ...]
    frame_s: float
    chunk_frames: int
    left_context_frames: int | None
    max_context_frames: int
    max_audio_s: float
    has_attention: bool

    def __iter__(self) -> Iterator[LayerCost]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def footprint(self) -> Footprint:
        """Device memory (:class:`Footprint`): every stored weight, parameter, state, the K/V cache at maximum
        context, and the activation buffer (the largest layer's, since layers run one at a time)."""
        quantized = [layer for layer in self.layers if 0 < layer.bits <= 8]
        floats = [layer for layer in self.layers if layer.bits == FLOAT_BITS]
        return Footprint(
            code_bytes=sum(layer.code_bytes for layer in quantized),
            table_bytes=sum(layer.table_bytes for layer in quantized),
            scale_bytes=sum(layer.scale_bytes for layer in quantized),
            float_weight_bytes=sum(layer.weight_bytes for layer in floats),
            param_bytes=self.param_bytes,
            state_bytes=self.state_bytes,
            kv_cache_bytes=sum(layer.kv_cache_bytes for layer in self.layers),
            activation_bytes=self.activation_bytes,
            physical_bound_bytes=sum(layer.physical_bound_bytes for layer in self.layers),
        )

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def state_bytes(self) -> int:
        return sum(layer.state_bytes for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        return max((layer.activation_bytes for layer in self.layers), default=0)

    @property
    def reserved_bytes(self) -> int:
        """SRAM every configuration must give before any weight: activation buffer + state + biases and norms."""
        return self.activation_bytes + self.state_bytes + self.param_bytes


WeightSpec = Union[int, QuantizedTensor, PackedTensor]


def _weight_fields(
    name: str, param: torch.Tensor, spec: WeightSpec | None, per_channel_scales: bool
) -> dict[str, int]:
    """bits, num_weights, code/table/scale bytes of one weight, and the bytes of one row with its table and scale
    (what an embedding lookup fetches)."""
    count = param.numel()
    channels = param.shape[0]
    row = count // channels
    if spec is None:
        return dict(bits=FLOAT_BITS, num_weights=count, code_bytes=4 * count, table_bytes=0, scale_bytes=0,
                    row_bytes=4 * row, codes=0)
    if isinstance(spec, QuantizedTensor):
        if spec.codes.numel() != count:
            raise ValueError(f"{name}: exported codes have {spec.codes.numel()} elements, the weight {count}")
        bits, table, scale = spec.bits, spec.lut.numel(), 4 * spec.scale.numel()
        table_rows, scale_rows = (channels if spec.lut.dim() == 2 else 1), (channels if spec.scale.dim() == 1 else 1)
    elif isinstance(spec, PackedTensor):
        if int(np.prod(spec.shape)) != count:
            raise ValueError(f"{name}: packed tensor of shape {spec.shape} for a weight of {count} elements")
        bits, table, scale = spec.bits, spec.lut.nbytes, spec.scale.nbytes
        table_rows, scale_rows = (channels if spec.lut.ndim == 2 else 1), (channels if spec.scale.ndim == 1 else 1)
    elif isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        bits = int(spec)
        # Bits only: a shared LUT of all 2^b levels, float32 scales per output channel (or one per tensor).
        table = 2**bits
        scale = 4 * (channels if per_channel_scales else 1)
        table_rows, scale_rows = 1, (channels if per_channel_scales else 1)
    else:
        raise TypeError(f"{name}: expected bits (int), a QuantizedTensor or a PackedTensor, got {type(spec).__name__}")
    code_bytes = packed_nbytes(count, bits)  # validates bits
    # A row that does not start on a byte boundary spans one byte more.
    row_codes = packed_nbytes(row, bits) + (1 if (row * bits) % 8 else 0)
    row_bytes = row_codes + table // table_rows + scale // scale_rows
    # 8-bit codes take a byte each, as the int8 values they stand for do: such a weight is stored already expanded,
    # so the MAC array reads it directly and the decompressor has nothing to do (an 8-bit model would otherwise pay
    # for an expansion no real int8 accelerator runs). Its table stays counted, as the packed format stores it.
    return dict(bits=bits, num_weights=count, code_bytes=code_bytes, table_bytes=table, scale_bytes=scale,
                row_bytes=row_bytes, codes=count if bits < 8 else 0)


class _Builder:
    """Walks the inference modules of a transducer into :class:`LayerCost` entries, tracking which parameters it
    accounted for."""

    def __init__(self, model: nn.Module, quantized: Mapping[str, WeightSpec], per_channel_scales: bool,
                 chunk: int) -> None:
        self.params = dict(model.named_parameters())
        self.quantized = quantized
        self.per_channel_scales = per_channel_scales
        self.chunk = chunk
        self.layers: list[LayerCost] = []
        self.covered: set[str] = set()

    def add_weight(self, name: str, stage: Stage, row_fetch: bool = False, **fields: object) -> None:
        """An entry for weight ``name`` in its stored form; a call fetches the whole stored weight (one row with
        ``row_fetch``, for lookups) and expands all its codes unless ``fields`` say otherwise."""
        self.covered.add(name)
        w = _weight_fields(name, self.params[name], self.quantized.get(name), self.per_channel_scales)
        stored = w["code_bytes"] + w["table_bytes"] + w["scale_bytes"]
        defaults = dict(codes_per_call=w["codes"], fetch_bytes_per_call=w["row_bytes"] if row_fetch else stored)
        self.add(name=name, stage=stage, bits=w["bits"], num_weights=w["num_weights"], code_bytes=w["code_bytes"],
                 table_bytes=w["table_bytes"], scale_bytes=w["scale_bytes"], **{**defaults, **fields})

    def bias_bytes(self, name: str) -> int:
        """int32 bias of ``name`` if the module has one."""
        if name not in self.params:
            return 0
        self.covered.add(name)
        return 4 * self.params[name].numel()

    def add(self, **fields: object) -> None:
        self.layers.append(LayerCost(**fields))

    def matrix(self, name: str, stage: Stage, in_dim: int, out_dim: int, frames: int, extra_activation: int = 0,
               state: int = 0) -> None:
        """A Linear (or a Linear-shaped weight) applied to each frame; activation buffer for ``frames`` frames."""
        self.add_weight(f"{name}.weight", stage, macs_per_frame=in_dim * out_dim,
                        param_bytes=self.bias_bytes(f"{name}.bias"), state_bytes=state,
                        activation_bytes=frames * (in_dim + out_dim) + extra_activation)

    def layer_norm(self, name: str, module: nn.LayerNorm, stage: Stage, frames: int, extra_activation: int = 0) -> None:
        """LayerNorm: int16 gain + int32 offset; element-wise, so no MAC cycles in the roofline."""
        dim = module.normalized_shape[-1]
        param_bytes = 0
        if module.weight is not None:
            self.covered.add(f"{name}.weight")
            param_bytes += 2 * module.weight.numel()
        if module.bias is not None:
            self.covered.add(f"{name}.bias")
            param_bytes += 4 * module.bias.numel()
        self.add(name=name, stage=stage, param_bytes=param_bytes,
                 activation_bytes=2 * frames * dim + extra_activation)

    def lstm(self, name: str, module: nn.LSTM, stage: Stage) -> None:
        """Each layer's W_ih (with the merged int32 bias and the int16 gate buffer) and W_hh (with h int8 + c int16)."""
        hidden = module.hidden_size
        for k in range(module.num_layers):
            in_dim = module.input_size if k == 0 else hidden
            bias = self.bias_bytes(f"{name}.bias_ih_l{k}")
            if f"{name}.bias_hh_l{k}" in self.params:
                self.covered.add(f"{name}.bias_hh_l{k}")
                bias = bias or 4 * self.params[f"{name}.bias_hh_l{k}"].numel()  # b_ih + b_hh: one int32 vector
            gates = 2 * 4 * hidden  # int16 gate pre-activations
            for kind, depth, extra in (("ih", in_dim, dict(param_bytes=bias, activation_bytes=in_dim + gates)),
                                       ("hh", hidden, dict(state_bytes=hidden + 2 * hidden,
                                                           activation_bytes=gates + hidden))):
                self.add_weight(f"{name}.weight_{kind}_l{k}", stage, macs_per_frame=4 * hidden * depth, **extra)

    def subsampling(self, name: str, module: ConvSubsampling, input_dim: int) -> None:
        """The Conformer's causal stride-2 Conv2d stack and its output Linear, per encoder frame."""
        chunk = self.chunk
        rows, in_freq = float(SUBSAMPLING), input_dim  # input rows (10 ms frames) per encoder frame, mel bins
        for index, layer in enumerate(module.conv):
            if not isinstance(layer, nn.Conv2d):
                continue
            conv_name = f"{name}.conv.{index}"
            k_t, k_f = layer.kernel_size
            s_t, s_f = layer.stride
            out_freq = (in_freq - k_f) // s_f + 1
            out_rows = rows / s_t
            macs = round(out_rows * out_freq * layer.out_channels * layer.in_channels * k_t * k_f)
            in_bytes = round(chunk * rows) * layer.in_channels * in_freq
            out_bytes = round(chunk * out_rows) * layer.out_channels * out_freq
            self.add_weight(f"{conv_name}.weight", "encoder", macs_per_frame=macs,
                            param_bytes=self.bias_bytes(f"{conv_name}.bias"),
                            # causal in time: the last k_t − s_t input rows of the previous step
                            state_bytes=(k_t - s_t) * layer.in_channels * in_freq,
                            activation_bytes=in_bytes + out_bytes)
            rows, in_freq = out_rows, out_freq
        self.matrix(f"{name}.out", "encoder", module.out.in_features, module.out.out_features, chunk)


def _max_context_frames(model: nn.Module, frame_s: float, max_audio_s: float) -> tuple[int | None, int]:
    """(left context frames or None, frames the K/V cache holds at most) of a Conformer transcriber."""
    transcriber = model.transcriber
    chunk = transcriber.chunk_frames
    utterance_frames = math.ceil(max_audio_s / frame_s - 1e-9)
    if transcriber.left_chunks is None:
        return None, utterance_frames
    left = transcriber.left_chunks * chunk
    return left, min(left + chunk, utterance_frames)


def workload(
    model: nn.Module,
    quantized: Mapping[str, WeightSpec] | None = None,
    *,
    max_audio_s: float = 20.0,
    per_channel_scales: bool = True,
) -> Workload:
    """The per-layer device costs of a streaming transducer (:class:`sub8.models.Transducer`).

    Args:
        model: the transducer; its transcriber (LSTM or Conformer), predictor and joiner are walked, the CTC head
            (a training aid) is not.
        quantized: the stored form of each weight, by parameter name: its bit width (LUT of 2^b entries, float32
            scales per output channel, see ``per_channel_scales``), or the exact exported form
            (:func:`sub8.quant.export_quantized`'s ``QuantizedTensor`` or a :class:`PackedTensor`). Weights not named
            stay float32. None: every weight float32. Names of the CTC head (which a plan may quantize) are ignored.
        max_audio_s: the longest utterance the device must accept (s); sizes the Conformer's K/V cache, which holds
            every earlier chunk (or the model's left context, if bounded and smaller).
        per_channel_scales: with bits only, one float32 scale per output channel (True) or per tensor.

    Raises:
        ValueError: a name in ``quantized`` that is no parameter of the model or is a bias or norm, a shape
            mismatch, or a model parameter this walk does not know how to cost.
    """
    if max_audio_s <= 0 or not math.isfinite(max_audio_s):
        raise ValueError(f"max_audio_s must be a positive number of seconds, got {max_audio_s!r}")
    quantized = dict(quantized or {})
    transcriber, predictor, joiner = model.transcriber, model.predictor, model.joiner
    frame_s = model.config.frame_shift_ms / 1000 * transcriber.time_reduction
    is_conformer = hasattr(transcriber, "layers")
    chunk = transcriber.chunk_frames if is_conformer else 1
    left, max_context = _max_context_frames(model, frame_s, max_audio_s) if is_conformer else (0, 0)

    b = _Builder(model, quantized, per_channel_scales, chunk)
    if is_conformer:
        dim = transcriber.output_dim
        residual = chunk * dim  # the residual stream stays in the buffer while a sub-block runs
        b.subsampling("transcriber.subsampling", transcriber.subsampling, model.config.input_dim)
        for i, layer in enumerate(transcriber.layers):
            prefix = f"transcriber.layers.{i}"
            for name, module in layer.named_modules():
                full = f"{prefix}.{name}"
                if isinstance(module, nn.LayerNorm):
                    b.layer_norm(full, module, "encoder", chunk, residual)
                elif isinstance(module, nn.Linear):
                    b.matrix(full, "encoder", module.in_features, module.out_features, chunk, residual)
                elif isinstance(module, nn.Conv1d):  # the causal depthwise convolution
                    kernel = module.kernel_size[0]
                    depth = module.in_channels // module.groups * kernel
                    b.add_weight(f"{full}.weight", "encoder", macs_per_frame=module.out_channels * depth,
                                 param_bytes=b.bias_bytes(f"{full}.bias"),
                                 state_bytes=(kernel - 1) * module.in_channels,  # causal: kernel − 1 past frames
                                 activation_bytes=chunk * (module.in_channels + module.out_channels) + residual)
                elif isinstance(module, SelfAttention):
                    # QKᵀ and probabilities × V: D MACs each per (query, key) pair, summed over heads. The scores
                    # (int8) and probabilities (uint8) of one head against the longest context.
                    b.add(name=f"{full}.attention", stage="encoder", context_macs=2 * dim,
                          kv_bytes_per_frame=2 * dim, kv_cache_bytes=2 * dim * max_context,
                          activation_bytes=chunk * 3 * dim + 2 * chunk * max_context + chunk * dim + residual)
    else:
        b.lstm("transcriber.lstm", transcriber.lstm, "encoder")
        b.layer_norm("transcriber.norm", transcriber.norm, "encoder", 1)

    # Joiner: enc_proj once per encoder frame (batched over the step's frames, cached through its decoding),
    # pred_proj once per emitted token (cached until the next), output once per joiner call.
    joint = joiner.enc_proj.out_features
    b.matrix("joiner.enc_proj", "encoder", joiner.enc_proj.in_features, joint, chunk, state=chunk * joint)
    # A lookup: no MACs; one row fetched and expanded per token (float32 rows are not expanded).
    embed_dim = predictor.embedding.embedding_dim
    b.add_weight("predictor.embedding.weight", "predictor", row_fetch=True,
                 codes_per_call=embed_dim if "predictor.embedding.weight" in quantized else 0,
                 activation_bytes=embed_dim)
    b.lstm("predictor.lstm", predictor.lstm, "predictor")
    b.matrix("joiner.pred_proj", "predictor", joiner.pred_proj.in_features, joint, 1, state=joint)
    b.matrix("joiner.output", "joiner", joiner.output.in_features, joiner.output.out_features, 1)

    inference = {name for name in b.params if name.split(".")[0] in INFERENCE_PARTS}
    unknown = sorted(set(quantized) - set(b.params))
    if unknown:
        raise ValueError(f"quantized names {unknown[:5]} are not parameters of the model; "
                         f"its inference weights include {sorted(inference)[:5]}...")
    missed = sorted(inference - b.covered)
    if missed:
        raise ValueError(f"workload: no cost model for parameters {missed[:5]}; extend sub8.emulator.device")
    not_weights = sorted((set(quantized) & inference) - {layer.name for layer in b.layers if layer.bits})
    if not_weights:
        raise ValueError(f"quantized names {not_weights[:5]} are biases or norms, which the device keeps unquantized")
    return Workload(tuple(b.layers), frame_s, chunk, left if is_conformer else 0, max_context, max_audio_s,
                    is_conformer)


# ---------------------------------------------------------------------------------------------------------------
# Utterances and their step schedule
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """One utterance to stream: its audio duration (s) and the number of tokens greedy decoding emits; optionally
    how many at each encoder frame (e.g. from the hypothesis' alignment). Without it they are spread evenly."""

    duration_s: float
    tokens: int
    emissions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.duration_s > 0 or not math.isfinite(self.duration_s):
            raise ValueError(f"Utterance: duration_s must be a positive number of seconds, got {self.duration_s!r}")
        if self.tokens < 0:
            raise ValueError(f"Utterance: tokens must be >= 0, got {self.tokens}")
        if self.emissions is not None and (sum(self.emissions) != self.tokens or min(self.emissions, default=0) < 0):
            raise ValueError(f"Utterance: emissions {self.emissions} must be >= 0 and sum to tokens = {self.tokens}")


UtteranceLike = Union[Utterance, tuple[float, int]]


def utterances_at_rate(durations_s: Sequence[float], tokens_per_frame: float, frame_s: float = 0.04) -> list[Utterance]:
    """Utterances of the given durations emitting ``round(tokens_per_frame · frames)`` tokens each."""
    if tokens_per_frame < 0:
        raise ValueError(f"tokens_per_frame must be >= 0, got {tokens_per_frame}")
    return [Utterance(d, round(tokens_per_frame * _num_frames(d, frame_s))) for d in durations_s]


def _num_frames(duration_s: float, frame_s: float) -> int:
    """Encoder frames of an utterance: the last partial frame is zero-padded, not dropped (as the models do)."""
    return max(1, math.ceil(duration_s / frame_s - 1e-9))


@dataclass(frozen=True)
class _Schedule:
    """Every encoder step of a set of utterances, flattened (arrays of one entry per step)."""

    utterance: np.ndarray  # index of the step's utterance
    frames: np.ndarray  # encoder frames computed in the step (n)
    past: np.ndarray  # earlier frames visible to attention (P; 0 without attention)
    tokens: np.ndarray  # tokens emitted while decoding the step's frames
    arrival_s: np.ndarray  # when the step's audio is complete (s from the start of the utterance)
    durations_s: np.ndarray  # per utterance
    num_frames: np.ndarray  # per utterance


def _spread(tokens: int, frames: int) -> np.ndarray:
    """Tokens at each frame when ``tokens`` are spread evenly over ``frames``."""
    edges = (np.arange(frames + 1, dtype=np.int64) * tokens) // frames
    return np.diff(edges)


def _schedule(work: Workload, utterances: Sequence[UtteranceLike], flush_at_end: bool) -> _Schedule:
    columns: dict[str, list[np.ndarray]] = {key: [] for key in ("utterance", "frames", "past", "tokens", "arrival")}
    durations, frame_counts = [], []
    chunk = work.chunk_frames
    for index, utt in enumerate(utterances):
        utt = utt if isinstance(utt, Utterance) else Utterance(float(utt[0]), int(utt[1]))
        frames = _num_frames(utt.duration_s, work.frame_s)
        if work.has_attention and utt.duration_s > work.max_audio_s + 1e-9:
            raise ValueError(f"utterance {index} lasts {utt.duration_s:.2f} s, longer than the {work.max_audio_s} s "
                             "the K/V cache was sized for; build the workload with a larger max_audio_s")
        if utt.emissions is not None and len(utt.emissions) != frames:
            raise ValueError(f"utterance {index}: {len(utt.emissions)} emission counts for {frames} encoder frames")
        per_frame = np.asarray(utt.emissions, np.int64) if utt.emissions is not None else _spread(utt.tokens, frames)
        steps = -(-frames // chunk)
        starts = np.arange(steps, dtype=np.int64) * chunk
        n = np.minimum(chunk, frames - starts)
        if not work.has_attention:
            past = np.zeros(steps, np.int64)
        elif work.left_context_frames is None:
            past = starts
        else:
            past = np.minimum(starts, work.left_context_frames)
        arrival = (starts + chunk) * work.frame_s
        # The last step: flushed (zero-padded) at the end of the audio, or waiting for the chunk's full duration.
        arrival[-1] = utt.duration_s if flush_at_end else max(arrival[-1], utt.duration_s)
        columns["utterance"].append(np.full(steps, index, np.int64))
        columns["frames"].append(n)
        columns["past"].append(past)
        columns["tokens"].append(np.add.reduceat(per_frame, starts))
        columns["arrival"].append(arrival)
        durations.append(utt.duration_s)
        frame_counts.append(frames)
    if not durations:
        raise ValueError("no utterances to simulate")
    cat = {key: np.concatenate(value) for key, value in columns.items()}
    return _Schedule(cat["utterance"], cat["frames"], cat["past"], cat["tokens"], cat["arrival"],
                     np.asarray(durations, np.float64), np.asarray(frame_counts, np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Cycles and residency
# ---------------------------------------------------------------------------------------------------------------


def _calls(layer: LayerCost, sched: _Schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calls per step, frames per call, visible past frames per call) of ``layer`` at every step."""
    if layer.stage == "encoder":
        return np.ones_like(sched.frames), sched.frames, sched.past
    ones, zeros = np.ones_like(sched.frames), np.zeros_like(sched.frames)
    if layer.stage == "predictor":
        return sched.tokens, ones, zeros
    return sched.frames + sched.tokens, ones, zeros  # joiner: one call per frame, one more per emitted token


def _other_cycles(layer: LayerCost, config: AcceleratorConfig, n: np.ndarray, past: np.ndarray) -> np.ndarray:
    """Cycles of a call bounded by the MAC array and the decompressor (everything but DRAM)."""
    macs = n * layer.macs_per_frame + n * (past + n) * layer.context_macs
    return np.maximum(macs / config.macs_per_cycle, layer.codes_per_call / config.decompress_codes_per_cycle)


def _fetch_bytes(layer: LayerCost, n: np.ndarray, past: np.ndarray) -> np.ndarray:
    """DRAM bytes a call moves with nothing of ``layer`` resident: the weight, or the visible K/V (read the earlier
    frames, write the new ones)."""
    return layer.fetch_bytes_per_call + layer.kv_bytes_per_frame * (past + n)


def call_cycles(
    layer: LayerCost, config: AcceleratorConfig, resident_bytes: float, n: np.ndarray | int = 1,
    past: np.ndarray | int = 0,
) -> np.ndarray:
    """Cycles of one call of ``layer`` over ``n`` frames with ``past`` earlier frames visible, with
    ``resident_bytes`` of its movable bytes in SRAM: max(MACs / MAC rate, DRAM bytes / bandwidth per cycle,
    codes / decompression rate)."""
    n, past = np.asarray(n, np.int64), np.asarray(past, np.int64)
    movable = layer.movable_bytes
    streamed = 1.0 - resident_bytes / movable if movable else 1.0
    fetch = _fetch_bytes(layer, n, past) * streamed / config.dram_bytes_per_cycle
    return np.maximum(_other_cycles(layer, config, n, past), fetch)


@dataclass(frozen=True)
class Residency:
    """Where a configuration keeps things (bytes).

    Attributes:
        sram_bytes: the configuration's SRAM.
        reserved_bytes: activation buffer + state + biases and norms, always in SRAM.
        resident: for every layer with movable bytes (weight or K/V cache), how many of them stay in SRAM.
    """

    sram_bytes: int
    reserved_bytes: int
    resident: dict[str, int]

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def free_bytes(self) -> int:
        return self.sram_bytes - self.reserved_bytes - self.resident_bytes


def _saving_pieces(
    layer: LayerCost, config: AcceleratorConfig, calls: np.ndarray, n: np.ndarray, past: np.ndarray
) -> list[tuple[float, float]]:
    """(cycles saved per resident byte, bytes) pieces of ``layer``'s movable bytes, in the order they fill.

    With x of S bytes resident a call costs max(m, B·(1 − x/S) / bw): it saves B / (S·bw) cycles per resident byte
    while fetch-bound, i.e. while x < S·(1 − m·bw / B). Summed over the calls the saving per byte is a decreasing
    step function of x (convex cost), so its pieces come out in decreasing slope.
    """
    movable = layer.movable_bytes
    mask = calls > 0
    calls, n, past = calls[mask], n[mask], past[mask]
    if movable == 0 or calls.size == 0:
        return []
    fetch = _fetch_bytes(layer, n, past).astype(np.float64)
    other = _other_cycles(layer, config, n, past)
    bw = config.dram_bytes_per_cycle
    with np.errstate(divide="ignore", invalid="ignore"):
        until = np.where(fetch > 0, movable * (1.0 - other * bw / fetch), 0.0)
    # Whole bytes: at x = ceil(threshold) the call is no longer fetch-bound, so integer allocations reach it exactly
    # (flooring a fractional one would leave a sub-byte fetch excess and break ties between equal-cost plans).
    until = np.ceil(until - 1e-9)
    slope = calls * fetch / (movable * bw)
    keep = until > 0
    if not keep.any():
        return []
    order = np.argsort(until[keep], kind="stable")
    until, slope = np.minimum(until[keep][order], movable), slope[keep][order]
    # On [previous bound, bound) every call whose threshold is >= bound is still fetch-bound.
    still_bound = np.cumsum(slope[::-1])[::-1]
    bounds, first = np.unique(until, return_index=True)
    starts = np.concatenate([[0.0], bounds[:-1]])
    return [(float(a), float(b - s)) for a, b, s in zip(still_bound[first], bounds, starts) if b > s and a > 0]


def plan_residency(
    work: Workload, config: AcceleratorConfig, utterances: Sequence[UtteranceLike], flush_at_end: bool = True
) -> Residency:
    """Which bytes stay in SRAM (see the module docstring): the reserved buffers, state and parameters first, then
    the movable bytes that save the most cycles per byte over ``utterances``, greedily (exactly optimal, since the
    saving is convex); then the rest in layer order while space remains.

    Raises:
        ValueError: the SRAM cannot hold the reserved bytes.
    """
    return _plan(work, config, _schedule(work, utterances, flush_at_end))


def _plan(work: Workload, config: AcceleratorConfig, sched: _Schedule) -> Residency:
    reserved = work.reserved_bytes
    budget = config.sram_bytes - reserved
    if budget < 0:
        raise ValueError(f"{config.name}: {config.sram_bytes} bytes of SRAM cannot hold the {reserved} bytes this "
                         f"model needs there (activation buffer {work.activation_bytes}, state {work.state_bytes}, "
                         f"biases and norms {work.param_bytes})")
    pieces = []  # (-slope, layer index, piece index, bytes)
    for index, layer in enumerate(work.layers):
        calls, n, past = _calls(layer, sched)
        for piece, (slope, size) in enumerate(_saving_pieces(layer, config, calls, n, past)):
            pieces.append((-slope, index, piece, size))
    pieces.sort()
    resident = np.zeros(len(work.layers), np.float64)
    left = float(budget)
    for _, index, _, size in pieces:
        take = min(size, left)
        resident[index] += take
        left -= take
        if left <= 0:
            break
    # Bytes that save no cycles, in layer order, while space remains (harmless to latency; fewer DRAM reads).
    for index, layer in enumerate(work.layers):
        take = min(layer.movable_bytes - resident[index], left)
        if take > 0:
            resident[index] += take
            left -= take
    return Residency(
        config.sram_bytes, reserved,
        # Piece sizes and the budget are whole bytes, so the allocations are too (rounding only removes float noise).
        {layer.name: int(round(resident[i])) for i, layer in enumerate(work.layers) if layer.movable_bytes},
    )


# ---------------------------------------------------------------------------------------------------------------
# Streaming simulation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamingResult:
    """Latency of a workload on a configuration over a set of utterances.

    Per-utterance arrays (seconds): ``upl_s`` = ``backlog_s + lookahead_wait_s + last_step_s``.
    """

    config: AcceleratorConfig
    footprint: Footprint
    residency: Residency
    durations_s: np.ndarray  # audio per utterance
    num_frames: np.ndarray  # encoder frames per utterance
    compute_s: np.ndarray  # total compute per utterance
    upl_s: np.ndarray  # end of audio → final hypothesis
    last_step_s: np.ndarray  # compute of the last step
    backlog_s: np.ndarray  # wait of the last step for earlier steps still computing
    lookahead_wait_s: np.ndarray  # wait of the last step for the rest of its chunk (0 when flushed at the end)
    step_s: np.ndarray  # compute of every step, all utterances in order
    dram_bytes: float  # DRAM bytes moved over all utterances

    @property
    def rtf(self) -> float:
        """Real-time factor: total compute ÷ total audio."""
        return float(self.compute_s.sum() / self.durations_s.sum())

    @property
    def latency_ms_per_frame(self) -> float:
        """Mean compute per 40 ms encoder frame (ms)."""
        return float(1e3 * self.compute_s.sum() / self.num_frames.sum())

    @property
    def upl_ms_p50(self) -> float:
        return float(1e3 * np.percentile(self.upl_s, 50))

    @property
    def upl_ms_p90(self) -> float:
        return float(1e3 * np.percentile(self.upl_s, 90))

    @property
    def step_ms_max(self) -> float:
        """The slowest step's compute (ms)."""
        return float(1e3 * self.step_s.max())

    @property
    def dram_bytes_per_frame(self) -> float:
        return float(self.dram_bytes / self.num_frames.sum())

    def summary(self) -> dict[str, float | int | str]:
        """One flat row for tables (device.csv's latency and memory columns and a few more)."""
        return {
            "preset": self.config.name,
            "sram_bytes": int(self.config.sram_bytes),
            "dram_bytes_per_s": float(self.config.dram_bytes_per_s),
            "footprint_bytes": self.footprint.total_bytes,
            "weight_bytes": self.footprint.weight_bytes,
            "resident_bytes": self.residency.resident_bytes,
            "latency_ms_per_frame": self.latency_ms_per_frame,
            "upl_ms_p50": self.upl_ms_p50,
            "upl_ms_p90": self.upl_ms_p90,
            "rtf": self.rtf,
            "step_ms_max": self.step_ms_max,
            "dram_bytes_per_frame": self.dram_bytes_per_frame,
        }


def simulate(
    work: Workload, config: AcceleratorConfig, utterances: Sequence[UtteranceLike], flush_at_end: bool = True
) -> StreamingResult:
    """Stream ``utterances`` (each an :class:`Utterance` or ``(duration_s, tokens)``) through ``work`` on
    ``config``: residency planned over these utterances, then each step's compute by the cycle rule, steps queued
    on the accelerator as they arrive. See the module docstring for the definitions.

    Raises:
        ValueError: the SRAM cannot hold the reserved buffers; an utterance longer than the K/V cache allows.
    """
    sched = _schedule(work, utterances, flush_at_end)
    residency = _plan(work, config, sched)
    step_cycles = np.zeros(sched.frames.shape, np.float64)
    dram = 0.0
    for layer in work.layers:
        calls, n, past = _calls(layer, sched)
        resident = residency.resident.get(layer.name, 0)
        step_cycles += calls * call_cycles(layer, config, resident, n, past)
        if layer.movable_bytes:
            dram += float((calls * _fetch_bytes(layer, n, past)).sum()) * (1 - resident / layer.movable_bytes)
    step_s = step_cycles / config.clock_hz

    count = len(sched.durations_s)
    compute = np.bincount(sched.utterance, weights=step_s, minlength=count)
    upl, last, backlog, wait = (np.zeros(count) for _ in range(4))
    bounds = np.flatnonzero(np.diff(sched.utterance)) + 1
    for index, (arrival, cost) in enumerate(zip(np.split(sched.arrival_s, bounds), np.split(step_s, bounds))):
        # finish_k = max_j≤k (arrival_j + Σ_{i=j..k} cost_i): the queue of one accelerator, steps in order.
        done = np.cumsum(cost)
        finish = done + np.maximum.accumulate(arrival - (done - cost))
        previous_finish = finish[-2] if finish.size > 1 else 0.0
        # Summed from its parts rather than as finish − duration, so that UPL ≥ the last step holds exactly.
        backlog[index] = max(0.0, previous_finish - arrival[-1])
        wait[index] = arrival[-1] - sched.durations_s[index]
        last[index] = cost[-1]
        upl[index] = backlog[index] + wait[index] + last[index]
    return StreamingResult(config, work.footprint(), residency, sched.durations_s, sched.num_frames, compute, upl,
                           last, backlog, wait, step_s, dram)


def sweep(
    work: Workload,
    utterances: Sequence[UtteranceLike],
    base: AcceleratorConfig,
    sram_bytes: Sequence[int] | None = None,
    dram_bytes_per_s: Sequence[float] | None = None,
    flush_at_end: bool = True,
) -> list[dict[str, float | int | str | bool]]:
    """:meth:`StreamingResult.summary` over the grid ``sram_bytes × dram_bytes_per_s`` (either defaults to
    ``base``'s value), other fields from ``base``. A point whose SRAM cannot hold the reserved buffers gives a row
    with ``feasible = False`` and NaN latencies rather than an error, so a figure can show where a model stops
    fitting."""
    rows = []
    for sram in (sram_bytes if sram_bytes is not None else [base.sram_bytes]):
        for bandwidth in (dram_bytes_per_s if dram_bytes_per_s is not None else [base.dram_bytes_per_s]):
            config = base.replace(sram_bytes=int(sram), dram_bytes_per_s=float(bandwidth))
            if config.sram_bytes < work.reserved_bytes:
                nan = float("nan")
                rows.append({"preset": base.name, "sram_bytes": config.sram_bytes,
                             "dram_bytes_per_s": config.dram_bytes_per_s, "feasible": False,
                             "footprint_bytes": work.footprint().total_bytes,
                             "weight_bytes": work.footprint().weight_bytes, "resident_bytes": 0,
                             "latency_ms_per_frame": nan, "upl_ms_p50": nan, "upl_ms_p90": nan, "rtf": nan,
                             "step_ms_max": nan, "dram_bytes_per_frame": nan})
                continue
            rows.append({**simulate(work, config, utterances, flush_at_end).summary(), "feasible": True})
    return rows
