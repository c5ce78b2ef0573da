"""Native integer QAT: exact integer products, value ranges, the int32 bound, STE, EMA ranges, hooks and resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sub8.io import load_checkpoint
from sub8.models import PRESETS, TransducerConfig, build_model
from sub8.models.conformer import SelfAttention
from sub8.quant import UniformQuantizer, export_quantized
from sub8.quant.native import (
    NATIVE_PLANS,
    ActivationQuantizer,
    NativePlan,
    NativeQAT,
    NativeSelfAttention,
    _Quantize,
    accumulator_report,
    activation_quantizers,
    activation_sites,
    apply_native,
    export_native,
    int_conv,
    int_linear,
    int_matmul,
    max_exact_depth,
    native_plan,
    native_size,
    quantize_weight,
    recording_integer_ranges,
    remove_native,
    weight_scale,
)
from sub8.train import TrainConfig, train
from killing import Killed, killed_at
from test_quant_apply import TOKENIZER, tiny_loader

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The rescale acc·(s_a·s_w) + bias rounds at most three times in float32 (scale product, product, bias addition).
RESCALE_RTOL = 2.0**-22


def tiny_model(encoder: str = "conformer", seed: int = 0, input_dim: int = 8, vocab_size: int = 6,
               dropout: float = 0.0):
    torch.manual_seed(seed)
    return build_model(TransducerConfig(
        encoder=encoder, vocab_size=vocab_size, input_dim=input_dim, lstm_layers=2, lstm_hidden=8, conformer_dim=8,
        conformer_layers=1, conformer_heads=2, conformer_ffn_dim=16, conformer_conv_kernel=3,
        conformer_chunk_frames=2, conformer_subsampling_channels=2, pred_embed_dim=4, pred_hidden=8, joiner_dim=8,
        dropout=dropout,
    ))


def fixed_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(3, 24, 8, generator=gen), torch.tensor([24, 20, 16]),
            torch.randint(1, 6, (3, 4), generator=gen), torch.tensor([4, 3, 2]))


def plans_for(encoder: str) -> list[str]:
    return list(NATIVE_PLANS) if encoder == "conformer" else ["w8a8", "w4a8"]


def random_codes(shape, bound: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """Integers in [-bound, bound], half of them at ±bound (the worst case for the accumulator)."""
    values = torch.randint(-bound, bound + 1, shape, generator=gen).float()
    extreme = torch.rand(shape, generator=gen) < 0.5
    values[extreme] = bound * torch.sign(torch.randn(shape, generator=gen)[extreme])
    return values.to(device)


# --- rounding, weight scales ------------------------------------------------------------------------------------


def test_quantize_rounds_exactly_with_straight_through_gradients():
    x = torch.tensor([-9.0, -3.6, -3.5, -2.5, -0.5, 0.4, 0.5, 1.5, 3.2, 4.5, 4.6, 7.7], requires_grad=True)
    scale = torch.tensor(0.5)
    codes = _Quantize.apply(x * 0.5, scale, -3, 4, True)  # x * 0.5 / 0.5: the codes are round(x) clamped
    assert torch.equal(codes, torch.clamp(torch.round(x.detach()), -3, 4))
    assert codes.tolist() == [-3, -3, -3, -2, -0, 0, 0, 2, 3, 4, 4, 4]  # ties to even
    codes.sum().backward()
    # zero where round(x) falls off the grid [-3, 4] (half a step beyond it may pass), else 0.5 · 1/scale = 1
    assert x.grad.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # round(-3.5) = -4, round(4.5) = 4
    x.grad = None
    _Quantize.apply(x, scale, -3, 4, False).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_hard_quantized_weights_give_back_their_codes_and_scales_exactly(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(300, 17, generator=gen) * torch.logspace(-6, 2, 300)[:, None]
    n, s = quantize_weight(w, bits)
    base = UniformQuantizer(bits).scale(w)
    assert ((s - base).abs() <= base * 2.0**-17).all()  # the 17-bit significand moves the scale very little
    qmax = 2 ** (bits - 1) - 1
    assert n.abs().max() == qmax and torch.equal(n, torch.round(n))
    hard = n * s[:, None]
    n2, s2 = quantize_weight(hard, bits)
    assert torch.equal(n2, n) and torch.equal(s2, s)
    assert torch.equal(weight_scale(hard, bits), s)
    # what export_quantized (UniformQuantizer on the hard weights) sees: the same scale and codes
    assert torch.equal(UniformQuantizer(bits).scale(hard), s)
    assert torch.equal(UniformQuantizer(bits).quantize(hard)[0] - qmax, n.long())


# --- exact integer products -------------------------------------------------------------------------------------


def as_int64(x: torch.Tensor) -> torch.Tensor:
    assert torch.equal(x, torch.round(x))
    return x.cpu().long()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a_bits,w_bits,depth", [(8, 8, 500), (8, 8, 1216), (8, 4, 3000), (4, 4, 768), (2, 2, 64)])
def test_int_linear_equals_the_int64_product(device, a_bits, w_bits, depth):
    gen = torch.Generator().manual_seed(depth)
    c = random_codes((5, 7, depth), 2**a_bits - 1, gen, device)
    n = random_codes((9, depth), 2 ** (w_bits - 1) - 1, gen, device)
    acc = int_linear(c, n, a_bits, w_bits)
    assert torch.equal(as_int64(acc), as_int64(c) @ as_int64(n).T)
    pieces = -(-depth // max_exact_depth(2**a_bits - 1, 2 ** (w_bits - 1) - 1))
    assert acc.dtype == (torch.float32 if pieces == 1 else torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits,depth", [(8, 75), (8, 700), (4, 2000)])
def test_int_matmul_equals_the_int64_product(device, bits, depth):
    gen = torch.Generator().manual_seed(depth)
    a = random_codes((2, 3, 6, depth), 2**bits - 1, gen, device)
    b = random_codes((2, 3, depth, 5), 2**bits - 1, gen, device)
    assert torch.equal(as_int64(int_matmul(a, b, bits)), as_int64(a) @ as_int64(b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["conv2d", "conv2d_chunked", "depthwise", "depthwise_float64"])
def test_int_conv_equals_the_float64_product(device, case):
    # float64 holds these accumulators (< 2^31) exactly, so the float64 convolution is the integer reference.
    gen = torch.Generator().manual_seed(0)
    if case.startswith("conv2d"):
        channels = 64 if case == "conv2d_chunked" else 8  # 64·3·3 = 576 > 518: two float32 pieces at a8w8
        c = random_codes((2, channels, 11, 13), 255, gen, device)
        n = random_codes((5, channels, 3, 3), 127, gen, device)
        options, conv = dict(stride=2, padding=0, dilation=1, groups=1), F.conv2d
    else:
        kernel = 15 if case == "depthwise" else 600  # 600 > 518: a grouped convolution falls back to float64
        c, n = random_codes((2, 4, kernel + 9), 255, gen, device), random_codes((4, 1, kernel), 127, gen, device)
        options, conv = dict(stride=1, padding=0, dilation=1, groups=4), F.conv1d
    acc = int_conv(c, n, conv, options, 8, 8)
    assert torch.equal(acc.double(), conv(c.double(), n.double(), **options))
    assert acc.dtype == (torch.float32 if case in ("conv2d", "depthwise") else torch.float64)


# --- the native forward equals the fake-quantized one -----------------------------------------------------------


class Holder(nn.Module):
    """One layer under the name "0", called with any arguments (nn.Sequential takes one)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.add_module("0", layer)

    def __getitem__(self, index: int) -> nn.Module:
        return getattr(self, str(index))

    def forward(self, *args):
        return self[0](*args)


def calibrated(model: nn.Module, plan: NativePlan, *inputs) -> nn.Module:
    """Wrapped, with its activation ranges set by one training-mode forward, then in eval mode (ranges frozen)."""
    apply_native(model, plan)
    model.train()
    model(*inputs)
    return model.eval()


def assert_rescale_close(y: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> None:
    """``y`` (float32) within the documented rounding of the rescale of the exact value (float64)."""
    assert y.dtype == torch.float32
    assert ((y.double() - exact).abs() <= RESCALE_RTOL * magnitude + 1e-30).all()


@pytest.mark.parametrize("kind", ["linear", "conv1d", "depthwise", "conv2d"])
@pytest.mark.parametrize("w_bits,a_bits", [(8, 8), (4, 8), (4, 4), (2, 3)])
def test_native_modules_equal_the_fake_quant_forward(kind, w_bits, a_bits):
    torch.manual_seed(0)
    layer, x = {
        "linear": (nn.Linear(600, 7), torch.randn(4, 5, 600)),  # depth 600: two float32 pieces at a8w8
        "conv1d": (nn.Conv1d(6, 5, 3, padding=1), torch.randn(2, 6, 20)),
        "depthwise": (nn.Conv1d(6, 6, 5, groups=6), torch.randn(2, 6, 20)),
        "conv2d": (nn.Conv2d(64, 3, 3, stride=2), torch.relu(torch.randn(2, 64, 9, 9))),
    }[kind]
    model = calibrated(Holder(layer), NativePlan([("*", w_bits, a_bits)]), x)
    native = model[0]
    y = native(x)
    c, s_a = native.input_quantizer.quantize(x)
    n, s_w = native.integer_weight()
    x_q, w_q = c.double() * s_a.double(), n.double() * s_w.double().view(-1, *([1] * (n.dim() - 1)))
    bias = native.bias.double()
    if kind == "linear":
        exact, magnitude = F.linear(x_q, w_q, bias), F.linear(x_q.abs(), w_q.abs(), bias.abs())
    else:
        conv = F.conv1d if kind != "conv2d" else F.conv2d
        options = dict(stride=layer.stride, padding=layer.padding, groups=layer.groups)
        exact, magnitude = conv(x_q, w_q, bias, **options), conv(x_q.abs(), w_q.abs(), bias.abs(), **options)
    assert_rescale_close(y, exact, magnitude)
    if kind == "conv2d":  # the post-ReLU input found lo = 0: zero point 0, all codes for the positive half
        assert native.input_quantizer.scale_zero_point()[1] == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_products_equal_the_fake_quant_products(bits):
    torch.manual_seed(0)
    attention = SelfAttention(16, 2, dropout=0.0)
    x, mask = torch.randn(2, 9, 16), torch.ones(2, 1, 9, 9, dtype=torch.bool)
    model = calibrated(Holder(attention), NativePlan([("*", 8, bits)]), x, mask)
    native = model[0]
    assert isinstance(native, NativeSelfAttention) and native.scores_bits == native.values_bits == bits
    q, k, v = native.qkv(x).view(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    cq, s_q = native.q_quantizer.quantize(q)
    ck, s_k = native.k_quantizer.quantize(k)
    q_q, k_q = cq.double() * s_q.double(), ck.double() * s_k.double()
    scale = 1 / math.sqrt(8)
    assert_rescale_close(native.scores(q, k), q_q @ k_q.transpose(-1, -2) * scale,
                         q_q.abs() @ k_q.abs().transpose(-1, -2) * scale)
    p = torch.softmax(torch.randn(2, 2, 9, 9), dim=-1)
    qmax = 2**bits - 1
    cv, s_v = native.v_quantizer.quantize(v)
    p_q, v_q = torch.round(p / p.new_tensor(1 / qmax)).double() / qmax, cv.double() * s_v.double()
    assert_rescale_close(native.values(p, v), p_q @ v_q, p_q @ v_q.abs())


def test_attention_products_can_be_left_in_float():
    model = tiny_model()
    plan = native_plan("w4a8", attention_products=False)
    resolved = plan.resolve(model)
    assert not any(name.endswith((".scores", ".values")) for name in resolved)
    apply_native(model, plan)
    assert type(model.transcriber.layers[0].self_attn) is SelfAttention  # SDPA as before; qkv/out still native
    assert not any(site.endswith((".q", ".k", ".v")) for site in activation_quantizers(model))


# --- value ranges and the accumulator bound ---------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["conformer", "lstm"])
def test_no_value_leaves_the_integer_range_of_its_bit_width(encoder):
    batch = fixed_batch()
    for plan_name in plans_for(encoder):
        model = tiny_model(encoder, dropout=0.1)
        apply_native(model, native_plan(plan_name, encoder))
        for training in (True, False):  # training: EMA updates and dropout on the integer attention codes
            model.train(training)
            with recording_integer_ranges() as rows:
                model.loss(*batch)
            roles = {row["role"] for row in rows}
            assert {"activation", "weight", "accumulator"} <= roles
            if encoder == "conformer":
                assert "probability" in roles
            for row in rows:
                assert row["integral"], row
                assert row["lo"] <= row["min"] and row["max"] <= row["hi"], (plan_name, row)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_int32_accumulator_bound_holds_for_every_preset_and_plan(preset):
    model = build_model(PRESETS[preset](64))
    encoder = "lstm" if preset.startswith("rnnt") else "conformer"
    for plan_name in plans_for(encoder):
        rows = accumulator_report(model, native_plan(plan_name, encoder), frames=1500)  # 60 s of 40 ms frames
        assert rows and all(row["bound"] <= 2**31 - 1 for row in rows)
        for row in rows:  # each piece computed in float32 stays within 2^24
            depth_per_piece = -(-row["depth"] // row["float32_pieces"])
            assert depth_per_piece * row["bound"] // row["depth"] <= 2**24
    w8a8 = {row["site"]: row for row in accumulator_report(model, native_plan("w8a8", encoder))}
    if encoder == "conformer":  # d = 576/768 > 518: the second feed-forward linear needs two float32 pieces
        assert w8a8["transcriber.layers.0.ffn1.sequential.4"]["float32_pieces"] == 2


def test_too_deep_reductions_raise_overflow_errors():
    model = nn.Sequential(nn.Linear(40_000, 2))  # 40 000 · 255 · 255 > 2^31
    with pytest.raises(OverflowError, match="int32"):
        apply_native(model, NativePlan([("*", 8, 8)]))
    assert type(model[0]) is nn.Linear  # nothing was changed
    apply_native(model, NativePlan([("*", 4, 4)]))  # 40 000 · 15 · 15 fits
    ones = torch.ones(1, 40_000, 1)
    with pytest.raises(OverflowError, match="int32"):  # P·V over 40 000 keys at 8 bits
        int_matmul(ones.transpose(1, 2), ones, 8)


# --- gradients, ranges ------------------------------------------------------------------------------------------


def test_straight_through_gradients_reach_every_quantized_weight():
    model = tiny_model()
    hooks = NativeQAT(native_plan("w4a8"))
    hooks.on_train_start(model, None)
    loss, _ = model.loss(*fixed_batch())
    loss.backward()
    for name in hooks.quantizers(model):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_linear_gradients_are_the_fake_quant_straight_through_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    native = calibrated(Holder(layer), NativePlan([("*", 4, 4)]), x)[0]
    native.input_quantizer.running_max.fill_(1.0)  # clip some inputs: their gradient must be zero
    x = x.requires_grad_()
    g = torch.randn(5, 4)
    native(x).backward(g)
    c, s_a = native.input_quantizer.quantize(x.detach())
    n, s_w = native.integer_weight()
    zero = native.input_quantizer.scale_zero_point()[1]
    rounded = torch.round(x.detach() / s_a)
    inside = (rounded >= -zero) & (rounded <= 2**4 - 1 - zero)
    assert not inside.all()
    torch.testing.assert_close(layer.weight.grad, g.T @ (c * s_a))
    torch.testing.assert_close(x.grad, (g @ (n * s_w[:, None])) * inside)


def test_ema_ranges_update_in_training_and_freeze_in_eval():
    q = ActivationQuantizer(8, "site", momentum=0.9)
    with pytest.raises(RuntimeError, match="never calibrated"):
        q.eval()(torch.ones(3))
    q.train()
    q(torch.tensor([-1.0, 2.0]))
    assert (q.running_min.item(), q.running_max.item()) == (-1.0, 2.0)  # the first batch sets the range
    q(torch.tensor([-3.0, 4.0]))
    assert q.running_min.item() == pytest.approx(-1.2) and q.running_max.item() == pytest.approx(2.2)
    q.eval()(torch.tensor([-50.0, 60.0]))
    assert q.running_min.item() == pytest.approx(-1.2)
    q.train()
    q.frozen = True
    q(torch.tensor([-50.0, 60.0]))
    assert q.running_max.item() == pytest.approx(2.2)
    scale, zero = q.scale_zero_point()
    assert scale.item() == pytest.approx(3.4 / 255) and zero.item() == round(1.2 / (3.4 / 255))
    c, _ = q.quantize(torch.tensor([0.0, 100.0, -100.0]))
    assert c.tolist() == [0.0, 255 - zero.item(), -zero.item()]  # zero exact; the rest clipped to the grid


def test_lstm_hidden_range_starts_at_h_bound_and_updates_after_each_sequence():
    model = tiny_model("lstm")
    apply_native(model, native_plan("w8a8", "lstm"))
    hidden = activation_quantizers(model)["transcriber.lstm.hidden_l0"]
    assert (hidden.running_min.item(), hidden.running_max.item()) == (-1.0, 1.0)
    model.train()
    model.loss(*fixed_batch())
    assert -1.0 < hidden.running_min.item() < hidden.running_max.item() < 1.0
    model.eval()
    before = hidden.running_max.clone()
    model.loss(*fixed_batch())
    assert torch.equal(hidden.running_max, before)


def test_native_lstm_runs_the_lstm_cell_and_streams_step_by_step():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True)
    x = torch.randn(3, 10, 5)
    with torch.no_grad():
        reference, _ = lstm(x)
    model = calibrated(Holder(lstm), NativePlan([("*", 8, 8)]), x)
    native = model[0]
    with torch.no_grad():
        out, (h, c) = native(x)
        assert (out - reference).abs().max() < 0.03  # 8-bit weights and activations: close to the float cell
        first, state = native(x[:, :4])
        rest, (h2, c2) = native(x[:, 4:], state)  # what greedy decoding does with the predictor
        assert torch.equal(torch.cat([first, rest], dim=1), out) and torch.equal(h2, h) and torch.equal(c2, c)
        single, _ = native(x[0])  # unbatched input
        assert torch.equal(single, out[0])


# --- plans --------------------------------------------------------------------------------------------------------


def test_named_plans_resolve_as_described():
    model = tiny_model()
    mixed = native_plan("mixed").resolve(model)
    assert mixed["transcriber.layers.0.self_attn.qkv"] == (4, 8)
    assert mixed["transcriber.layers.0.ffn2.sequential.1"] == (4, 8)
    assert mixed["transcriber.layers.0.self_attn.values"] == (4, 8)  # products: both operands at a_bits = 8
    for name in ("transcriber.layers.0.conv_module.depthwise", "transcriber.subsampling.conv.1", "joiner.output",
                 "predictor.lstm"):
        assert mixed[name] == (8, 8), name
    assert "ctc_head" not in mixed, "the training-only CTC head is not part of the device model"
    assert set(native_plan("w4a4").resolve(model).values()) == {(4, 4)}
    rnnt = native_plan("w4a8", "lstm").resolve(tiny_model("lstm"))
    assert rnnt["transcriber.lstm"] == (4, 8) and rnnt["predictor.embedding"] == (4, 8)


@pytest.mark.parametrize("rules,message", [
    ([], "empty"),
    ([("*", 1, 8)], "at least 2 weight bits"),
    ([("*", 4, 9)], "bit width 9 is invalid"),
    ([("*", 4, None)], "both w_bits and a_bits"),
    ([("*", "4", 8)], "invalid"),
    ([("*", 4)], "not \\(pattern, w_bits, a_bits\\)"),
])
def test_bad_plans_are_clear_errors(rules, message):
    with pytest.raises(ValueError, match=message):
        NativePlan(rules)


def test_bad_plan_uses_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="matches no quantizable target; closest: joiner.output"):
        NativePlan([("*", 4, 8), ("joiner.outptu", 8, 8)]).resolve(model)
    with pytest.raises(ValueError, match="every target in float"):
        NativePlan([("*", None, None)]).resolve(model)
    with pytest.raises(ValueError, match="unknown plan"):
        native_plan("w2a2")
    with pytest.raises(ValueError, match="Conformer"):
        native_plan("mixed", "lstm")
    with pytest.raises(ValueError, match="padding_mode"):
        apply_native(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect")), NativePlan([("*", 4, 8)]))
    apply_native(model, native_plan("w4a8"))
    with pytest.raises(ValueError, match="already has native modules"):
        apply_native(model, native_plan("w4a8"))
    hooks = NativeQAT(native_plan("w8a8"))
    with pytest.raises(ValueError, match="trained with plan"):
        hooks.load_state_dict(NativeQAT(native_plan("w4a8")).state_dict())


# --- hooks, evaluation, size ------------------------------------------------------------------------------------


def run_steps(hooks: NativeQAT, model: nn.Module, steps: int) -> None:
    batch = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hooks.on_train_start(model, optimizer)
    model.train()
    for _ in range(steps):
        loss, _ = model.loss(*batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("encoder,plan_name", [("conformer", "mixed"), ("conformer", "w4a4"), ("lstm", "w4a8")])
def test_hooks_leave_a_plain_model_and_evaluation_reruns_the_device_forward(encoder, plan_name):
    model = tiny_model(encoder, dropout=0.1)
    keys = set(model.state_dict())
    plan = native_plan(plan_name, encoder)
    hooks = NativeQAT(plan)
    run_steps(hooks, model, steps=3)
    model.eval()
    with hooks.evaluating(model) as native:  # during training: the wrapped model itself
        assert native is model
    batch = fixed_batch()
    with torch.no_grad():
        device_logits = model(*batch).logits  # wrapped: weights and activations quantized
    hooks.on_train_end(model)
    assert not any(type(m).__name__.startswith("Native") or isinstance(m, ActivationQuantizer)
                   for m in model.modules())
    assert set(model.state_dict()) == keys

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "hooks": hooks.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh = tiny_model(encoder, seed=7, dropout=0.1).eval()
    fresh.load_state_dict(saved["model"])
    weights = {k: v.clone() for k, v in fresh.state_dict().items()}
    with NativeQAT.from_state_dict(saved["hooks"]).evaluating(fresh) as native, torch.no_grad():
        assert torch.equal(native(*batch).logits, device_logits)
    assert not any(isinstance(m, ActivationQuantizer) for m in fresh.modules())
    assert all(torch.equal(v, weights[k]) for k, v in fresh.state_dict().items())

    # Hard-quantized weights: export gives back exactly the codes and scales the QAT forward ran.
    resolved = plan.resolve(fresh)
    exported_weights, sites = export_native(fresh, hooks)
    assert [row["site"] for row in sites] == saved["hooks"]["activations"]["sites"]
    assert all(0 <= row["zero_point"] <= 2 ** row["bits"] - 1 and row["scale"] > 0 for row in sites)
    assert exported_weights.keys() == export_quantized(fresh, hooks.quantizers(fresh)).keys()
    for name, exported in exported_weights.items():
        weight = fresh.get_parameter(name)
        module_name = name.rpartition(".")[0]
        bits = resolved[module_name][0]
        assert torch.equal(exported.dequantize(), weight), name
        assert torch.equal(exported.scale, weight_scale(weight, bits)), name
        assert all(row.unique().numel() <= 2**bits - 1 for row in weight.detach()), name


def test_native_size_counts_packed_codes_scales_and_activation_sites():
    model = tiny_model()
    plan = NativePlan([("*", 4, 8), ("joiner", 8, 8), ("*.scores", None, None)])
    size = native_size(model, plan)
    expected_weights = expected_scales = 0
    quantized = set()
    for name, (w_bits, _) in plan.resolve(model).items():
        if name.endswith(".values"):
            continue
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            if "weight" in pname:
                expected_weights += math.ceil(p.numel() * w_bits / 8)
                expected_scales += 4 * p.shape[0]
                quantized.add(f"{name}.{pname}")
    floats = sum(4 * p.numel() for n, p in model.named_parameters()
                 if n not in quantized and not n.startswith("ctc_head."))  # training-only: not stored
    sites = activation_sites(model, plan)
    apply_native(model, plan)
    assert set(sites) == set(activation_quantizers(model))  # what is counted is what is calibrated
    assert size["weights"] == expected_weights and size["weight_scales"] == expected_scales
    assert size["activation_scales"] == 5 * len(sites) and size["float_params"] == floats
    assert size["total"] == expected_weights + expected_scales + 5 * len(sites) + floats
    assert size["ratio_vs_fp32"] == pytest.approx(size["fp32"] / size["total"])
    ratios = [native_size(model, native_plan(p))["ratio_vs_fp32"] for p in ("w8a8", "mixed", "w4a8")]
    assert 1 < ratios[0] < ratios[1] < ratios[2]


# --- through sub8.train -------------------------------------------------------------------------------------------

def test_native_qat_resumed_in_sub8_train_ends_bit_identical(tmp_path):
    def run(run_dir, hooks, seed):
        # dropout on: attention dropout on the integer codes draws from the RNG the checkpoint restores
        model = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=seed, dropout=0.1)
        cfg = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=1, num_threads=1, device="cpu")
        result = train(model, tiny_loader(), cfg, run_dir, hooks)
        return model, load_checkpoint(result.final_checkpoint)

    plan = native_plan("w4a8")
    straight, final = run(tmp_path / "straight", NativeQAT(plan), seed=0)
    with pytest.raises(Killed):
        run(tmp_path / "resumed", killed_at(NativeQAT)(plan, kill_at=4), seed=0)
    resumed, resumed_final = run(tmp_path / "resumed", NativeQAT(plan), seed=0)
    for name, weight in straight.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name
    ranges, resumed_ranges = final["hooks"]["activations"], resumed_final["hooks"]["activations"]
    assert ranges["sites"] == resumed_ranges["sites"] and all(ranges["initialized"])
    assert torch.equal(ranges["running_min"], resumed_ranges["running_min"])
    assert torch.equal(ranges["running_max"], resumed_ranges["running_max"])
    # final.pt is a plain model plus the ranges that rebuild the integer one
    fresh = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=3)
    fresh.load_state_dict(final["model"])
    hooks = NativeQAT.from_state_dict(final["hooks"])
    with hooks.evaluating(fresh.eval()) as native, torch.no_grad():
        feats = torch.randn(2, 40, 80)
        assert len(native.greedy_decode(feats, torch.tensor([40, 30]))) == 2
    remove_native(fresh)  # a no-op on a plain model
