"""How quantizers take part in training and evaluation (design.md §5), as :class:`sub8.train.Hooks`.

- :class:`UniformQAT`: fake quantization with a straight-through gradient. Implemented with
  ``torch.nn.utils.parametrize``: the float weight stays the trained Parameter (same object, so the optimizer
  already holds it), every read of ``module.weight`` returns its fake-quantized value, and removing the
  parametrization at the end leaves a plain module with the hard-quantized values. The same mechanism covers
  nn.LSTM without giving up its fused kernel: ``nn.LSTM.forward`` re-reads its weights into ``_flat_weights``
  whenever they are new tensors (``_update_flat_weights``), so every forward is still ONE fused ``_VF.lstm`` call,
  now on the fake-quantized matrices. (A forward-pre-hook cannot do this cleanly: a Parameter attribute cannot be
  set to a non-leaf tensor.)
- :class:`S8BQAT`: Lloyd-Max levels per tensor from the fp32 weights at the start, snapped to the int8 grid; the
  MRACos regularizer with a linear λ ramp; the hard compressor W ← Q(W) every ``compress_every`` updates and at
  the end. The forward runs the float weights (the regularizer and the compressor do the quantizing), so a step
  costs the fp32 step plus the regularizer.
- :func:`hard_quantize_`, :func:`export_quantized`, :func:`quantized_size_bytes`: evaluation, post-training
  quantization and the results tables. Evaluation always runs the int8-grid weights the device would run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sub8.models import deployed_parameters
from sub8.quant.base import FixedLevels, Quantizer, dequantize, int8_levels
from sub8.quant.lloyd_max import LloydMaxQuantizer
from sub8.quant.mracos import linear_ramp, mracos_sum
from sub8.quant.plan import QuantPlan
from sub8.quant.uniform import UniformQuantizer
from sub8.train import Hooks


def plan_quantizers(model: nn.Module, plan: QuantPlan, make: Callable[[int], Quantizer]) -> dict[str, Quantizer]:
    """One quantizer per weight the plan resolves to: ``{param name: make(bits)}``."""
    return {name: make(bits) for name, bits in plan.resolve(model)}


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


@torch.no_grad()
def hard_quantize_(model: nn.Module, quantizers: dict[str, Quantizer]) -> None:
    """Replace each named weight, in place, by its int8-grid quantized value (post-training quantization, the end
    of QAT, the hard compressor)."""
    for name, quantizer in quantizers.items():
        weight = model.get_parameter(name)
        codes, lut, scale = quantizer.quantize_int8(weight)
        weight.copy_(dequantize(codes, int8_levels(lut, scale)))


@dataclass
class QuantizedTensor:
    """What the device stores for one weight: ``codes`` (shaped like the weight, int64 here, ``bits`` bits each when
    packed) index ``lut`` (int8, (K,) shared or (C, K) per output channel) times ``scale`` (float32, () or (C,))."""

    codes: torch.Tensor
    lut: torch.Tensor
    scale: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, int8_levels(self.lut, self.scale))

    def packed_bytes(self) -> int:
        """Packed codes ⌈N·b/8⌉ + LUT (one byte an entry) + scales (float32)."""
        return -(-self.codes.numel() * self.bits // 8) + self.lut.numel() + 4 * self.scale.numel()


@torch.no_grad()
def export_quantized(model: nn.Module, quantizers: dict[str, Quantizer]) -> dict[str, QuantizedTensor]:
    """The device form of every named weight."""
    exported = {}
    for name, quantizer in quantizers.items():
        codes, lut, scale = quantizer.quantize_int8(model.get_parameter(name))
        exported[name] = QuantizedTensor(codes, lut, scale, quantizer.bits)
    return exported


def quantized_size_bytes(exported: dict[str, QuantizedTensor], model: nn.Module | None = None) -> int:
    """Bytes of the quantized weights; with ``model``, plus 4 bytes for every deployed parameter left in float32
    (training-only modules such as the CTC head are not stored)."""
    size = sum(q.packed_bytes() for q in exported.values())
    if model is not None:
        size += sum(4 * p.numel() for name, p in deployed_parameters(model) if name not in exported)
    return size


class FakeQuantize(nn.Module):
    """A parametrization: the weight as its quantizer's straight-through fake-quantized value."""

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.quantizer.fake_quantize(weight)


class UniformQAT(Hooks):
    """Symmetric uniform QAT (straight-through), per output channel or per tensor, at the plan's bits."""

    def __init__(self, plan: QuantPlan, per_channel: bool = True) -> None:
        self.plan = plan
        self.per_channel = per_channel
        self.names: list[str] = []

    def quantizers(self, model: nn.Module) -> dict[str, Quantizer]:
        return plan_quantizers(model, self.plan, lambda bits: UniformQuantizer(bits, self.per_channel))

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        quantizers = self.quantizers(model)
        self.names = list(quantizers)
        for name, quantizer in quantizers.items():
            parametrize.register_parametrization(*_owner(model, name), FakeQuantize(quantizer))

    def on_train_end(self, model: nn.Module) -> None:
        # leave_parametrized=True writes the fake-quantized (= hard) values into the float Parameter.
        for name in self.names:
            parametrize.remove_parametrizations(*_owner(model, name), leave_parametrized=True)
        self.names = []


class S8BQAT(Hooks):
    """Sub-8-bit QAT for an 8-bit accelerator (S8BQAT): Lloyd-Max levels, MRACos regularizer, hard compressor.

    Args:
        plan: which weights, at how many bits.
        reg_weight: final λ of the regularizer term λ · mean R over all quantized weights.
        ramp_steps: updates over which λ rises linearly to ``reg_weight``.
        compress_every: T; the hard compressor runs after every T-th update.
        regularize, compress: False gives the ablations ``s8bqat_no_regularizer`` and ``s8bqat_no_compressor``
            (the final hard quantization at the end of training happens either way: evaluation runs quantized
            weights).
    """

    def __init__(
        self,
        plan: QuantPlan,
        reg_weight: float = 1.0,
        ramp_steps: int = 100,
        compress_every: int = 100,
        regularize: bool = True,
        compress: bool = True,
    ) -> None:
        if compress_every < 1:
            raise ValueError(f"S8BQAT: compress_every must be >= 1, got {compress_every}")
        self.plan = plan
        self.reg_weight = reg_weight
        self.ramp_steps = ramp_steps
        self.compress_every = compress_every
        self.regularize = regularize
        self.compress = compress
        self.levels: dict[str, FixedLevels] = {}
        self.compressions = 0

    def quantizers(self, model: nn.Module | None = None) -> dict[str, Quantizer]:
        """The fixed int8-grid levels of every quantized weight (for :func:`export_quantized`)."""
        return dict(self.levels)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # On a resumed run these levels are replaced by the checkpoint's in load_state_dict.
        self.levels = {}
        for name, bits in self.plan.resolve(model):
            lut, scale = LloydMaxQuantizer(bits).int8_grid(model.get_parameter(name))
            self.levels[name] = FixedLevels(bits, lut, scale)
        self.compressions = 0

    def extra_loss(self, step: int, model: nn.Module) -> torch.Tensor | None:
        if not self.regularize:
            return None
        total, count = 0.0, 0
        for name, quantizer in self.levels.items():
            if quantizer.lut.unique().numel() < 2:
                continue  # a constant tensor: already on its only level
            weight = model.get_parameter(name)
            total = total + mracos_sum(weight, quantizer.lut.to(weight.device), quantizer.scale.to(weight.device))
            count += weight.numel()
        return linear_ramp(step, self.reg_weight, self.ramp_steps) * total / max(count, 1)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.compress and step % self.compress_every == 0:
            self.hard_compress(model)

    def on_train_end(self, model: nn.Module) -> None:
        self.hard_compress(model)

    def hard_compress(self, model: nn.Module) -> None:
        """W ← Q(W) in place for every quantized weight."""
        hard_quantize_(model, self.levels)
        self.compressions += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.levels),
            "bits": [q.bits for q in self.levels.values()],
            "luts": [q.lut for q in self.levels.values()],
            "scales": [q.scale for q in self.levels.values()],
            "compressions": self.compressions,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.levels and list(self.levels) != state["names"]:
            raise ValueError(f"S8BQAT: checkpoint quantizes {state['names']}, this plan {list(self.levels)}")
        self.levels = {
            name: FixedLevels(bits, lut, scale)
            for name, bits, lut, scale in zip(
                state["names"], state["bits"], state["luts"], state["scales"], strict=True
            )
        }
        self.compressions = state["compressions"]
