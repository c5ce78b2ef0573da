"""GQ: the windowed soft assignment against a brute-force reference, O(N) memory, ordered μ-law levels, gradients,
the int8-grid end state, plan errors, the fused LSTM kernel, and exact resume in sub8.train."""

from __future__ import annotations

import importlib
import io
import math

import pytest
import torch
import torch.nn.modules.rnn as rnn_module
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from sub8.io import load_checkpoint
from sub8.quant import (
    QuantPlan,
    dequantize,
    export_quantized,
    int8_levels,
    nearest_level,
    quantizable_parameters,
    snap_to_int8_grid,
)
from sub8.quant.gq import GQ, GQQuantizer, GQSchedule, _CellTables, _owner, smallest_initial_gap, soft_quantize
from sub8.quant.mu_law import mu_law_expand, mu_law_levels
from sub8.train import TrainConfig, train
from test_quant_apply import TOKENIZER, CountingVF, fixed_batch, s8bqat_run, tiny_loader, tiny_model
from killing import Killed, killed_at


def brute_force_soft(w: torch.Tensor, levels: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The definition over ALL K levels, with an explicit (N, K) matrix."""
    p = torch.softmax(-beta * (w.reshape(-1, 1) - levels) ** 2, dim=1)
    return (p * levels).sum(dim=1).reshape(w.shape)


def grads(out: torch.Tensor, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("bits, window", [(1, 4), (2, 4), (3, 8)])
def test_window_covering_every_level_equals_brute_force_at_any_sharpness(bits, window):
    # a window of K levels (shifted inward at the ends) is every level
    torch.manual_seed(0)
    w = torch.randn(300, dtype=torch.float64, requires_grad=True)
    levels = mu_law_levels(bits, 1.5, 4.0).double().requires_grad_()
    for beta_value in (0.01, 1.0, 30.0):
        beta = torch.tensor(beta_value, dtype=torch.float64, requires_grad=True)
        out, ref = soft_quantize(w, levels, beta, window=window, chunk_size=64), brute_force_soft(w, levels, beta)
        assert torch.allclose(out, ref, atol=1e-12)
        for a, b in zip(grads(out, (w, levels, beta)), grads(ref, (w, levels, beta))):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("bits, sharpness, width", [(3, 10, 4), (4, 10, 4), (6, 10, 4), (4, 40, 2), (8, 40, 2)])
def test_a_narrow_window_equals_brute_force_once_far_levels_are_negligible(bits, sharpness, width):
    # At normalised sharpness 10 a level outside the window of four weighs < exp(-37.5) ~ 5e-17 of the nearest one;
    # from PAIR_LOGIT_GAP on (here 40) the window is the two brackets, in closed form, and a level beyond them
    # weighs < exp(-40) ~ 4e-18.
    torch.manual_seed(bits)
    scale, mu = 0.8, 4.0
    w = (0.5 * torch.randn(40, 25, dtype=torch.float64)).requires_grad_()
    levels = mu_law_levels(bits, scale, mu).double().requires_grad_()
    beta = torch.tensor(sharpness / (smallest_initial_gap(bits, mu) * scale) ** 2, dtype=torch.float64,
                        requires_grad=True)
    assert _CellTables(levels.detach(), 4, beta.item()).width == width
    out, ref = soft_quantize(w, levels, beta, chunk_size=97), brute_force_soft(w, levels, beta)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(grads(out, (w, levels, beta)), grads(ref, (w, levels, beta))):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-9)


def test_gradients_pass_gradcheck_at_low_sharpness():
    torch.manual_seed(1)
    w = torch.randn(60, dtype=torch.float64, requires_grad=True)
    levels = mu_law_levels(4, 1.0, 4.0).double().requires_grad_()
    beta = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *args: soft_quantize(*args, chunk_size=16), (w, levels, beta))


@pytest.mark.parametrize("bits", [3, 8])
def test_hard_forward_is_the_nearest_level_with_the_soft_gradient(bits):
    torch.manual_seed(2)
    w = torch.randn(5000, requires_grad=True)
    levels = mu_law_levels(bits, 2.0, 4.0).requires_grad_()
    beta = torch.tensor(5.0, requires_grad=True)
    # weights exactly on midpoints follow nearest_level's tie rule
    with torch.no_grad():
        w[: levels.numel() - 1] = (levels[1:] + levels[:-1]) / 2
    hard = soft_quantize(w, levels, beta, hard=True, chunk_size=128)
    assert torch.equal(hard, dequantize(nearest_level(w, levels.detach()), levels.detach()))
    soft = soft_quantize(w, levels, beta, chunk_size=128)
    for a, b in zip(grads(hard, (w, levels, beta)), grads(soft, (w, levels, beta))):
        assert torch.equal(a, b)


class ShapeLog(TorchDispatchMode):
    """Records the number of elements of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_soft_assignment_memory_is_linear_no_n_by_k_tensor():
    n, bits, chunk, window = 100_000, 8, 1000, 4
    w = torch.randn(n, requires_grad=True)
    quantizer = GQQuantizer.fit(w, bits)
    log = ShapeLog()
    with log:
        out = quantizer.soft_quantize(w, alpha_hat=2.0, hard=False, window=window, chunk_size=chunk)
        out.sum().backward()
    # Nothing larger than the weights themselves (output, gradient, the cell of each weight); everything else is
    # one chunk's (window, chunk) scratch or a table that does not grow with N (the cell lookup's bins).
    # An (N, K) matrix would be 256 x the weights.
    assert max(log.numels) == n
    assert max(size for size in log.numels if size != n) <= max(chunk * window, 2 * (1 << 14))
    assert quantizer.u.grad is not None and w.grad is not None


def test_gq_forward_matches_the_design_formula():
    """w̃ = Σ_k softmax_k(−α (w − c_k)²/s²) c_k with c_k = s·F⁻¹_μ(u_k), α = α̂ / g₀² (g₀: smallest initial gap)."""
    torch.manual_seed(3)
    w = torch.randn(500) * 0.3
    quantizer = GQQuantizer.fit(w, bits=2, mu=4.0)
    s = quantizer.log_scale.exp().detach()
    levels = s * mu_law_expand(quantizer.u.detach(), 4.0)
    alpha = 3.0 / smallest_initial_gap(2, 4.0) ** 2
    expected = brute_force_soft(w, levels, alpha / s**2)
    assert torch.allclose(quantizer.soft_quantize(w, 3.0, hard=False), expected, atol=1e-6)


def test_schedule_anneals_geometrically_then_goes_hard():
    schedule = GQSchedule(alpha_start=1.0, alpha_hard=16.0, anneal_steps=4)
    assert [schedule.alpha(t) for t in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0]
    assert [schedule.hard(t) for t in range(6)] == [False] * 4 + [True] * 2
    assert GQSchedule(anneal_steps=0).hard(1)
    with pytest.raises(ValueError, match="alpha_start"):
        GQSchedule(alpha_start=4.0, alpha_hard=2.0)


def run_gq(model, hooks, steps, lr=1e-2, optimizer_cls=torch.optim.AdamW):
    optimizer = optimizer_cls(model.parameters(), lr=lr)
    hooks.on_train_start(model, optimizer)
    for step in range(1, steps + 1):
        hooks.before_step(step, model)
        loss, _ = model.loss(*fixed_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooks.after_step(step, model, optimizer)
    return optimizer


def test_levels_stay_ordered_inside_the_mu_law_space_after_optimizer_steps():
    model = tiny_model()
    hooks = GQ(QuantPlan.uniform(3), anneal_steps=3)
    # A large level learning rate makes levels cross and leave [-1, 1] before the projection.
    optimizer = run_gq(model, hooks, steps=5, lr=1e-2)
    optimizer.param_groups[-1]["lr"] = 0.5
    projected_steps = 0
    for step in range(6, 9):
        hooks.before_step(step, model)
        loss, _ = model.loss(*fixed_batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        crossed = any(bool((q.u.diff() < 0).any() or (q.u.abs() > 1).any()) for q in hooks.tensors.values())
        projected_steps += crossed
        hooks.after_step(step, model, optimizer)
        for q in hooks.tensors.values():
            assert bool((q.u.diff() >= 0).all()) and bool((q.u.abs() <= 1).all())
            s = q.log_scale.exp()
            levels = q.levels()
            assert torch.allclose(levels, s * mu_law_expand(q.u, q.mu)) and bool((levels.abs() <= s * (1 + 1e-6)).all())
    assert projected_steps > 0  # the projection had something to do


def test_projection_permutes_the_optimizer_state_with_the_levels():
    quantizer = GQQuantizer(2)
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.1)
    quantizer.u.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    quantizer.log_scale.grad = torch.tensor(0.0)
    optimizer.step()
    with torch.no_grad():
        quantizer.u.copy_(torch.tensor([0.5, -0.2, 1.7, -3.0]))
    moments = optimizer.state[quantizer.u]["exp_avg"].clone()
    quantizer.project_(optimizer)
    assert torch.equal(quantizer.u, torch.tensor([-1.0, -0.2, 0.5, 1.0]))
    assert torch.equal(optimizer.state[quantizer.u]["exp_avg"], moments[[3, 1, 0, 2]])


@pytest.mark.parametrize("hard", [False, True])
def test_gradients_reach_s_u_and_the_weights(hard):
    model = tiny_model("conformer")
    # a moderate sharpness: at the default 128 a weight far from every decision boundary gets an exactly zero
    # gradient in float32 (by design: hard assignments are settled), and these tensors have a few weights only
    hooks = GQ(QuantPlan([("*", 4), ("joiner", 1)]), anneal_steps=0 if hard else 100, alpha_hard=4.0)
    hooks.on_train_start(model, None)
    in_model = {id(p) for p in model.parameters()}
    assert all(id(p) in in_model for p in hooks.level_parameters())  # so DDP would average their gradients
    hooks.before_step(1, model)
    assert hooks.sharpness.hard is hard
    loss, _ = model.loss(*fixed_batch())
    loss.backward()
    for name, q in hooks.tensors.items():
        original = model.get_submodule(name.rpartition(".")[0]).parametrizations[name.rpartition(".")[2]].original
        assert original.grad is not None and original.grad.abs().sum() > 0, name
        assert q.log_scale.grad is not None and q.log_scale.grad != 0, name
        assert q.u.grad is not None and q.u.grad.abs().sum() > 0, name


def assert_on_int8_levels(model, hooks, plan):
    for name, bits in plan.resolve(model):
        weight = model.get_parameter(name).detach()
        lut, scale = hooks.quantizers(model)[name].int8_grid(weight)
        assert lut.dtype == torch.int8
        assert weight.unique().numel() <= 2**bits, name
        assert torch.isin(weight, int8_levels(lut, scale)).all(), name  # exactly on an int8-grid level


@pytest.mark.parametrize("encoder", ["lstm", "conformer"])
def test_gq_ends_with_at_most_2b_values_on_the_int8_grid_and_1_bit_has_exactly_2(encoder):
    model = tiny_model(encoder)
    keys = set(model.state_dict())
    plan = QuantPlan([("*", 3), ("joiner", 2), ("joiner.output", 1), ("predictor", 5)])
    hooks = GQ(plan, anneal_steps=2)
    s8bqat_run(hooks, model, steps=4)
    hooks.on_train_end(model)
    assert set(model.state_dict()) == keys and not parametrize.is_parametrized(model)
    assert_on_int8_levels(model, hooks, plan)
    assert model.get_parameter("joiner.output.weight").unique().numel() == 2
    exported = export_quantized(model, hooks.quantizers(model))
    for name, bits in plan.resolve(model):
        assert torch.equal(exported[name].dequantize(), model.get_parameter(name)), name
        assert exported[name].lut.numel() == 2**bits


def test_eval_mode_runs_the_int8_grid_weights_and_notices_updates():
    model = tiny_model()
    hooks = GQ(QuantPlan.uniform(2), anneal_steps=1)
    run_gq(model, hooks, steps=1)
    model.eval()
    weight = model.joiner.output.weight
    q = hooks.tensors["joiner.output.weight"]
    original = model.joiner.output.parametrizations.weight.original
    assert torch.equal(weight, q.hard_int8(original)) and weight.unique().numel() <= 4
    assert model.joiner.output.weight is weight  # cached while nothing changed
    with torch.no_grad():
        q.log_scale.add_(0.3)
    assert not torch.equal(model.joiner.output.weight, weight)
    hooks.before_step(0, model)
    model.train()  # the soft weights again: not on 4 levels
    assert model.joiner.output.weight.unique().numel() > 4


def test_a_plan_naming_a_missing_layer_or_an_invalid_bit_width_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="'joiner.outptu' matches no quantizable weight.*joiner.output"):
        GQ(QuantPlan([("*", 4), ("joiner.outptu", 1)])).on_train_start(model, None)
    assert not parametrize.is_parametrized(model)  # nothing was changed before the error
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="bit width .* is invalid"):
            GQ(QuantPlan([("*", bad)]))
    with pytest.raises(ValueError, match="window"):
        GQ(QuantPlan.uniform(4), window=3)


def test_lstm_weights_keep_the_fused_kernel(monkeypatch):
    model = tiny_model("lstm")
    num_lstms = sum(isinstance(m, torch.nn.LSTM) for m in model.modules())
    hooks = GQ(QuantPlan.uniform(2), anneal_steps=2)
    hooks.on_train_start(model, None)
    lstm_params = [n for n in quantizable_parameters(tiny_model("lstm")) if ".weight_" in n]
    assert lstm_params and all(parametrize.is_parametrized(model.get_submodule(n.rpartition(".")[0]))
                               for n in lstm_params)
    counter = CountingVF(rnn_module._VF)
    monkeypatch.setattr(rnn_module, "_VF", counter)
    for step in (1, 3):  # soft, then hard
        hooks.before_step(step, model)
        counter.lstm_calls = 0
        loss, _ = model.loss(*fixed_batch())
        assert counter.lstm_calls == num_lstms  # one fused call per nn.LSTM, all layers inside it
        loss.backward()
        assert hooks.tensors["transcriber.lstm.weight_hh_l1"].u.grad.abs().sum() > 0


def test_state_round_trips_through_a_weights_only_checkpoint_and_rebuilds_quantizers():
    model = tiny_model()
    plan = QuantPlan([("*", 3), ("joiner.output", 1)])
    hooks = GQ(plan, anneal_steps=2)
    run_gq(model, hooks, steps=3)
    buffer = io.BytesIO()
    torch.save({"hooks": hooks.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["hooks"]
    fresh = GQ(plan)  # never started: the quantizers of a finished run, for export
    fresh.load_state_dict(state)
    for name, q in hooks.tensors.items():
        assert torch.equal(fresh.tensors[name].levels(), q.levels()) and fresh.tensors[name].bits == q.bits
    with pytest.raises(ValueError, match="mu"):
        GQ(plan, mu=8.0).load_state_dict(state)
    running = GQ(QuantPlan.uniform(3))
    running.on_train_start(tiny_model(seed=4), None)
    with pytest.raises(ValueError, match="checkpoint quantizes"):
        running.load_state_dict(state)


def test_gq_in_sub8_train_leaves_a_plain_quantized_final_checkpoint(tmp_path):
    model = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size)
    plan = QuantPlan([("*", 3), ("joiner.output", 1)])
    hooks = GQ(plan, anneal_steps=2)
    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=2, num_threads=1, device="cpu")
    result = train(model, tiny_loader(), cfg, tmp_path, hooks)
    final = load_checkpoint(result.final_checkpoint)
    fresh = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=3)
    fresh.load_state_dict(final["model"])
    exported_hooks = GQ(plan)
    exported_hooks.load_state_dict(final["hooks"])
    assert_on_int8_levels(fresh, exported_hooks, plan)
    assert fresh.get_parameter("joiner.output.weight").unique().numel() == 2


def test_gq_resumed_in_sub8_train_ends_bit_identical(tmp_path):
    def run(run_dir, hooks, seed):
        model = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=seed)
        cfg = TrainConfig(max_steps=6, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=1, num_threads=1, device="cpu")
        train(model, tiny_loader(), cfg, run_dir, hooks)
        return model

    # the kill falls in the soft phase, the resumed run crosses into the hard one
    options = dict(plan=QuantPlan([("*", 3), ("joiner.output", 1)]), anneal_steps=4)
    straight_hooks = GQ(**options)
    straight = run(tmp_path / "straight", straight_hooks, seed=0)
    with pytest.raises(Killed):
        run(tmp_path / "resumed", killed_at(GQ)(**options, kill_at=4), seed=0)
    resumed_hooks = GQ(**options)
    # a different initialisation: the levels fitted at on_train_start must lose to the checkpoint's
    resumed = run(tmp_path / "resumed", resumed_hooks, seed=1)
    for name, weight in straight.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name
    for name, q in straight_hooks.tensors.items():
        assert torch.equal(q.u, resumed_hooks.tensors[name].u) and torch.equal(
            q.log_scale, resumed_hooks.tensors[name].log_scale), name


def test_initial_scale_fits_the_weights():
    torch.manual_seed(5)
    w = torch.randn(4000)
    one_bit = GQQuantizer.fit(w, 1)
    # the optimal 1-bit levels of a standard normal are ±E|w| = ±sqrt(2/π)
    assert math.isclose(float(one_bit.log_scale.detach().exp()), math.sqrt(2 / math.pi), rel_tol=0.1)
    zero = GQQuantizer.fit(torch.zeros(10), 2)  # an all-zero tensor: a tiny positive scale, weights stay ~0
    assert float(zero.log_scale.detach().exp()) > 0 and float(zero.hard_int8(torch.zeros(10)).abs().max()) < 1e-7


@pytest.mark.parametrize("bits, mu, max_bins, snap", [(1, 4.0, 1 << 14, False), (4, 4.0, 1 << 14, False),
                                                      (8, 4.0, 1 << 14, False), (8, 255.0, 1 << 14, False),
                                                      (8, 4.0, 1 << 14, True), (6, 4.0, 8, False)])
def test_cell_lookup_equals_binary_search(bits, mu, max_bins, snap):
    from sub8.quant.gq import _CellIndex

    torch.manual_seed(bits)
    levels = mu_law_levels(bits, 0.7, mu)
    if bits == 6:  # nearly coinciding and repeated levels, few bins: several passes needed
        levels = torch.sort(torch.cat([levels[:40], levels[40:] * 1e-3 + 0.3, levels[:1]])).values
    if snap:  # snapped to the int8 grid, as in GQ's hard phase: runs of equal levels
        levels = int8_levels(*snap_to_int8_grid(levels))
        assert levels.unique().numel() < levels.numel()
    x = torch.cat([torch.randn(20000) * 0.5, levels, (levels[1:] + levels[:-1]) / 2, torch.tensor([-9.0, 9.0])])
    expected = (torch.searchsorted(levels, x, right=True) - 1).clamp(0, levels.numel() - 2)
    index = _CellIndex(levels, max_bins)
    assert torch.equal(index(x), expected)
    if mu == 4.0 and bits != 6:
        assert index.passes == 1  # the common case, equal levels included: one gather, one compare
    if bits == 6:
        assert index.passes > 1


def test_the_hard_training_forward_runs_exactly_the_exported_weights():
    model = tiny_model()
    plan = QuantPlan([("*", 3), ("joiner.output", 1)])
    names = [name for name, _ in plan.resolve(model)]
    hooks = GQ(plan, anneal_steps=2)
    run_gq(model, hooks, steps=3)  # updates 2 and 3 are hard
    hooks.before_step(4, model)
    with torch.no_grad():
        seen = {name: getattr(*_owner(model, name)).clone() for name in names}  # what the next forward would use
    hooks.on_train_end(model)
    for name, weight in seen.items():
        assert torch.equal(weight, model.get_parameter(name)), name


def test_each_weight_is_quantized_once_per_forward_and_gradients_accumulate(monkeypatch):
    # nn.LSTM reads its weights up to four times a forward; the parametrization reuses its output until the
    # backward consumed it, so a second forward (gradient accumulation) still builds its own graph.
    model = tiny_model("lstm")
    hooks = GQ(QuantPlan.uniform(3), anneal_steps=5)
    hooks.on_train_start(model, None)
    hooks.before_step(1, model)
    calls = []
    quantize = GQQuantizer.soft_quantize
    monkeypatch.setattr(GQQuantizer, "soft_quantize", lambda self, *a, **k: calls.append(1) or quantize(self, *a, **k))
    model.loss(*fixed_batch())[0].backward()
    assert len(calls) == len(hooks.tensors)
    once = {name: q.u.grad.clone() for name, q in hooks.tensors.items()}
    model.loss(*fixed_batch())[0].backward()
    assert len(calls) == 2 * len(hooks.tensors)
    for name, q in hooks.tensors.items():
        assert torch.allclose(q.u.grad, 2 * once[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize(
    "bits, alpha_hat, hard",
    [(1, 1.0, False), (2, 1.0, False), (4, 1.0, False), (4, 8.0, False), (4, 128.0, False), (8, 2.0, False),
     (3, 128.0, True), (8, 128.0, True)],
)  # fmt: skip
def test_the_cpu_kernel_agrees_with_the_pytorch_version(monkeypatch, bits, alpha_hat, hard):
    """The C kernel (the CPU path) against the PyTorch ops (the CUDA path), in float32: windows of K, four and two
    levels, the hard forward on int8-snapped levels (merged ones at 8 bits), weights beyond the end levels."""
    gq_module = importlib.import_module("sub8.quant.gq")
    torch.manual_seed(bits)
    w = torch.cat([torch.randn(30000) * 0.2, torch.tensor([-5.0, 5.0])])
    quantizer = GQQuantizer.fit(w, bits)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))

    def run():
        x = w.clone().requires_grad_()
        out = quantizer.soft_quantize(x, alpha_hat, hard)
        return (out.detach(), *torch.autograd.grad(out, (x, quantizer.log_scale, quantizer.u), upstream))

    kernel = run()
    monkeypatch.setattr(gq_module.kernels, "usable", lambda *tensors: False)
    reference = run()
    if hard:
        assert torch.equal(kernel[0], reference[0])
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel[1], reference[1], rtol=1e-4, atol=1e-4 * float(reference[1].abs().max()))
    for a, b in zip(kernel[2:], reference[2:]):  # sums over every weight: float32 sums in another order
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def test_a_non_finite_weight_makes_the_output_non_finite():
    w = torch.tensor([0.1, float("nan"), -0.2, float("inf"), 0.3])
    levels = mu_law_levels(2, 0.5, 4.0)
    for hard in (False, True):
        out = soft_quantize(w, levels, torch.tensor(10.0), hard=hard)
        assert torch.equal(out.isfinite(), torch.tensor([True, False, True, False, True]))
