"""Automatic bit allocation (issue 5): the plan that fits a packed-size budget with the least loss.

1. :func:`measure_sensitivity`: for every quantizable weight and every candidate bit width, the increase of the
   training loss on a few batches when ONLY that weight is post-training quantized (per-tensor Lloyd-Max levels
   snapped to the int8 grid, the levels GQ would start near), the rest staying float. Paired: the same batches
   give the float reference. Cost: one forward per (weight, bit width, batch), no backward.
2. :func:`allocate_bits`: the bit width per weight that minimises the summed sensitivity subject to the packed
   size ``Σ_w bytes(w, b_w) + fixed_bytes <= budget`` (a multiple-choice knapsack), solved EXACTLY by dynamic
   programming over the weights on the Pareto frontier of (bytes so far, loss so far): a partial allocation that
   is both larger and no better than another can never complete into a better plan, so it is dropped. The
   frontier stays small in practice (sizes and losses are distinct reals), so this is exact without quantizing
   the byte axis.
3. :func:`auto_plan`: both, returning a :class:`QuantPlan` naming every weight.

The loss model is additive (each weight's damage measured alone, summed): the usual first-order assumption of
mixed-precision search (as in HAWQ); interactions between layers are not modelled.

Sizes are those of :func:`sub8.quant.apply.quantized_size_bytes` for per-tensor codebook quantization: ⌈N·b/8⌉
packed codes + a 2^b-entry int8 LUT + one float32 scale per weight, and 4 bytes for every parameter left float.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sub8.models import deployed_parameters
from sub8.quant.base import Quantizer, check_bits, dequantize, int8_levels
from sub8.quant.lloyd_max import LloydMaxQuantizer
from sub8.quant.plan import QuantPlan, quantizable_parameters

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 8)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of one per-tensor quantized weight: packed codes, 2^b-entry int8 LUT, float32 scale."""
    return -(-numel * check_bits(bits) // 8) + 2**bits + 4


def _batch_args(batch) -> tuple[torch.Tensor, ...]:
    """(feats, feat_lens, tokens, token_lens) of a :class:`sub8.data.batching.Batch` or of such a tuple."""
    if hasattr(batch, "feats"):
        return batch.feats, batch.feat_lens, batch.tokens, batch.token_lens
    return tuple(batch)


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> float:
    return sum(float(model.loss(*batch)[0]) for batch in batches) / len(batches)


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    batches: Iterable,
    bits: Sequence[int] = DEFAULT_BITS,
    names: Sequence[str] | None = None,
    make_quantizer: Callable[[int], Quantizer] = lambda b: LloydMaxQuantizer(b, max_moves=0),
    monotone: bool = True,
) -> dict[str, dict[int, float]]:
    """``{weight name: {bits: loss increase}}``: the mean loss over ``batches`` (in eval mode) with only that
    weight quantized by ``make_quantizer(bits)`` (int8-grid levels), minus the float model's mean loss.

    With ``monotone`` each row is made non-increasing in the bit width (a width's value is the largest measured at
    that width or any wider one): quantizing harder does not help in expectation, and a noisy dip would otherwise
    make the allocator prefer fewer bits for nothing. The model's weights and train/eval mode are restored.

    Args:
        batches: a few batches (``Batch`` objects or (feats, feat_lens, tokens, token_lens) tuples), on the
            model's device.
        names: the weights to measure; default every quantizable weight.
    """
    batches = [_batch_args(b) for b in batches]
    if not batches:
        raise ValueError("measure_sensitivity: no batches given")
    names = list(names) if names is not None else quantizable_parameters(model)
    widths = sorted({check_bits(b) for b in bits})
    was_training = model.training
    model.eval()
    try:
        reference = _mean_loss(model, batches)
        table: dict[str, dict[int, float]] = {}
        for name in names:
            weight = model.get_parameter(name)
            original = weight.detach().clone()
            row = {}
            for b in widths:
                codes, lut, scale = make_quantizer(b).quantize_int8(original)
                weight.copy_(dequantize(codes, int8_levels(lut, scale)))
                row[b] = _mean_loss(model, batches) - reference
                weight.copy_(original)
            if monotone:
                for narrower, wider in zip(reversed(widths[:-1]), reversed(widths[1:])):
                    row[narrower] = max(row[narrower], row[wider])
            table[name] = row
    finally:
        model.train(was_training)
    return table


@dataclass
class BitAllocation:
    """The chosen bits per weight, its packed size (including ``fixed_bytes``) and its summed sensitivity."""

    bits: dict[str, int]
    size_bytes: int
    predicted_increase: float

    def to_plan(self) -> QuantPlan:
        """A plan naming every weight with its bits (each pattern is the exact parameter name)."""
        return QuantPlan([(name, b) for name, b in self.bits.items()])


def allocate_bits(
    sensitivity: dict[str, dict[int, float]],
    numels: dict[str, int],
    budget_bytes: int,
    fixed_bytes: int = 0,
) -> BitAllocation:
    """The exact minimum of Σ sensitivity[w][b_w] subject to ``fixed_bytes + Σ packed_bytes(numel_w, b_w) <=
    budget_bytes`` (module docstring). Among equally good allocations the smallest wins. Raises ValueError when
    even the narrowest allowed widths do not fit."""
    names = list(sensitivity)
    options = []  # per weight: (bits, bytes, cost) arrays
    for name in names:
        if not sensitivity[name]:
            raise ValueError(f"allocate_bits: no bit widths measured for {name!r}")
        widths = np.array(sorted(sensitivity[name]), dtype=np.int64)
        sizes = np.array([packed_bytes(numels[name], int(b)) for b in widths], dtype=np.int64)
        costs = np.array([sensitivity[name][int(b)] for b in widths], dtype=np.float64)
        options.append((widths, sizes, costs))
    # The least bytes the weights after position i still need: a partial allocation that cannot fit is dropped.
    min_rest = np.concatenate([np.cumsum([s.min() for _, s, _ in options][::-1])[::-1], [0]])
    capacity = budget_bytes - fixed_bytes
    if min_rest[0] > capacity:
        raise ValueError(
            f"allocate_bits: budget {budget_bytes} bytes is below the smallest possible size "
            f"{int(min_rest[0]) + fixed_bytes} bytes (every weight at its narrowest width)"
        )

    frontier_bytes = np.zeros(1, dtype=np.int64)
    frontier_cost = np.zeros(1, dtype=np.float64)
    history = []  # per weight: (parent index, option index) of every frontier state
    for i, (_, sizes, costs) in enumerate(options):
        total_bytes = (frontier_bytes[:, None] + sizes[None, :]).ravel()
        total_cost = (frontier_cost[:, None] + costs[None, :]).ravel()
        parent, choice = np.divmod(np.arange(total_bytes.size), sizes.size)
        keep = np.flatnonzero(total_bytes + min_rest[i + 1] <= capacity)
        # Pareto: sort by bytes (then cost); keep a state only if it costs strictly less than every smaller one.
        keep = keep[np.lexsort((total_cost[keep], total_bytes[keep]))]
        cost_sorted = total_cost[keep]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(cost_sorted)[:-1]])
        keep = keep[cost_sorted < best_before]
        frontier_bytes, frontier_cost = total_bytes[keep], total_cost[keep]
        history.append((parent[keep], choice[keep]))

    state = int(np.argmin(frontier_cost))  # the first minimum is the smallest (the frontier is sorted by bytes)
    size, cost = int(frontier_bytes[state]), float(frontier_cost[state])
    chosen: dict[str, int] = {}
    for name, (widths, _, _), (parents, choices) in reversed(list(zip(names, options, history))):
        chosen[name] = int(widths[choices[state]])
        state = int(parents[state])
    return BitAllocation({name: chosen[name] for name in names}, size + fixed_bytes, cost)


def float_bytes(model: nn.Module, quantized: Iterable[str]) -> int:
    """Bytes of every deployed parameter not in ``quantized``, kept as float32 (training-only modules such as the
    CTC head are not stored, as in :func:`sub8.quant.quantized_size_bytes`)."""
    quantized = set(quantized)
    return sum(4 * p.numel() for name, p in deployed_parameters(model) if name not in quantized)


def auto_plan(
    model: nn.Module,
    batches: Iterable,
    budget_bytes: int,
    bits: Sequence[int] = DEFAULT_BITS,
    names: Sequence[str] | None = None,
    make_quantizer: Callable[[int], Quantizer] = lambda b: LloydMaxQuantizer(b, max_moves=0),
) -> QuantPlan:
    """The plan whose whole model (quantized weights packed, every other parameter float32) fits
    ``budget_bytes`` with the least summed loss increase measured by :func:`measure_sensitivity`."""
    sensitivity = measure_sensitivity(model, batches, bits, names, make_quantizer)
    numels = {name: model.get_parameter(name).numel() for name in sensitivity}
    allocation = allocate_bits(sensitivity, numels, budget_bytes, fixed_bytes=float_bytes(model, sensitivity))
    return allocation.to_plan()
