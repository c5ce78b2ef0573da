"""The accelerator's latency and memory model (sub8.emulator.device): exact footprint arithmetic against the exported
and packed weights, the cycle rule by hand, streaming definitions (RTF, UPL), monotonicity, configuration checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sub8.emulator import device as dev
from sub8.emulator.packing import PackedTensor, packed_nbytes, packed_size_bytes
from sub8.models import PRESETS as MODEL_PRESETS
from sub8.models import TransducerConfig, build_model
from sub8.quant import QuantPlan, UniformQuantizer, export_quantized, plan_quantizers

VOCAB = 30
TINY = dict(vocab_size=6, input_dim=8, lstm_layers=2, lstm_hidden=8, conformer_dim=8, conformer_layers=1,
            conformer_heads=2, conformer_ffn_dim=16, conformer_conv_kernel=3, conformer_chunk_frames=2,
            conformer_subsampling_channels=2, pred_embed_dim=4, pred_hidden=8, joiner_dim=8, dropout=0.0)


def tiny_model(encoder: str):
    torch.manual_seed(0)
    return build_model(TransducerConfig(encoder=encoder, **TINY))


def preset_model(name: str):
    torch.manual_seed(0)
    return build_model(MODEL_PRESETS[name](VOCAB))


def device_weights(model) -> list[str]:
    """Quantizable weights the device runs (a plan also resolves the training-only CTC head)."""
    return [n for n, _ in QuantPlan.uniform(8).resolve(model) if not n.startswith("ctc_head")]


def at_bits(model, bits: int) -> dict[str, int]:
    return {name: bits for name in device_weights(model)}


def utterances(count: int = 12, seed: int = 0) -> list[dev.Utterance]:
    rng = np.random.default_rng(seed)
    return [dev.Utterance(float(d), int(t)) for d, t in zip(rng.uniform(0.3, 6.0, count), rng.integers(0, 25, count))]


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


def test_presets_are_valid_and_plausible():
    assert dev.DEFAULT_PRESET in dev.PRESETS
    for name, config in dev.PRESETS.items():
        assert config.name == name
        assert config.dram_bytes_per_cycle > 0 and config.tops > 0
    small, phone = dev.PRESETS["edge_small"], dev.PRESETS["phone"]
    assert 64 * dev.KiB <= small.sram_bytes <= 256 * dev.KiB and 0.1 <= small.tops <= 0.5
    assert 1 * dev.MiB <= phone.sram_bytes <= 4 * dev.MiB and phone.tops >= 1
    assert small.dram_bytes_per_s < phone.dram_bytes_per_s


@pytest.mark.parametrize("field, value", [
    ("dram_bytes_per_s", 0), ("dram_bytes_per_s", -1.0), ("sram_bytes", -1), ("sram_bytes", 1.5),
    ("macs_per_cycle", 0), ("clock_hz", float("nan")), ("decompress_codes_per_cycle", float("inf")),
    ("macs_per_cycle", True),
])
def test_bad_config_values_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=field):
        dev.PRESETS["edge_small"].replace(**{field: value})


def test_sram_too_small_for_buffers_is_an_error_and_an_infeasible_sweep_row():
    work = dev.workload(tiny_model("lstm"), None)
    small = dev.PRESETS["edge_small"].replace(sram_bytes=work.reserved_bytes - 1)
    with pytest.raises(ValueError, match="cannot hold"):
        dev.simulate(work, small, [(1.0, 3)])
    rows = dev.sweep(work, [(1.0, 3)], small, sram_bytes=[work.reserved_bytes - 1, work.reserved_bytes])
    assert [row["feasible"] for row in rows] == [False, True]
    assert math.isnan(rows[0]["upl_ms_p50"]) and not math.isnan(rows[1]["upl_ms_p50"])


# ---------------------------------------------------------------------------------------------------------------
# Footprint: exact arithmetic
# ---------------------------------------------------------------------------------------------------------------


def mixed_export(model):
    """Per-channel uniform weights at 3, 4 and 8 bits, the LSTM's recurrent matrices left in float32."""
    names = [n for n in device_weights(model) if "weight_hh" not in n]
    plan = QuantPlan([(names[0], 3)] + [(n, 4 if i % 2 else 8) for i, n in enumerate(names[1:])])
    return export_quantized(model, plan_quantizers(model, plan, lambda bits: UniformQuantizer(bits)))


def expected_params_and_state(model) -> tuple[int, int]:
    """Biases int32 (the LSTM's two merged), LayerNorm gain int16 + offset int32; state by hand from the config."""
    c = model.config
    params = 0
    for name, p in model.named_parameters():
        if name.startswith("ctc_head"):
            continue
        if "bias_hh" in name:
            continue  # merged into bias_ih
        if name.endswith("bias") or "bias_ih" in name:
            params += 4 * p.numel()
        elif p.dim() == 1:  # LayerNorm gain
            params += 2 * p.numel()
    lstm_state = 3 * c.pred_hidden * c.pred_layers  # h int8 + c int16
    if c.encoder == "lstm":
        chunk = 1
        lstm_state += 3 * c.lstm_hidden * c.lstm_layers
        encoder_state = 0
    else:
        chunk = c.conformer_chunk_frames
        f1 = (c.input_dim - 3) // 2 + 1
        encoder_state = (c.input_dim + c.conformer_subsampling_channels * f1  # one past input row per conv
                         + c.conformer_layers * (c.conformer_conv_kernel - 1) * c.conformer_dim)
    joiner_state = chunk * c.joiner_dim + c.joiner_dim  # enc_proj of the chunk, pred_proj of the last token
    return params, lstm_state + encoder_state + joiner_state


@pytest.mark.parametrize("encoder", ["lstm", "conformer"])
def test_footprint_is_the_packed_bytes_plus_the_listed_buffers(encoder):
    model = tiny_model(encoder)
    exported = mixed_export(model)
    packed = {name: PackedTensor.from_codes(q.codes.numpy(), q.bits, q.lut.numpy(), q.scale.numpy())
              for name, q in exported.items()}
    on_device = {n: q for n, q in exported.items() if not n.startswith("ctc_head")}
    floats = [n for n in device_weights(model) if n not in on_device]
    assert floats, "the test needs some float32 weights"

    work = dev.workload(model, exported, max_audio_s=3.0)
    fp = work.footprint()
    assert fp == dev.workload(model, packed, max_audio_s=3.0).footprint()
    stored = fp.code_bytes + fp.table_bytes + fp.scale_bytes
    assert stored == sum(q.packed_bytes() for q in on_device.values())
    assert stored == packed_size_bytes({n: packed[n] for n in on_device})
    assert fp.code_bytes == sum(packed_nbytes(q.codes.numel(), q.bits) for q in on_device.values())
    assert fp.float_weight_bytes == sum(4 * model.get_parameter(n).numel() for n in floats)

    params, state = expected_params_and_state(model)
    assert (fp.param_bytes, fp.state_bytes) == (params, state)
    c = model.config
    kv = (c.conformer_layers * 2 * c.conformer_dim * 75) if encoder == "conformer" else 0  # 3 s = 75 frames of 40 ms
    assert fp.kv_cache_bytes == kv
    assert fp.activation_bytes == max(layer.activation_bytes for layer in work.layers) > 0
    assert fp.total_bytes == stored + fp.float_weight_bytes + params + state + kv + fp.activation_bytes


def test_bits_only_sizes_assume_a_full_lut_and_per_channel_scales():
    model = tiny_model("lstm")
    fp = dev.workload(model, at_bits(model, 3)).footprint()
    weights = [model.get_parameter(n) for n in device_weights(model)]
    assert fp.code_bytes == sum(packed_nbytes(w.numel(), 3) for w in weights)
    assert fp.table_bytes == 8 * len(weights)
    assert fp.scale_bytes == sum(4 * w.shape[0] for w in weights)
    per_tensor = dev.workload(model, at_bits(model, 3), per_channel_scales=False).footprint()
    assert per_tensor.scale_bytes == 4 * len(weights)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_packing_is_within_two_percent_of_the_physical_bound(name):
    model = preset_model(name)
    for bits in (3, 4, 5, 8):
        fp = dev.workload(model, at_bits(model, bits)).footprint()
        assert 1.0 <= fp.packing_ratio <= 1.02
        assert fp.physical_bound_bytes == pytest.approx(
            sum(w.numel() * bits / 8 + 2**bits + 4 * w.shape[0]
                for w in (model.get_parameter(n) for n in device_weights(model))))


def test_realistic_model_footprint_within_two_percent_of_the_physical_bound():
    """rnnt_small with its real uniform 5-bit export: the whole footprint (biases, state, buffers included)."""
    model = preset_model("rnnt_small")
    plan = QuantPlan.uniform(5)
    exported = export_quantized(model, plan_quantizers(model, plan, lambda bits: UniformQuantizer(bits)))
    fp = dev.workload(model, exported).footprint()
    assert fp.packing_ratio <= 1.0001  # padding: at most one byte per tensor
    assert fp.total_ratio <= 1.02


def test_more_bits_never_smaller():
    model = preset_model("conformer_small")
    totals = [dev.workload(model, at_bits(model, b)).footprint().total_bytes for b in range(1, 9)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    assert dev.workload(model, None).footprint().total_bytes > totals[-1]


# ---------------------------------------------------------------------------------------------------------------
# The cycle rule and the streaming definitions
# ---------------------------------------------------------------------------------------------------------------


def hand_cycles(model, config: dev.AcceleratorConfig, streamed: bool, frames: int, tokens: int) -> float:
    """Cycles of one 8-bit tiny RNN-T step with ``frames`` = 1 frame and ``tokens`` emitted, by the roofline rule,
    from the config alone: everything resident (``streamed=False``) or every weight read from DRAM."""
    c = model.config
    h, e, j, v = c.lstm_hidden, c.pred_embed_dim, c.joiner_dim, c.vocab_size

    def matrix(rows: int, cols: int) -> float:
        n = rows * cols
        stored = n + 256 + 4 * rows  # 8-bit codes, 256-entry LUT, per-row float32 scales
        fetch = stored / config.dram_bytes_per_cycle if streamed else 0.0
        return max(n / config.macs_per_cycle, n / config.decompress_codes_per_cycle, fetch)

    encoder = sum(matrix(4 * h, (4 * c.input_dim if k == 0 else h)) + matrix(4 * h, h) for k in range(c.lstm_layers))
    encoder += matrix(j, h)  # enc_proj
    row = e + 256 + 4  # one embedding row with the LUT and its scale
    embedding = max(e / config.decompress_codes_per_cycle, row / config.dram_bytes_per_cycle if streamed else 0.0)
    predictor = embedding + matrix(4 * h, e) + matrix(4 * h, h) + matrix(j, h)
    joiner = matrix(v, j)
    return encoder + tokens * predictor + (frames + tokens) * joiner


@pytest.mark.parametrize("streamed", [False, True])
def test_step_cycles_follow_the_roofline_rule(streamed):
    model = tiny_model("lstm")
    work = dev.workload(model, at_bits(model, 8))
    sram = work.reserved_bytes if streamed else work.reserved_bytes + work.footprint().weight_bytes
    config = dev.PRESETS["edge_small"].replace(sram_bytes=sram)
    result = dev.simulate(work, config, [dev.Utterance(0.2, 3, emissions=(0, 2, 0, 1, 0))])
    assert result.residency.resident_bytes == (0 if streamed else work.footprint().weight_bytes)
    expected = [hand_cycles(model, config, streamed, 1, t) / config.clock_hz for t in (0, 2, 0, 1, 0)]
    np.testing.assert_allclose(result.step_s, expected, rtol=1e-12)


def test_rtf_and_upl_definitions():
    model = preset_model("conformer_small")
    work = dev.workload(model, at_bits(model, 4))
    utts = utterances()
    result = dev.simulate(work, dev.PRESETS["edge_small"], utts)
    assert result.rtf == pytest.approx(result.step_s.sum() / sum(u.duration_s for u in utts), rel=1e-12)
    assert result.rtf == pytest.approx(result.compute_s.sum() / result.durations_s.sum(), rel=1e-12)
    assert result.latency_ms_per_frame == pytest.approx(1e3 * result.step_s.sum() / result.num_frames.sum())
    assert np.all(result.upl_s >= result.last_step_s)
    np.testing.assert_allclose(result.upl_s, result.backlog_s + result.lookahead_wait_s + result.last_step_s,
                               rtol=0, atol=1e-15)
    assert np.all(result.lookahead_wait_s == 0)  # the last partial chunk is flushed at the end of the audio
    assert result.upl_ms_p50 <= result.upl_ms_p90

    waiting = dev.simulate(work, dev.PRESETS["edge_small"], utts, flush_at_end=False)
    chunk_s = work.chunk_frames * work.frame_s
    expected_wait = [math.ceil(u.duration_s / chunk_s - 1e-9) * chunk_s - u.duration_s for u in utts]
    np.testing.assert_allclose(waiting.lookahead_wait_s, expected_wait, atol=1e-12)
    assert np.all(waiting.upl_s >= result.upl_s)


def test_backlog_when_the_device_is_slower_than_real_time():
    model = preset_model("rnnt_small")
    work = dev.workload(model, at_bits(model, 8))
    slow = dev.PRESETS["edge_small"].replace(clock_hz=2e6, dram_bytes_per_s=5e6)  # far slower than real time
    result = dev.simulate(work, slow, [(2.0, 10)])
    assert result.rtf > 1
    assert result.backlog_s[0] > 0
    # The queue never idles, so the last step finishes when the first arrival plus all compute has elapsed.
    assert result.upl_s[0] == pytest.approx(work.frame_s + result.compute_s[0] - 2.0, rel=1e-9)


def test_attention_context_grows_and_is_bounded():
    model = preset_model("conformer_small")
    work = dev.workload(model, at_bits(model, 8), max_audio_s=4.0)
    with pytest.raises(ValueError, match="max_audio_s"):
        dev.simulate(work, dev.PRESETS["phone"], [(4.5, 3)])
    result = dev.simulate(work, dev.PRESETS["phone"], [(4.0, 0)])
    steps = result.step_s
    assert np.all(np.diff(steps[:-1]) > 0)  # full chunks cost more as the visible context grows


# ---------------------------------------------------------------------------------------------------------------
# Residency and monotonicity
# ---------------------------------------------------------------------------------------------------------------


def test_residency_respects_sram_and_item_sizes():
    model = preset_model("conformer_small")
    work = dev.workload(model, at_bits(model, 5))
    for config in dev.PRESETS.values():
        residency = dev.plan_residency(work, config, utterances())
        assert residency.reserved_bytes == work.reserved_bytes
        assert residency.free_bytes >= 0
        sizes = {layer.name: layer.movable_bytes for layer in work.layers}
        assert all(0 <= b <= sizes[name] for name, b in residency.resident.items())
        assert all(isinstance(b, int) for b in residency.resident.values())


def test_fewer_bit_weights_that_fit_remove_dram_traffic():
    model = preset_model("rnnt_small")
    low, high = dev.workload(model, at_bits(model, 4)), dev.workload(model, at_bits(model, 8))
    sram = low.reserved_bytes + low.footprint().weight_bytes
    assert sram < high.reserved_bytes + high.footprint().weight_bytes
    config = dev.PRESETS["edge_mid"].replace(sram_bytes=sram)
    utts = utterances()
    fits, spills = dev.simulate(low, config, utts), dev.simulate(high, config, utts)
    assert fits.dram_bytes == 0 and fits.residency.free_bytes >= 0
    assert spills.dram_bytes > 0
    assert fits.latency_ms_per_frame < spills.latency_ms_per_frame and fits.upl_ms_p90 < spills.upl_ms_p90


METRICS = ("latency_ms_per_frame", "rtf", "upl_ms_p50", "upl_ms_p90", "step_ms_max")
TOLERANCE = 1e-9  # relative: float rounding only


@pytest.mark.parametrize("name", ["rnnt_small", "conformer_small"])
def test_more_bits_never_faster(name):
    model = preset_model(name)
    utts = utterances()
    base = dev.PRESETS["edge_small"]
    srams, bandwidths = [base.sram_bytes, 4 * base.sram_bytes], [base.dram_bytes_per_s, 4 * base.dram_bytes_per_s]
    grids = [dev.sweep(dev.workload(model, at_bits(model, b), max_audio_s=6.0), utts, base, srams, bandwidths)
             for b in range(2, 9)]
    for lower, higher in zip(grids, grids[1:]):
        for low, high in zip(lower, higher):
            for metric in METRICS:
                assert low[metric] <= high[metric] * (1 + TOLERANCE), (metric, low, high)
    # Raising the bits of some layers only (a mixed plan) is never faster either.
    mixed = at_bits(model, 4)
    for key in list(mixed)[::3]:
        mixed[key] = 7
    plain = dev.simulate(dev.workload(model, at_bits(model, 4), max_audio_s=6.0), base, utts)
    raised = dev.simulate(dev.workload(model, mixed, max_audio_s=6.0), base, utts)
    for metric in METRICS:
        assert getattr(plain, metric) <= getattr(raised, metric) * (1 + TOLERANCE)


@pytest.mark.parametrize("name", ["rnnt_small", "conformer_small"])
def test_more_sram_or_bandwidth_never_slower(name):
    model = preset_model(name)
    work = dev.workload(model, at_bits(model, 5), max_audio_s=6.0)
    base = dev.PRESETS["edge_small"]
    srams = [work.reserved_bytes + k * 64 * dev.KiB for k in (0, 1, 3, 8, 20, 40)]
    bandwidths = [0.5e9, 1e9, 2e9, 8e9]
    rows = {(r["sram_bytes"], r["dram_bytes_per_s"]): r for r in dev.sweep(work, utterances(), base, srams,
                                                                          bandwidths)}
    for (sram, bw), row in rows.items():
        for (sram2, bw2), row2 in rows.items():
            if sram2 >= sram and bw2 >= bw:
                for metric in METRICS:
                    assert row2[metric] <= row[metric] * (1 + TOLERANCE), (metric, (sram, bw), (sram2, bw2))
    # More SRAM only ever adds resident bytes to each layer (the fill order does not depend on the SRAM size).
    plans = [dev.plan_residency(work, base.replace(sram_bytes=s), utterances()) for s in srams]
    for small, large in zip(plans, plans[1:]):
        assert all(small.resident[k] <= large.resident[k] for k in small.resident)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def test_workload_and_utterance_input_errors():
    model = tiny_model("lstm")
    with pytest.raises(ValueError, match="not parameters"):
        dev.workload(model, {"transcriber.nope.weight": 4})
    with pytest.raises(ValueError, match="biases or norms"):
        dev.workload(model, {"joiner.output.bias": 4})
    with pytest.raises(ValueError, match="bits"):
        dev.workload(model, {"joiner.output.weight": 9})
    assert dev.workload(model, {"ctc_head.weight": 4}).footprint() == dev.workload(model, None).footprint()
    with pytest.raises(ValueError, match="emissions"):
        dev.Utterance(1.0, 3, emissions=(1, 1))
    with pytest.raises(ValueError, match="duration"):
        dev.Utterance(0.0, 1)
    work = dev.workload(model, None)
    with pytest.raises(ValueError, match="emission counts"):
        dev.simulate(work, dev.PRESETS["phone"], [dev.Utterance(1.0, 2, emissions=(1, 1))])


def test_tokens_from_a_rate_and_spread_evenly():
    utts = dev.utterances_at_rate([1.0, 2.0], tokens_per_frame=0.2)
    assert [u.tokens for u in utts] == [5, 10]
    model = tiny_model("lstm")
    work = dev.workload(model, None)
    even = dev.simulate(work, dev.PRESETS["edge_small"], [dev.Utterance(0.4, 5)])
    explicit = dev.simulate(work, dev.PRESETS["edge_small"],
                            [dev.Utterance(0.4, 5, emissions=(0, 1, 0, 1, 0, 1, 0, 1, 0, 1))])
    np.testing.assert_allclose(even.step_s, explicit.step_s)
