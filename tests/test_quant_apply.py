"""Applying quantizers: fake-quant LSTM on the fused kernel, uniform QAT, S8BQAT hooks, PTQ, export and size."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.modules.rnn as rnn_module
from torch import nn
from torch.nn.utils import parametrize

from sub8.data.batching import BatchLoader
from sub8.data.features import Cmvn, FeatureSet
from sub8.data.tokenizer import build_tokenizer
from sub8.io import load_checkpoint
from sub8.models import TransducerConfig, build_model
from sub8.train import TrainConfig, train
from sub8.quant import (
    S8BQAT,
    FakeQuantize,
    QuantPlan,
    UniformQAT,
    UniformQuantizer,
    export_quantized,
    quantizable_parameters,
    hard_quantize_,
    int8_levels,
    plan_quantizers,
    quantized_size_bytes,
)
from killing import Killed, killed_at


def tiny_model(encoder: str = "lstm", seed: int = 0, input_dim: int = 8, vocab_size: int = 6):
    torch.manual_seed(seed)
    return build_model(TransducerConfig(
        encoder=encoder, vocab_size=vocab_size, input_dim=input_dim, lstm_layers=2, lstm_hidden=8, conformer_dim=8,
        conformer_layers=1, conformer_heads=2, conformer_ffn_dim=16, conformer_conv_kernel=3,
        conformer_chunk_frames=2, conformer_subsampling_channels=2, pred_embed_dim=4, pred_hidden=8, joiner_dim=8,
        dropout=0.0,
    ))


def fixed_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(3, 24, 8, generator=gen), torch.tensor([24, 20, 16]),
            torch.randint(1, 6, (3, 4), generator=gen), torch.tensor([4, 3, 2]))


class CountingVF:
    """Stands in for torch._VF inside nn.LSTM, counting fused LSTM calls."""

    def __init__(self, vf):
        self.vf, self.lstm_calls = vf, 0

    def lstm(self, *args, **kwargs):
        self.lstm_calls += 1
        return self.vf.lstm(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.vf, name)


def test_fake_quantized_lstm_runs_one_fused_call_and_matches_dequantized_weights(monkeypatch):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 6, num_layers=2, batch_first=True)
    reference = nn.LSTM(5, 6, num_layers=2, batch_first=True)
    quantizer = UniformQuantizer(3, per_channel=True)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            getattr(reference, name).copy_(quantizer.fake_quantize(p) if name.startswith("weight") else p)
    originals = {name: p for name, p in lstm.named_parameters() if name.startswith("weight")}
    for name in originals:
        parametrize.register_parametrization(lstm, name, FakeQuantize(quantizer))
    x = torch.randn(2, 7, 5)
    counter = CountingVF(rnn_module._VF)
    monkeypatch.setattr(rnn_module, "_VF", counter)
    out, _ = lstm(x)
    assert counter.lstm_calls == 1
    assert torch.allclose(out, reference(x)[0], atol=1e-6)
    out.sum().backward()
    for name, p in originals.items():  # the float weights (same Parameter objects) get the straight-through grad
        assert p is lstm.parametrizations[name].original and p.grad is not None and p.grad.abs().sum() > 0


def s8bqat_run(hooks, model, steps: int):
    batch = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hooks.on_train_start(model, optimizer)
    for step in range(1, steps + 1):
        hooks.before_step(step, model)
        loss, _ = model.loss(*batch)
        extra = hooks.extra_loss(step, model)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        hooks.after_step(step, model, optimizer)
    return optimizer


def assert_on_int8_levels(model, hooks, plan):
    for name, bits in plan.resolve(model):
        weight = model.get_parameter(name).detach()
        quantizer = hooks.quantizers(model)[name]
        lut, scale = quantizer.int8_grid(weight)
        assert lut.dtype == torch.int8
        levels = int8_levels(lut, scale)
        assert weight.unique().numel() <= 2**bits
        assert torch.isin(weight, levels).all(), name  # every weight exactly on an int8-grid level


@pytest.mark.parametrize("encoder", ["lstm", "conformer"])
def test_s8bqat_ends_with_at_most_2b_values_on_the_int8_grid(encoder):
    model = tiny_model(encoder)
    plan = QuantPlan([("*", 3), ("joiner", 2)])
    hooks = S8BQAT(plan, reg_weight=0.5, ramp_steps=2, compress_every=2)
    s8bqat_run(hooks, model, steps=3)
    assert hooks.compressions == 1
    hooks.on_train_end(model)
    assert_on_int8_levels(model, hooks, plan)


def test_compressor_puts_every_weight_exactly_on_a_level_and_the_flags_disable_parts():
    model = tiny_model()
    plan = QuantPlan.uniform(2)
    hooks = S8BQAT(plan, compress_every=1, regularize=False)
    s8bqat_run(hooks, model, steps=1)
    assert hooks.extra_loss(1, model) is None
    assert_on_int8_levels(model, hooks, plan)
    model = tiny_model()
    hooks = S8BQAT(plan, compress_every=1, compress=False)
    s8bqat_run(hooks, model, steps=1)
    assert hooks.compressions == 0 and model.get_parameter("joiner.output.weight").unique().numel() > 4
    assert hooks.extra_loss(1, model) > 0


def test_s8bqat_regularizer_ramps_and_reaches_the_weights():
    model = tiny_model()
    hooks = S8BQAT(QuantPlan.uniform(2), reg_weight=1.0, ramp_steps=4)
    hooks.on_train_start(model, torch.optim.SGD(model.parameters(), lr=0.1))
    first, last = hooks.extra_loss(1, model), hooks.extra_loss(4, model)
    assert torch.allclose(4 * first, last)
    last.backward()
    assert model.get_parameter("transcriber.lstm.weight_hh_l1").grad.abs().sum() > 0


def test_s8bqat_state_round_trips_through_a_weights_only_checkpoint():
    model = tiny_model()
    hooks = S8BQAT(QuantPlan.uniform(3), compress_every=1)
    s8bqat_run(hooks, model, steps=2)
    buffer = io.BytesIO()
    torch.save({"hooks": hooks.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["hooks"]
    resumed = S8BQAT(QuantPlan.uniform(3))
    resumed.on_train_start(tiny_model(seed=5), torch.optim.SGD(model.parameters(), lr=0.1))  # other weights...
    resumed.load_state_dict(state)  # ...but the checkpoint's levels win
    assert resumed.compressions == 2
    for name, q in hooks.levels.items():
        assert torch.equal(resumed.levels[name].lut, q.lut) and torch.equal(resumed.levels[name].scale, q.scale)


@pytest.mark.parametrize("per_channel", [True, False])
def test_uniform_qat_trains_through_fake_quant_and_leaves_a_plain_hard_quantized_model(per_channel):
    model = tiny_model("conformer")
    keys = set(model.state_dict())
    plan = QuantPlan.uniform(4)
    hooks = UniformQAT(plan, per_channel=per_channel)
    weight = model.get_parameter("joiner.output.weight")
    before = weight.detach().clone()
    s8bqat_run(hooks, model, steps=2)
    assert not torch.equal(weight.detach(), before)  # the optimizer still updates the same Parameter
    hooks.on_train_end(model)
    assert set(model.state_dict()) == keys and not parametrize.is_parametrized(model)
    exported = export_quantized(model, hooks.quantizers(model))
    for name, _ in plan.resolve(model):
        assert torch.allclose(exported[name].dequantize(), model.get_parameter(name), atol=1e-7)
        assert exported[name].codes.max() < 15


def test_ptq_at_8_bits_changes_outputs_slightly():
    model = tiny_model().eval()
    batch = fixed_batch()
    with torch.no_grad():
        before = model(*batch).logits
        quantizers = plan_quantizers(model, QuantPlan.uniform(8), lambda b: UniformQuantizer(b, per_channel=False))
        hard_quantize_(model, quantizers)
        after = model(*batch).logits
    assert 0 < (after - before).abs().max() < 0.02 * before.abs().max()


def test_export_and_packed_size():
    model = tiny_model()
    # 4 bits per channel everywhere, 2 bits per tensor in the joiner
    quantizers = plan_quantizers(
        model, QuantPlan([("*", 4), ("joiner", 2)]), lambda b: UniformQuantizer(b, per_channel=b > 2)
    )
    exported = export_quantized(model, quantizers)
    weight = model.get_parameter("transcriber.lstm.weight_ih_l0")  # (32, 32): 4 bits, 15 LUT entries, 32 scales
    assert exported["transcriber.lstm.weight_ih_l0"].packed_bytes() == weight.numel() // 2 + 15 + 4 * 32
    out = model.get_parameter("joiner.output.weight")  # 2 bits, per tensor: 3 LUT entries, 1 scale
    assert exported["joiner.output.weight"].packed_bytes() == -(-out.numel() * 2 // 8) + 3 + 4
    assert not any(name.startswith("ctc_head.") for name in exported), "the CTC head is training-only"
    rest = sum(4 * p.numel() for name, p in model.named_parameters()
               if name not in exported and not name.startswith("ctc_head."))
    assert quantized_size_bytes(exported, model) == quantized_size_bytes(exported) + rest


TEXTS = ["one two", "three", "two one", "four", "one", "three four"]
TOKENIZER = build_tokenizer("char", TEXTS)


def tiny_loader() -> BatchLoader:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 40, (len(TEXTS),), generator=gen)
    fs = FeatureSet(
        feats=torch.randn(int(lengths.sum()), 80, generator=gen).half(),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        utt_ids=[f"u{i}" for i in range(len(TEXTS))],
        texts=list(TEXTS),
        meta=[{"speaker": None} for _ in TEXTS],
    )
    return BatchLoader(fs, TOKENIZER, Cmvn.from_features(fs), batch_frames=120, seed=0)


@pytest.mark.parametrize("method", ["s8bqat", "uniform"])
def test_hooks_in_sub8_train_leave_a_plain_quantized_final_checkpoint(tmp_path, method):
    model = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size)
    plan = QuantPlan.uniform(3)
    hooks = S8BQAT(plan, ramp_steps=2, compress_every=2) if method == "s8bqat" else UniformQAT(plan)
    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=2, num_threads=1, device="cpu")
    result = train(model, tiny_loader(), cfg, tmp_path, hooks)
    fresh = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=3)
    fresh.load_state_dict(load_checkpoint(result.final_checkpoint)["model"])
    for name in quantizable_parameters(fresh):
        weight = fresh.get_parameter(name).detach()
        groups = [weight] if method == "s8bqat" else list(weight)  # uniform QAT is per output channel here
        assert all(group.unique().numel() <= 8 for group in groups), name


def test_s8bqat_resumed_in_sub8_train_ends_bit_identical(tmp_path):
    def run(run_dir, hooks, seed):
        model = tiny_model(input_dim=80, vocab_size=TOKENIZER.vocab_size, seed=seed)
        cfg = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=1, ckpt_every=2, log_every=1, num_threads=1, device="cpu")
        train(model, tiny_loader(), cfg, run_dir, hooks)
        return model

    options = dict(plan=QuantPlan.uniform(3), ramp_steps=4, compress_every=3)
    straight = run(tmp_path / "straight", S8BQAT(**options), seed=0)
    with pytest.raises(Killed):
        run(tmp_path / "resumed", killed_at(S8BQAT)(**options, kill_at=4), seed=0)
    # a different initialisation: the levels Lloyd-Max derives from it at on_train_start must lose to the checkpoint's
    resumed = run(tmp_path / "resumed", S8BQAT(**options), seed=1)
    for name, weight in straight.state_dict().items():
        assert torch.equal(weight, resumed.state_dict()[name]), name
