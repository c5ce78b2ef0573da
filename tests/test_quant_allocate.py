"""Automatic bit allocation: exact against brute force, budgets met, sensitivities measured without side effects."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sub8.quant import LloydMaxQuantizer, QuantPlan, export_quantized, plan_quantizers, quantized_size_bytes
from sub8.quant.allocate import allocate_bits, auto_plan, float_bytes, measure_sensitivity, packed_bytes
from sub8.quant.plan import quantizable_parameters
from test_quant_apply import fixed_batch, tiny_model


def brute_force(sensitivity, numels, budget, fixed):
    best = (math.inf, None)
    names = list(sensitivity)
    for choice in itertools.product(*(sorted(sensitivity[n]) for n in names)):
        size = fixed + sum(packed_bytes(numels[n], b) for n, b in zip(names, choice))
        cost = sum(sensitivity[n][b] for n, b in zip(names, choice))
        if size <= budget and cost < best[0]:
            best = (cost, dict(zip(names, choice)))
    return best


@pytest.mark.parametrize("monotone", [True, False])
def test_allocation_is_optimal_against_brute_force(monotone):
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        names = [f"layer{i}" for i in range(5)]
        numels = {n: int(torch.randint(50, 5000, (1,), generator=gen)) for n in names}
        widths = (1, 2, 3, 4, 6, 8)
        sensitivity = {}
        for n in names:
            values = torch.rand(len(widths), generator=gen).double()
            if monotone:  # fewer bits, more damage
                values = values.sort(descending=True).values * float(torch.rand(1, generator=gen) * 10)
            sensitivity[n] = dict(zip(widths, values.tolist()))
        fixed = 1000
        smallest = fixed + sum(packed_bytes(numels[n], 1) for n in names)
        largest = fixed + sum(packed_bytes(numels[n], 8) for n in names)
        for fraction in (0.0, 0.1, 0.35, 0.6, 1.0):
            budget = int(smallest + fraction * (largest - smallest))
            allocation = allocate_bits(sensitivity, numels, budget, fixed_bytes=fixed)
            best_cost, _ = brute_force(sensitivity, numels, budget, fixed)
            size = fixed + sum(packed_bytes(numels[n], b) for n, b in allocation.bits.items())
            assert allocation.size_bytes == size <= budget, (trial, fraction)
            assert math.isclose(allocation.predicted_increase, best_cost, rel_tol=1e-12, abs_tol=1e-12), (
                trial, fraction)
            assert math.isclose(sum(sensitivity[n][b] for n, b in allocation.bits.items()), best_cost,
                                rel_tol=1e-12, abs_tol=1e-12)
        # the whole budget: every layer at its least sensitive width
        everything = allocate_bits(sensitivity, numels, largest, fixed_bytes=fixed)
        assert everything.predicted_increase == pytest.approx(sum(min(r.values()) for r in sensitivity.values()))


def test_allocation_prefers_bits_where_they_buy_the_most():
    # two layers of equal size: the sensitive one keeps 8 bits, the robust one drops to 1
    numels = {"sensitive": 1000, "robust": 1000}
    sensitivity = {"sensitive": {1: 10.0, 8: 0.0}, "robust": {1: 0.1, 8: 0.0}}
    budget = packed_bytes(1000, 8) + packed_bytes(1000, 1)
    allocation = allocate_bits(sensitivity, numels, budget)
    assert allocation.bits == {"sensitive": 8, "robust": 1}
    plan = allocation.to_plan()
    assert plan.rules == [("sensitive", 8), ("robust", 1)]


def test_a_budget_below_the_smallest_plan_is_a_clear_error():
    numels = {"a": 1000}
    with pytest.raises(ValueError, match="below the smallest possible size"):
        allocate_bits({"a": {2: 1.0, 4: 0.5}}, numels, budget_bytes=packed_bytes(1000, 2) - 1)
    with pytest.raises(ValueError, match="bit width 9 is invalid"):
        packed_bytes(10, 9)


def test_sensitivity_is_measured_per_layer_and_leaves_the_model_unchanged():
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [fixed_batch()]
    table = measure_sensitivity(model, batches, bits=(1, 2, 4, 8))
    assert list(table) == quantizable_parameters(model)
    for name, row in table.items():
        assert list(row) == [1, 2, 4, 8]
        assert row[1] >= row[2] >= row[4] >= row[8], name  # the monotone envelope
    assert sum(row[1] for row in table.values()) > sum(abs(row[8]) for row in table.values())
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    raw = measure_sensitivity(model, batches, bits=(2, 8), names=["joiner.output.weight"], monotone=False)
    assert list(raw) == ["joiner.output.weight"]


def test_auto_plan_meets_the_packed_size_budget_of_the_exported_model():
    model = tiny_model()
    batches = [fixed_batch()]
    names = quantizable_parameters(model)
    rest = float_bytes(model, names)
    all_2 = rest + sum(packed_bytes(model.get_parameter(n).numel(), 2) for n in names)
    all_8 = rest + sum(packed_bytes(model.get_parameter(n).numel(), 8) for n in names)
    budget = (all_2 + all_8) // 2
    plan = auto_plan(model, batches, budget, bits=(2, 4, 8))
    bits = dict(plan.resolve(model))
    assert set(bits) == set(names) and set(bits.values()) <= {2, 4, 8} and len(set(bits.values())) > 1
    exported = export_quantized(model, plan_quantizers(model, plan, lambda b: LloydMaxQuantizer(b, max_moves=0)))
    assert quantized_size_bytes(exported, model) <= budget
    assert isinstance(plan, QuantPlan)
