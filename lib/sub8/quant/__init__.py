"""Sub-8-bit weight quantization (design.md §5).

- ``base``: the Quantizer interface (``levels``, ``quantize`` → codes + levels, ``quantize_int8`` → codes + int8
  LUT + scale), nearest-level search, the int8 grid; ``uniform``, ``lloyd_max``: quantizers; ``mu_law``: GQ's
  level space; ``mracos``: the S8BQAT regularizer.
- ``plan``: which weights, at how many bits.
- ``gq``: the General Quantizer (soft-to-hard, trainable μ-law levels); ``allocate``: per-layer bit allocation
  under a size budget from measured sensitivities.
- ``native``: native integer QAT (weights and activations, integer matmuls in the forward) and its plans.
- ``apply``: training hooks (``UniformQAT``, ``S8BQAT``), hard quantization for evaluation and PTQ
  (``hard_quantize_``), export and packed size.

Post-training quantization at b bits, per tensor::

    quantizers = plan_quantizers(model, QuantPlan.uniform(b), lambda bits: UniformQuantizer(bits, per_channel=False))
    hard_quantize_(model, quantizers)
    size = quantized_size_bytes(export_quantized(model, quantizers), model)
"""

from sub8.quant.apply import (
    S8BQAT,
    FakeQuantize,
    QuantizedTensor,
    UniformQAT,
    export_quantized,
    hard_quantize_,
    plan_quantizers,
    quantized_size_bytes,
)
from sub8.quant.base import (
    FixedLevels,
    Quantizer,
    check_bits,
    dequantize,
    int8_levels,
    nearest_level,
    snap_to_int8_grid,
)
from sub8.quant.allocate import BitAllocation, allocate_bits, auto_plan, measure_sensitivity
from sub8.quant.gq import GQ, GQQuantizer, GQSchedule, soft_quantize
from sub8.quant.lloyd_max import LloydMaxQuantizer, lloyd_max_levels
from sub8.quant.mu_law import mu_law_compress, mu_law_expand, mu_law_levels
from sub8.quant.mracos import linear_ramp, mracos, mracos_sum
from sub8.quant.native import (
    NATIVE_PLANS,
    NativePlan,
    NativeQAT,
    activation_ranges,
    native_plan,
    native_quantized,
    native_size,
)
from sub8.quant.plan import QuantPlan, quantizable_parameters
from sub8.quant.uniform import UniformQuantizer

__all__ = [
    "BitAllocation",
    "FakeQuantize",
    "FixedLevels",
    "GQ",
    "GQQuantizer",
    "GQSchedule",
    "LloydMaxQuantizer",
    "NATIVE_PLANS",
    "NativePlan",
    "NativeQAT",
    "QuantPlan",
    "QuantizedTensor",
    "Quantizer",
    "S8BQAT",
    "UniformQAT",
    "UniformQuantizer",
    "activation_ranges",
    "allocate_bits",
    "auto_plan",
    "check_bits",
    "dequantize",
    "export_quantized",
    "hard_quantize_",
    "int8_levels",
    "linear_ramp",
    "lloyd_max_levels",
    "measure_sensitivity",
    "mracos",
    "mracos_sum",
    "mu_law_compress",
    "mu_law_expand",
    "mu_law_levels",
    "native_plan",
    "native_quantized",
    "native_size",
    "nearest_level",
    "plan_quantizers",
    "quantizable_parameters",
    "quantized_size_bytes",
    "snap_to_int8_grid",
    "soft_quantize",
]
