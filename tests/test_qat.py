"""sub8.qat: the method registry, fine-tune and PTQ rows (packed size from the bits, levels, run bookkeeping), the
headline and recovery tables, GQ rows and notebook 04's tables (plans, sensitivities, automatic plans, claims, level
snapshots), native integer QAT rows and notebook 05's tables, and the level comparison of notebook 02."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from test_evaluate import TEXTS, make_feature_set
from test_quant_apply import tiny_model

from sub8 import profiles, qat
from sub8.data.features import Cmvn
from sub8.data.prepare import PreparedData
from sub8.data.tokenizer import build_tokenizer
from sub8.evaluate import decode, score
from sub8.experiment import hooks_state, load_model, model_dir
from sub8.io import atomic_torch_save
from sub8.qat import (
    CENTROID_COLUMNS,
    CLAIM_COLUMNS,
    CONTROL_COLUMNS,
    CONTROL_GROUP_COLUMNS,
    GQ_COLUMNS,
    MAX_PLAN_LABEL,
    NATIVE_COLUMNS,
    CENTROID_METHODS,
    MU_CHOICES,
    ROW_COLUMNS,
    SAME_BITS_COLUMNS,
    FineTune,
    MethodResult,
    NamedPlan,
    centroid_summary,
    centroid_table,
    control_group_table,
    control_table,
    finetune_row,
    gq_auto_plan,
    gq_claims,
    gq_level_snapshots,
    gq_options,
    gq_plan_name,
    gq_schedule,
    gq_sensitivity,
    gq_table,
    headline_table,
    int8_grid_levels,
    activation_bits,
    make_hooks,
    native_claims,
    native_table,
    plan_bits,
    plan_label,
    plan_size_bytes,
    ptq_model,
    ptq_row,
    recovery_table,
    register_method,
    run_name,
    s8bqat_options,
    same_bits_table,
    sensitivity_table,
    tensor_centroids,
)
from sub8.quant import (
    GQ,
    S8BQAT,
    GQQuantizer,
    NativePlan,
    NativeQAT,
    QuantPlan,
    UniformQAT,
    int8_levels,
    native_plan,
    native_size,
    quantizable_parameters,
    quantized_size_bytes,
)
from sub8.quant import native as native_module
from sub8.quant.native import ActivationQuantizer, NativeLinear, activation_sites

FINETUNE_STEPS = 2


@pytest.fixture
def data(tmp_path, monkeypatch) -> PreparedData:
    """A tiny prepared corpus (the same 7 utterances in every split) and a trained-looking baseline ``base``."""
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    fs = make_feature_set()
    tokenizer = build_tokenizer("word", TEXTS)
    schedule = dict(max_steps=FINETUNE_STEPS, lr=1e-3, warmup_steps=1, log_every=1, ckpt_every=FINETUNE_STEPS,
                    num_threads=1, device="cpu")
    profile = profiles.get("smoke", finetune=schedule)
    save_baseline(profile, "base", tiny_model(input_dim=80, vocab_size=tokenizer.vocab_size))
    # A Conformer baseline too, for the native plans defined over its blocks (mixed 4/8).
    save_baseline(profile, "conf", tiny_model(encoder="conformer", input_dim=80, vocab_size=tokenizer.vocab_size))
    return PreparedData(profile, {}, tokenizer, {s: fs for s in ("train", "dev", "test")}, Cmvn.from_features(fs))


def save_baseline(profile: profiles.Profile, name: str, model: torch.nn.Module) -> None:
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config.to_dict()},
                      model_dir(profile, name) / "final.pt")


def packed_bytes(model: torch.nn.Module, bits: int, lut_entries: int, scales_per_tensor=lambda w: 1) -> int:
    """What every quantized weight at ``bits`` costs packed (⌈N·b/8⌉ + LUT + float32 scales) plus 4 bytes for every
    other parameter but the training-only CTC head: the size a row must report, computed independently of
    sub8.quant's export."""
    quantized = set(quantizable_parameters(model))
    size = 0
    for name, p in model.named_parameters():
        if name.startswith("ctc_head."):
            continue
        if name in quantized:
            size += math.ceil(p.numel() * bits / 8) + lut_entries + 4 * scales_per_tensor(p)
        else:
            size += 4 * p.numel()
    return size


# --- the registry ------------------------------------------------------------------------------------------------


def test_make_hooks_builds_each_method_of_issue_4():
    plan = QuantPlan.uniform(4)
    assert make_hooks("fp32_control") is None
    uniform, per_channel = make_hooks("uniform", plan), make_hooks("uniform_per_channel", plan)
    assert isinstance(uniform, UniformQAT) and not uniform.per_channel and uniform.plan is plan
    assert isinstance(per_channel, UniformQAT) and per_channel.per_channel
    full = make_hooks("s8bqat", plan, reg_weight=0.25, ramp_steps=3, compress_every=5)
    assert isinstance(full, S8BQAT) and full.regularize and full.compress
    assert (full.reg_weight, full.ramp_steps, full.compress_every) == (0.25, 3, 5)
    assert not make_hooks("s8bqat_no_compressor", plan).compress
    assert not make_hooks("s8bqat_no_regularizer", plan).regularize
    assert {"fp32_control", "uniform", "uniform_per_channel", "s8bqat", "s8bqat_no_compressor",
            "s8bqat_no_regularizer"} <= set(qat.registered_methods())


def test_make_hooks_rejects_an_unknown_method_or_bad_arguments_clearly():
    plan = QuantPlan.uniform(4)
    with pytest.raises(ValueError, match=r"unknown QAT method 'gq_typo'.*registered: .*s8bqat"):
        make_hooks("gq_typo", plan)
    with pytest.raises(ValueError, match="ptq_row"):
        make_hooks("ptq", plan)
    with pytest.raises(ValueError, match="give it a QuantPlan"):
        make_hooks("s8bqat")
    with pytest.raises(ValueError, match="plan=None"):
        make_hooks("fp32_control", plan)
    with pytest.raises(ValueError, match="bad options"):
        make_hooks("uniform", plan, reg_weight=1.0)


def test_other_modules_can_register_methods(monkeypatch):
    monkeypatch.setattr(qat, "_METHODS", dict(qat._METHODS))  # leave the real registry as it was
    register_method("uniform_half", lambda plan, per_channel=False: UniformQAT(plan, per_channel))
    assert make_hooks("uniform_half", QuantPlan.uniform(4), per_channel=True).per_channel
    with pytest.raises(ValueError, match="already registered"):
        register_method("uniform_half", lambda plan: None)
    register_method("uniform_half", lambda plan: None, replace=True)
    assert make_hooks("uniform_half", QuantPlan.uniform(4)) is None
    for bad in ("Bad-Name", "ptq"):
        with pytest.raises(ValueError):
            register_method(bad, lambda plan: None)


def test_run_names_and_plan_labels():
    assert plan_label(QuantPlan.uniform(4)) == "4b"
    assert plan_label(QuantPlan([("*", 4), ("joiner", 8), ("transcriber.lstm.weight_hh_l*", 2)])) == \
        "all4_joiner8_transcriber.lstm.weight_hh_lx2"
    assert run_name("rnnt_large", "s8bqat", QuantPlan.uniform(4)) == "rnnt_large-s8bqat-4b"
    assert run_name("rnnt_large", "fp32_control") == "rnnt_large-fp32_control"
    assert run_name("rnnt_large", "gq", QuantPlan.uniform(5), "hard_start") == "rnnt_large-gq-5b-hard_start"
    for bad in ("", "a-b", "../x"):
        with pytest.raises(ValueError, match="variant"):
            run_name("rnnt_large", "gq", QuantPlan.uniform(5), bad)
    assert s8bqat_options(300) == {"reg_weight": 1.0, "ramp_steps": 100, "compress_every": 100}
    assert s8bqat_options(2)["compress_every"] == 1


# --- rows --------------------------------------------------------------------------------------------------------


def test_s8bqat_row_reports_the_packed_bytes_its_bits_imply_and_levels_on_its_luts(data):
    bits = 3
    result = finetune_row(data, "base", "s8bqat", QuantPlan.uniform(bits), s8bqat_options(FINETUNE_STEPS))
    row = result.row
    assert result.name == "base-s8bqat-3b" and list(row) == list(ROW_COLUMNS)
    assert (row["model"], row["method"], row["bits"], row["finetune_steps"]) == ("base", "s8bqat", bits, 2)
    assert row["finetune_minutes"] > 0 and row["wer_delta_lo"] <= row["wer_delta_hi"]
    model = load_model(data.profile, result.name)
    assert row["size_bytes_packed"] == packed_bytes(model, bits, lut_entries=2**bits)  # S8BQAT: 2^b-entry LUTs
    state = hooks_state(data.profile, result.name)
    for name, lut, scale in zip(state["names"], state["luts"], state["scales"], strict=True):
        weight = model.get_parameter(name).detach()
        assert weight.unique().numel() <= 2**bits
        assert torch.isin(weight, int8_levels(lut, scale)).all(), name
    assert len(result.test.per_utterance) == len(data.features["test"])
    assert (model_dir(data.profile, result.name) / "eval_test.csv").is_file()


@pytest.mark.parametrize("method", ["uniform", "uniform_per_channel"])
def test_uniform_rows_recompute_the_same_codes_from_the_hard_weights(data, method):
    bits = 4
    result = finetune_row(data, "base", method, QuantPlan.uniform(bits))
    model = load_model(data.profile, result.name)
    # 2^b − 1 symmetric levels; one scale per tensor, or per output row
    scales = (lambda w: w.shape[0]) if method == "uniform_per_channel" else (lambda w: 1)
    assert result.row["size_bytes_packed"] == packed_bytes(model, bits, 2**bits - 1, scales)
    for name in quantizable_parameters(model):
        weight = model.get_parameter(name).detach()
        groups = list(weight) if method == "uniform_per_channel" else [weight]
        assert all(g.unique().numel() <= 2**bits - 1 for g in groups), name


def test_fp32_control_row_is_unquantized_and_the_same_steps(data):
    result = finetune_row(data, "base", "fp32_control")
    model = load_model(data.profile, result.name)
    assert result.name == "base-fp32_control"
    assert result.row["bits"] == 32 and result.row["finetune_steps"] == FINETUNE_STEPS
    deployed = [p for name, p in model.named_parameters() if not name.startswith("ctc_head.")]
    assert result.row["size_bytes_packed"] == 4 * sum(p.numel() for p in deployed)


def test_ptq_row_quantizes_a_copy_to_at_most_2b_values_per_tensor(data):
    bits = 2
    before = load_model(data.profile, "base").state_dict()
    model, quantizers = ptq_model(data.profile, "base", QuantPlan.uniform(bits))
    assert set(quantizers) == set(quantizable_parameters(model))
    for name in quantizers:
        assert model.get_parameter(name).unique().numel() <= 2**bits  # 2^b − 1: symmetric with zero
    result = ptq_row(data, "base", bits)
    assert result.name == "base-ptq-2b"
    assert result.row["method"] == "ptq" and result.row["finetune_steps"] == 0 and result.row["finetune_minutes"] == 0
    assert result.row["size_bytes_packed"] == packed_bytes(model, bits, 2**bits - 1)
    after = load_model(data.profile, "base").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "PTQ changed the baseline's checkpoint"
    # evaluated under its own name: its hypotheses are cached apart from the baseline's
    assert (model_dir(data.profile, "base-ptq-2b") / "eval_test.csv").is_file()


def test_a_finished_run_is_reused_and_a_changed_setting_runs_again(data, monkeypatch, capsys):
    plan = QuantPlan.uniform(3)
    name = run_name("base", "s8bqat", plan)
    final = model_dir(data.profile, name) / "final.pt"
    found = []  # whether the run's final.pt was there when fine-tuning started (there: sub8.train skips the run)

    def spying_finetune(*args, **kwargs):
        found.append(final.is_file())
        return finetune(*args, **kwargs)

    finetune = qat.finetune
    monkeypatch.setattr(qat, "finetune", spying_finetune)
    first = finetune_row(data, "base", "s8bqat", plan, s8bqat_options(FINETUNE_STEPS))
    again = finetune_row(data, "base", "s8bqat", plan, s8bqat_options(FINETUNE_STEPS))
    assert found == [False, True] and again.row == first.row
    changed = finetune_row(data, "base", "s8bqat", plan, s8bqat_options(FINETUNE_STEPS, reg_weight=0.5))
    assert found[-1] is False and "options changed since it ran" in capsys.readouterr().out
    spec = json.loads((model_dir(data.profile, changed.name) / "qat.json").read_text())
    assert spec["options"]["reg_weight"] == 0.5 and spec["method"] == "s8bqat" and spec["plan"] == [["*", 3]]
    finetune_row(data, "base", "s8bqat", plan, s8bqat_options(FINETUNE_STEPS, reg_weight=0.5), force=True)
    assert found[-1] is False
    # a retrained baseline (another checkpoint) makes the run stale too
    model = tiny_model(input_dim=80, vocab_size=data.tokenizer.vocab_size, seed=7)
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config.to_dict()},
                      model_dir(data.profile, "base") / "final.pt")
    finetune_row(data, "base", "s8bqat", plan, s8bqat_options(FINETUNE_STEPS, reg_weight=0.5))
    assert found[-1] is False and "base_digest changed" in capsys.readouterr().out


def test_a_missing_baseline_is_a_clear_error(data):
    with pytest.raises(FileNotFoundError, match="01_baseline"):
        ptq_row(data, "never_trained", 4)


# --- headline and recovery tables ---------------------------------------------------------------------------------


def fake_result(model: str, method: str, bits: int, hyps: list[str], size: int) -> MethodResult:
    refs = ["a b c d", "e f g h"]
    test = score(refs, hyps, utt_ids=["u1", "u2"])
    row = dict.fromkeys(ROW_COLUMNS, 0) | {"model": model, "method": method, "bits": bits, "wer_test": test.wer,
                                           "size_bytes_packed": size}
    return MethodResult(f"{model}-{method}-{bits}b", row, test)


def test_headline_puts_the_large_model_below_8_bits_next_to_the_small_one_at_8():
    results = [
        fake_result("small", "uniform_per_channel", 8, ["a b c x", "e f g h"], 1000),  # WER 12.5
        fake_result("large", "s8bqat", 4, ["a b c d", "e f g h"], 900),  # WER 0
        fake_result("large", "s8bqat", 8, ["a b c d", "e f g h"], 2000),  # not below 8 bits: left out
        fake_result("large", "uniform", 4, ["a b c d", "e f g h"], 900),  # not the headline method
    ]
    table = headline_table(results, "small", "large")
    assert list(table.columns) == list(qat.HEADLINE_COLUMNS) and len(table) == 1
    row = table.iloc[0]
    assert (row.large_bits, row.small_bits, row.large_wer, row.small_wer) == (4, 8, 0.0, 12.5)
    assert row.wer_rel_pct == -100.0 and row.bytes_ratio == 0.9 and row.wer_diff_lo <= row.wer_diff_hi
    with pytest.raises(ValueError, match="no small uniform 8-bit"):
        headline_table(results, "small", "large", reference=("uniform", 8))


def test_recovery_share_only_where_uniform_lost_at_least_10_percent():
    table = pd.DataFrame([
        {"model": "m", "method": "uniform", "bits": 3, "wer_test": 20.0},
        {"model": "m", "method": "s8bqat", "bits": 3, "wer_test": 12.5},
        {"model": "m", "method": "uniform", "bits": 6, "wer_test": 10.5},
        {"model": "m", "method": "s8bqat", "bits": 6, "wer_test": 10.0},
        {"model": "m", "method": "s8bqat", "bits": 2, "wer_test": 30.0},  # no uniform at 2 bits: no row
    ])
    out = recovery_table(table, {"m": 10.0}).set_index("bits")
    assert list(out.index) == [3, 6]
    assert out.loc[3, "uniform_loss_rel_pct"] == 100.0 and out.loc[3, "recovered_share"] == 0.75
    assert out.loc[6, "uniform_loss_rel_pct"] == pytest.approx(5.0) and math.isnan(out.loc[6, "recovered_share"])


# --- GQ (notebook 04) ----------------------------------------------------------------------------------------------

# Tiny RNN-T (tiny_model): 2 encoder LSTM layers; the mixed plan puts the second at 1 bit, as notebook 04's lstm1b.
MIXED = NamedPlan("mixed-lstm1b", [("*", 4), ("transcriber.lstm.weight_*_l[1-9]", 1), ("predictor.embedding", 8),
                                   ("joiner.output", 8)])


def test_gq_is_registered_and_its_options_scale_the_schedule_to_the_fine_tune():
    assert "gq" in qat.registered_methods()
    options = gq_options(200)
    assert options == {"mu": 4.0, "alpha_start": 1.0, "alpha_hard": 128.0, "anneal_steps": 100, "level_lr_scale": 1.0}
    hooks = make_hooks("gq", MIXED, **gq_options(4, mu=2.0, anneal_fraction=0.25, level_lr_scale=3.0))
    assert isinstance(hooks, GQ) and hooks.plan is MIXED and hooks.mu == 2.0 and hooks.level_lr_scale == 3.0
    assert hooks.schedule.anneal_steps == 1 and gq_schedule(gq_options(200)).anneal_steps == 100
    schedule = gq_schedule(options)
    assert schedule.alpha(0) == 1.0 and schedule.alpha(100) == schedule.alpha(200) == 128.0
    assert not schedule.hard(99) and schedule.hard(100)
    json.dumps(options)  # recorded in qat.json as they are
    with pytest.raises(ValueError, match="give it a QuantPlan"):
        make_hooks("gq", None)
    hard_start = gq_schedule(gq_options(200, anneal_fraction=0))  # the ablation without a soft phase
    assert hard_start.anneal_steps == 0 and hard_start.hard(0) and hard_start.alpha(0) == 128.0
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="anneal_fraction"):
            gq_options(200, anneal_fraction=bad)


def test_named_and_long_plans_give_short_path_safe_run_names():
    assert plan_label(MIXED) == "mixed-lstm1b" and run_name("rnnt_large", "gq", MIXED) == "rnnt_large-gq-mixed-lstm1b"
    assert MIXED.to_list()[1] == ["transcriber.lstm.weight_*_l[1-9]", 1]  # the rules, not the name, are recorded
    for bad in ("Mixed", "mixed/1b", "", "-x", "a" * (MAX_PLAN_LABEL + 1)):
        with pytest.raises(ValueError, match="plan name"):
            NamedPlan(bad, [("*", 4)])
    # an unnamed plan naming every weight (an automatic plan's form) would give a label of hundreds of characters
    names = [f"transcriber.layers.{i}.ffn1.sequential.{j}.weight" for i in range(4) for j in (1, 4)]
    long_a, long_b = QuantPlan([(n, 2) for n in names]), QuantPlan([(n, 2) for n in names[:-1]] + [(names[-1], 3)])
    label = plan_label(long_a)
    assert re.fullmatch(r"8rules_[0-9a-f]{12}", label) and label == plan_label(QuantPlan([(n, 2) for n in names]))
    assert plan_label(long_b) != label
    assert plan_label(QuantPlan([("*", 4), ("joiner", 8)])) == "all4_joiner8"  # short labels unchanged
    assert gq_plan_name(QuantPlan.uniform(3)) == "uniform-3" and gq_plan_name(MIXED) == "mixed-lstm1b"
    assert gq_plan_name(NamedPlan("auto-4b", [("*", 4)])) == "auto-4b"


def test_gq_row_packs_its_bits_and_every_weight_sits_on_its_trained_int8_levels(data):
    result = finetune_row(data, "base", "gq", MIXED, gq_options(FINETUNE_STEPS))
    row = result.row
    assert result.name == "base-gq-mixed-lstm1b" and result.plan is MIXED and list(row) == list(ROW_COLUMNS)
    assert (row["model"], row["method"], row["finetune_steps"]) == ("base", "gq", FINETUNE_STEPS)
    model = load_model(data.profile, result.name)
    bits = dict(MIXED.resolve(model))
    assert bits["transcriber.lstm.weight_hh_l1"] == 1 and bits["joiner.output.weight"] == 8
    assert bits["transcriber.lstm.weight_ih_l0"] == 4
    numel = {name: model.get_parameter(name).numel() for name in bits}
    assert row["bits"] == pytest.approx(sum(numel[n] * b for n, b in bits.items()) / sum(numel.values()))
    # packed size by hand: ⌈N·b/8⌉ + 2^b LUT bytes + a float32 scale per tensor, 4 B per other deployed parameter
    by_hand = sum(math.ceil(numel[n] * b / 8) + 2**b + 4 for n, b in bits.items()) + sum(
        4 * p.numel() for n, p in model.named_parameters() if n not in bits and not n.startswith("ctc_head."))
    assert row["size_bytes_packed"] == by_hand == plan_size_bytes(load_model(data.profile, "base"), MIXED)
    spec = json.loads((model_dir(data.profile, result.name) / "qat.json").read_text())
    assert spec["method"] == "gq" and spec["options"] == gq_options(FINETUNE_STEPS) and spec["plan"] == MIXED.to_list()
    state = hooks_state(data.profile, result.name)
    hooks = make_hooks("gq", MIXED, **gq_options(FINETUNE_STEPS))
    hooks.load_state_dict(state)
    for name, quantizer in hooks.tensors.items():
        weight = model.get_parameter(name).detach()
        assert quantizer.bits == bits[name] and weight.unique().numel() <= 2 ** bits[name], name
        assert torch.isin(weight, int8_levels(*quantizer.int8_grid(weight))).all(), name
    assert model.get_parameter("transcriber.lstm.weight_hh_l1").unique().numel() == 2  # 1 bit: two values

    # notebook 04's table: plan names, the fewest bits of any weight
    uniform = finetune_row(data, "base", "gq", QuantPlan.uniform(2), gq_options(FINETUNE_STEPS))
    table = gq_table(data.profile, [uniform, result])
    assert list(table.columns) == list(GQ_COLUMNS) and list(table.plan) == ["uniform-2", "mixed-lstm1b"]
    assert list(table.min_bits) == [2, 1] and table.mean_bits.tolist() == [2, pytest.approx(row["bits"])]
    assert table.size_bytes_packed.tolist() == [uniform.row["size_bytes_packed"], row["size_bytes_packed"]]
    with pytest.raises(ValueError, match="not a 'gq' one"):
        gq_table(data.profile, [finetune_row(data, "base", "fp32_control")])

    # the levels before (GQ's fit to the baseline) and after (the trained state), on the int8 grid
    (snap,) = gq_level_snapshots(data.profile, "base", uniform.name, ["transcriber.lstm.weight_ih_l0"])
    baseline = load_model(data.profile, "base").get_parameter("transcriber.lstm.weight_ih_l0").detach()
    start = GQQuantizer.fit(baseline, 2)
    assert snap.bits == 2 and len(snap.before) == len(snap.after) == 4
    assert np.allclose(snap.before, int8_levels(*start.int8_grid(baseline)).numpy())
    assert np.array_equal(snap.weights, baseline.reshape(-1).numpy())
    tuned = load_model(data.profile, uniform.name).get_parameter("transcriber.lstm.weight_ih_l0").detach()
    assert np.isin(tuned.numpy(), snap.after).all() and snap.counts.sum() == tuned.numel()
    assert snap.scale_before == pytest.approx(float(start.log_scale.detach().exp()))
    assert len(gq_level_snapshots(data.profile, "base", result.name)) == len(bits)
    with pytest.raises(ValueError, match="did not quantize"):
        gq_level_snapshots(data.profile, "base", uniform.name, ["transcriber.lstm.bias_ih_l0"])


def test_a_finished_gq_run_is_reused_and_a_changed_option_runs_again(data, capsys):
    plan = QuantPlan.uniform(3)
    first = finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS))
    final = model_dir(data.profile, first.name) / "final.pt"
    written = final.stat().st_mtime_ns
    again = finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS))
    assert again.row == first.row and final.stat().st_mtime_ns == written
    finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS, mu=8.0))
    assert "options changed since it ran" in capsys.readouterr().out
    assert hooks_state(data.profile, first.name)["mu"] == 8.0


def test_a_variant_runs_beside_the_plain_run_without_replacing_it(data):
    plan = QuantPlan.uniform(3)
    plain = finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS))
    final = model_dir(data.profile, plain.name) / "final.pt"
    written = final.stat().st_mtime_ns
    hard = finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS, anneal_fraction=0), variant="hard_start")
    assert hard.name == f"{plain.name}-hard_start" and hard.variant == "hard_start" and plain.variant is None
    assert json.loads((model_dir(data.profile, hard.name) / "qat.json").read_text())["options"]["anneal_steps"] == 0
    again = finetune_row(data, "base", "gq", plan, gq_options(FINETUNE_STEPS))  # the plain run: still finished
    assert again.row == plain.row and final.stat().st_mtime_ns == written
    assert FineTune("base", "gq", plan, variant="hard_start").name == hard.name


def test_sensitivities_are_measured_once_and_again_when_their_settings_change(data, monkeypatch):
    calls = []
    real = qat.measure_sensitivity

    def counting(model, batches, bits):
        calls.append((len(batches), tuple(bits)))
        return real(model, batches, bits)

    monkeypatch.setattr(qat, "measure_sensitivity", counting)
    table = gq_sensitivity(data, "base", num_batches=1, bits=(1, 4, 8))
    model = load_model(data.profile, "base")
    assert list(table) == quantizable_parameters(model) and all(list(row) == [1, 4, 8] for row in table.values())
    assert all(row[1] >= row[4] >= row[8] for row in table.values())  # made non-increasing in the width
    assert gq_sensitivity(data, "base", num_batches=1, bits=(8, 4, 1)) == table and len(calls) == 1  # cached
    gq_sensitivity(data, "base", num_batches=2, bits=(1, 4, 8))
    gq_sensitivity(data, "base", num_batches=2, bits=(1, 4, 8), force=True)
    assert calls == [(1, (1, 4, 8)), (2, (1, 4, 8)), (2, (1, 4, 8))]
    long = sensitivity_table({"base": table}, {"base": model})
    assert list(long.columns) == ["model", "tensor", "numel", "bits", "loss_increase"] and len(long) == 3 * len(table)


def test_auto_plan_fits_the_packed_size_of_the_uniform_plan_and_spends_bits_where_loss_rises(data):
    model = load_model(data.profile, "base")
    names = quantizable_parameters(model)
    # every weight loses little from fewer bits, except one that loses a lot below 8 bits
    sensitive = "transcriber.lstm.weight_hh_l0"
    sensitivity = {n: {b: (100.0 if n == sensitive and b < 8 else 0.01) / b for b in (1, 2, 3, 4, 8)} for n in names}
    plan, allocation = gq_auto_plan(model, sensitivity, 3)
    assert isinstance(plan, NamedPlan) and plan_label(plan) == "auto-3b" and gq_plan_name(plan) == "auto-3b"
    budget = packed_bytes(model, 3, 2**3)  # by hand; the CTC head is not deployed, so not part of the budget
    assert budget == plan_size_bytes(model, QuantPlan.uniform(3))
    assert allocation.size_bytes == plan_size_bytes(model, plan) <= budget
    bits = dict(plan.resolve(model))
    assert list(bits) == names and bits[sensitive] == 8 and min(bits.values()) < 3
    with pytest.raises(ValueError, match="below the smallest possible size"):
        gq_auto_plan(model, {n: {4: 0.0} for n in names}, 2)


def test_gq_claims_follow_issue_5s_targets():
    table = pd.DataFrame([
        {"model": "m", "plan": "uniform-6", "mean_bits": 6, "min_bits": 6, "wer_test": 20.0, "wer_delta_lo": 1.0},
        {"model": "m", "plan": "uniform-5", "mean_bits": 5, "min_bits": 5, "wer_test": 10.1, "wer_delta_lo": -0.2},
        {"model": "m", "plan": "uniform-2", "mean_bits": 2, "min_bits": 2, "wer_test": 10.3, "wer_delta_lo": 0.1},
        {"model": "m", "plan": "mixed-a", "mean_bits": 3.1, "min_bits": 1, "wer_test": 10.4, "wer_delta_lo": 0.2},
        {"model": "m", "plan": "mixed-b", "mean_bits": 3.5, "min_bits": 2, "wer_test": 50.0, "wer_delta_lo": 9.0},
        {"model": "m", "plan": "auto-3b", "mean_bits": 2.9, "min_bits": 1, "wer_test": 10.6, "wer_delta_lo": 0.3},
        {"model": "z", "plan": "uniform-4", "mean_bits": 4, "min_bits": 4, "wer_test": 0.0, "wer_delta_lo": 0.0},
    ])
    claims = gq_claims(table, {"m": 10.0, "z": 0.0})
    assert list(claims.columns) == list(CLAIM_COLUMNS) and claims.holds.map(type).eq(bool).all()
    # uniform-6 has no target, nor a mixed plan without 1-bit layers
    assert set(claims.plan) == {"uniform-5", "uniform-2", "mixed-a", "auto-3b", "uniform-4"}
    holds = claims.set_index(["model", "plan", "claim"]).holds
    measured = claims.set_index(["model", "plan", "claim"]).measured
    assert holds["m", "uniform-5", "not significantly worse than fp32"]
    assert holds["m", "uniform-5", "WER within 2% relative of fp32"]  # +1%
    assert not holds["m", "uniform-2", "not significantly worse than fp32"]
    assert not holds["m", "uniform-2", "WER within 2% relative of fp32"]  # +3%
    assert measured["m", "uniform-2", "WER within 2% relative of fp32"] == pytest.approx(3.0)
    assert holds["m", "mixed-a", "1-bit layers: WER within 5% relative of fp32"]  # +4%
    assert not holds["m", "auto-3b", "1-bit layers: WER within 5% relative of fp32"]  # +6%
    assert holds["z", "uniform-4", "WER within 2% relative of fp32"]  # fp32 WER 0 and still 0


def test_same_bits_table_pairs_gq_with_each_other_method_at_its_bits():
    def with_plan(result: MethodResult, plan: QuantPlan) -> MethodResult:
        result.plan = plan
        return result

    results = [
        with_plan(fake_result("m", "gq", 4, ["a b c d", "e f g h"], 900), QuantPlan.uniform(4)),  # WER 0
        with_plan(fake_result("m", "gq", 3, ["a b c d", "e f g h"], 800), MIXED),  # not uniform: no pairs
        with_plan(fake_result("m", "s8bqat", 4, ["a b c x", "e f g h"], 900), QuantPlan.uniform(4)),  # WER 12.5
        with_plan(fake_result("m", "s8bqat", 2, ["a b c x", "e f g h"], 500), QuantPlan.uniform(2)),  # no GQ at 2
        with_plan(fake_result("n", "s8bqat", 4, ["a b c x", "e f g h"], 900), QuantPlan.uniform(4)),  # other model
        with_plan(fake_result("m", "uniform_per_channel", 4, ["x b c x", "e f g h"], 950), QuantPlan.uniform(4)),
    ]
    table = same_bits_table(results[:2], results[2:])
    assert list(table.columns) == list(SAME_BITS_COLUMNS)
    assert list(zip(table.method, table.bits)) == [("s8bqat", 4), ("uniform_per_channel", 4)]
    assert table.wer_gq.tolist() == [0.0, 0.0] and table.wer_method.tolist() == [12.5, 25.0]
    assert (table.diff_lo <= table.diff_hi).all() and (table.diff_hi <= 0).all()


def test_control_table_pairs_each_run_with_its_models_fp32_control():
    controls = {"m": fake_result("m", "fp32_control", 32, ["a b c x", "e f g h"], 4000),  # WER 12.5
                "n": fake_result("n", "fp32_control", 32, ["a b c d", "e f g h"], 4000)}  # WER 0
    results = [fake_result("m", "native", 4, ["a b c d", "e f g h"], 500),  # better than its control
               fake_result("n", "native", 4, ["x b c x", "e f g h"], 500)]  # worse than its control
    results[0].plan = QuantPlan.uniform(4)
    table = control_table(results, controls)
    assert list(table.columns) == list(CONTROL_COLUMNS)
    assert table.wer_control.tolist() == [12.5, 0.0] and table.plan.tolist() == ["4b", ""]
    assert table.diff_hi[0] <= 0 <= table.diff_lo[1]
    with pytest.raises(ValueError, match="not an fp32_control run"):
        control_table(results, {"m": results[0], "n": results[1]})


def test_control_group_table_breaks_each_comparison_down_by_group():
    refs, groups = ["a b c d", "e f g h"], {"engine": ["espeak", "flite"]}
    control = fake_result("m", "fp32_control", 32, refs, 4000)
    control.test = score(refs, refs, utt_ids=["u1", "u2"], groups=groups)
    run = fake_result("m", "gq", 5, refs, 500)
    run.test = score(refs, ["a b c d", "x f g h"], utt_ids=["u1", "u2"], groups=groups)
    run.plan, run.variant = QuantPlan.uniform(5), "hard_start"
    table = control_group_table([run], {"m": control}, "engine")
    assert list(table.columns) == list(CONTROL_GROUP_COLUMNS)
    assert table.group.tolist() == ["all", "espeak", "flite"] and set(table.variant) == {"hard_start"}
    assert table.wer_test.tolist() == [12.5, 0.0, 25.0] and table.wer_control.tolist() == [0.0, 0.0, 0.0]
    assert table.plan.tolist() == ["5b"] * 3 and table.utterances.tolist() == [2, 1, 1]
    assert control_group_table([run], {"m": control}, None).group.tolist() == ["all"]
    with pytest.raises(ValueError, match="not an fp32_control run"):
        control_group_table([run], {"m": run}, "engine")


# --- levels (notebook 02) ----------------------------------------------------------------------------------------


def test_tensor_centroids_compare_the_three_level_sets_on_the_int8_grid():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    rows = pd.DataFrame(tensor_centroids(w))
    assert len(rows) == 8 * len(CENTROID_METHODS)
    absent = rows.mse.isna()
    assert list(rows[absent].method) == ["uniform"] and list(rows[absent].bits) == [1]
    for method, group in rows[~absent].groupby("method"):
        assert group.mse.is_monotonic_decreasing, method  # more bits, less error
        assert (group.levels <= 2.0**group.bits).all()
    assert set(rows[rows.method == "mu_law"].mu) <= set(MU_CHOICES)
    power = float((w.double() ** 2).mean())
    assert rows[~absent].apply(lambda r: math.isclose(r.sqnr_db, 10 * math.log10(power / r.mse)), axis=1).all()
    by = rows.set_index(["method", "bits"]).mse
    assert all(by["lloyd_max", b] < by["uniform", b] for b in (2, 3, 4)), "Lloyd-Max should win on a Gaussian"
    lut, scale = int8_grid_levels(w, 4, "lloyd_max")
    assert lut.dtype == torch.int8 and lut.numel() == 16 and scale.dim() == 0
    with pytest.raises(ValueError):
        int8_grid_levels(w, 1, "uniform")  # the symmetric uniform grid needs 2 bits
    with pytest.raises(ValueError, match="needs mu"):
        int8_grid_levels(w, 4, "mu_law")


def test_centroid_table_covers_every_quantizable_tensor_and_summarises_them():
    model = tiny_model()
    table = centroid_table({"tiny": model}, bits=[1, 2, 3])
    n = len(quantizable_parameters(model))
    assert list(table.columns[:6]) == list(CENTROID_COLUMNS) and len(table) == n * 3 * len(CENTROID_METHODS)
    summary = centroid_summary(table)
    assert len(summary) == 3 * len(CENTROID_METHODS) and (summary.tensors == n).all()
    one_bit_uniform = summary[(summary.method == "uniform") & (summary.bits == 1)].iloc[0]
    assert math.isnan(one_bit_uniform.sqnr_db_pooled) and math.isnan(one_bit_uniform.best_share)
    shares = summary[summary.bits > 1].groupby("bits").best_share.sum()
    assert (shares >= 1 - 1e-9).all()  # every tensor has a best method (ties may count twice)


# --- native integer QAT (notebook 05) ------------------------------------------------------------------------------


def weight_bits_by_hand(model: torch.nn.Module, bits_of) -> float:
    """Size-weighted mean of ``bits_of(module name)`` over every weight matrix native QAT quantizes (Linear, Conv,
    Embedding weights and LSTM weight_ih/weight_hh), the CTC head excluded: plan_bits computed without sub8."""
    total = weighted = 0
    for name, module in model.named_modules():
        if name.startswith("ctc_head") or not isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d,
                                                                  torch.nn.LSTM, torch.nn.Embedding)):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if pname == "weight" or pname.startswith(("weight_ih", "weight_hh")):
                total += p.numel()
                weighted += p.numel() * bits_of(name)
    return weighted / total


def test_native_method_takes_native_plans_only():
    hooks = make_hooks("native", native_plan("w4a8"), momentum=0.9)
    assert isinstance(hooks, NativeQAT) and hooks.plan == native_plan("w4a8") and hooks.momentum == 0.9
    assert "native" in qat.registered_methods()
    with pytest.raises(ValueError, match="give it a NativePlan"):
        make_hooks("native", QuantPlan.uniform(4))
    with pytest.raises(ValueError, match="give it a QuantPlan"):
        make_hooks("s8bqat", native_plan("w4a8"))


def test_native_plan_labels_use_the_named_plans():
    assert [plan_label(native_plan(n)) for n in ("w8a8", "w4a8", "w4a4", "mixed")] == ["w8a8", "w4a8", "w4a4", "mixed"]
    assert plan_label(native_plan("w4a8", "lstm")) == "w4a8"
    assert plan_label(native_plan("w4a4", attention_products=False)) == "w4a4_attnfloat"
    assert plan_label(NativePlan([("*", 8, 8), ("joiner", 4, 4)])) == "allw8a8_joinerw4a4"
    assert plan_label(NativePlan([("*", 8, 8), ("*.scores", None, None)])) == "allw8a8_x.scoresfp"
    assert run_name("conformer_large", "native", native_plan("mixed")) == "conformer_large-native-mixed"
    with pytest.raises(TypeError, match="QuantPlan or a NativePlan"):
        plan_label([("*", 4)])


def test_native_plan_bits_are_the_mean_weight_and_activation_bits():
    model = tiny_model(encoder="conformer")
    assert plan_bits(model, native_plan("w4a8")) == 4 and activation_bits(model, native_plan("w4a8")) == 8
    assert plan_bits(model, native_plan("w8a8")) == 8 and activation_bits(model, native_plan("w4a4")) == 4
    mixed = native_plan("mixed")
    four_bit_blocks = ("self_attn", "ffn1", "ffn2")

    def mixed_bits(name: str) -> int:
        parts = name.split(".")
        return 4 if name.startswith("transcriber.layers.") and parts[3] in four_bit_blocks else 8

    expected = weight_bits_by_hand(model, mixed_bits)
    assert 4 < expected < 8 and plan_bits(model, mixed) == pytest.approx(expected)
    assert activation_bits(model, mixed) == 8  # every block of the mixed plan reads 8-bit activations
    # activation bits: one vote per activation site (a per-tensor range), not weighted by size
    joiner4 = NativePlan([("*", 8, 8), ("joiner", 4, 4)])
    sites = activation_sites(model, joiner4)
    low = sum(site.startswith("joiner.") for site in sites)
    assert 0 < low < len(sites)
    assert activation_bits(model, joiner4) == pytest.approx((4 * low + 8 * (len(sites) - low)) / len(sites))


@pytest.fixture
def spy_evaluation(monkeypatch):
    """Watches the test decoding of finetune_row: the model it decodes, and the integer matmuls run meanwhile."""
    seen = {"int_linear": 0, "evaluating": False, "models": []}
    real_int_linear, real_evaluate = native_module.int_linear, qat.evaluate_model

    def counting_int_linear(*args, **kwargs):
        seen["int_linear"] += seen["evaluating"]
        return real_int_linear(*args, **kwargs)

    def spying_evaluate(data, name, model, split="test"):
        quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer)]
        linears = sum(isinstance(m, NativeLinear) for m in model.modules())
        seen["models"].append({"name": name, "native_linears": linears, "quantizers": len(quantizers),
                               "frozen": all(q.frozen for q in quantizers),
                               "ranges": {q.site: (float(q.running_min), float(q.running_max)) for q in quantizers}})
        seen["evaluating"] = True
        try:
            return real_evaluate(data, name, model, split)
        finally:
            seen["evaluating"] = False

    monkeypatch.setattr(native_module, "int_linear", counting_int_linear)
    monkeypatch.setattr(qat, "evaluate_model", spying_evaluate)
    return seen


def test_native_row_decodes_test_with_activations_quantized(data, spy_evaluation):
    plan = native_plan("mixed")
    result = finetune_row(data, "conf", "native", plan)
    row = result.row
    assert result.name == "conf-native-mixed" and list(row) == list(ROW_COLUMNS)
    assert (row["model"], row["method"], row["finetune_steps"]) == ("conf", "native", FINETUNE_STEPS)
    assert row["finetune_minutes"] > 0 and row["wer_delta_lo"] <= row["wer_delta_hi"]
    model = load_model(data.profile, result.name)
    assert row["bits"] == pytest.approx(plan_bits(model, plan)) and 4 < row["bits"] < 8
    # the size is what the native device stores: no LUT, per-channel and per-site scales (not the LUT form)
    sizes = native_size(model, plan)
    assert row["size_bytes_packed"] == sizes["total"] < sizes["fp32"]
    exported = NativeQAT(plan).quantizers(model)
    assert row["size_bytes_packed"] != quantized_size_bytes(qat.export_quantized(model, exported), model)
    # the test split was decoded by the native modules (integer matmuls of quantized activations), frozen at the
    # run's ranges
    (seen,) = [m for m in spy_evaluation["models"] if m["name"] == result.name]  # (the other: the fp32 baseline)
    state = hooks_state(data.profile, result.name)
    assert seen["native_linears"] > 0 and seen["frozen"]
    assert seen["quantizers"] == len(state["activations"]["sites"])
    assert seen["ranges"] == {site: (float(lo), float(hi)) for site, lo, hi in zip(
        state["activations"]["sites"], state["activations"]["running_min"], state["activations"]["running_max"])}
    assert spy_evaluation["int_linear"] > 0
    # and those hypotheses are what the saved model with the saved ranges decodes (not the float-activation model)
    cached = pd.read_csv(model_dir(data.profile, result.name) / "eval_test.csv", keep_default_na=False, dtype=str)
    with NativeQAT.from_state_dict(state).evaluating(model) as deployed:
        again = decode(deployed, data.features["test"], data.cmvn, data.tokenizer, data.profile.eval_batch_frames)
    assert list(cached.hyp) == again and len(result.test.per_utterance) == len(data.features["test"])
    # 4-bit blocks hold at most 15 values per output channel, 8-bit ones at most 255
    for name in exported:
        weight = model.get_parameter(name).detach().flatten(1)
        levels = 15 if ".self_attn." in name or ".ffn" in name else 255
        assert max(w.unique().numel() for w in weight) <= levels, name


def test_a_finished_native_run_is_reused_with_its_saved_ranges(data, spy_evaluation):
    plan = native_plan("w4a8", "lstm")
    first = finetune_row(data, "base", "native", plan)
    (model_dir(data.profile, first.name) / "eval_test.csv").unlink()  # decode again, from the checkpoint's ranges
    again = finetune_row(data, "base", "native", plan)
    assert again.name == "base-native-w4a8" and again.row == first.row
    fresh, reused = [m for m in spy_evaluation["models"] if m["name"] == first.name]
    assert reused["ranges"] == fresh["ranges"] and reused["frozen"] and reused["quantizers"] > 0
    assert first.row["bits"] == 4 and first.row["size_bytes_packed"] == native_size(
        load_model(data.profile, first.name), plan)["total"]


def test_native_table_and_claims(data):
    results = [finetune_row(data, "conf", "native", native_plan(name)) for name in ("w4a8", "mixed")]
    table = native_table(data.profile, results)
    assert list(table.columns) == list(NATIVE_COLUMNS) and list(table.plan) == ["w4a8", "mixed"]
    assert list(table.w_bits) == [r.row["bits"] for r in results] and list(table.a_bits) == [8, 8]
    fp32_bytes = native_size(load_model(data.profile, "conf"), native_plan("w4a8"))["fp32"]
    assert table.size_ratio_vs_fp32.tolist() == pytest.approx((fp32_bytes / table.size_bytes).tolist())
    with pytest.raises(ValueError, match="not a 'native' one"):
        native_table(data.profile, [finetune_row(data, "base", "fp32_control")])

    fake = pd.DataFrame([
        {"model": "c", "plan": "w4a8", "wer_test": 10.2, "wer_delta_lo": -0.1, "size_ratio_vs_fp32": 7.5},
        {"model": "c", "plan": "mixed", "wer_test": 10.0, "wer_delta_lo": 0.1, "size_ratio_vs_fp32": 4.9},
        {"model": "d", "plan": "w4a8", "wer_test": 10.4, "wer_delta_lo": 0.2, "size_ratio_vs_fp32": 6.9},
        {"model": "r", "plan": "w4a8", "wer_test": 50.0, "wer_delta_lo": 9.0, "size_ratio_vs_fp32": 7.9},
    ])
    claims = native_claims(fake, {"c": 10.0, "d": 10.0, "r": 10.0}, conformers=["c", "d"])
    assert list(claims.columns) == list(CLAIM_COLUMNS) and set(claims.model) == {"c", "d"}  # the RNN-T has no target
    holds = claims.set_index(["model", "plan", "claim"]).holds
    assert holds["c", "w4a8", "not significantly worse than fp32"]
    assert holds["c", "w4a8", "WER within 3% relative of fp32"]  # +2%
    assert holds["c", "w4a8", "size reduction vs fp32"] and not holds["c", "mixed", "size reduction vs fp32"]
    assert not holds["d", "w4a8", "not significantly worse than fp32"]
    assert not holds["d", "w4a8", "WER within 3% relative of fp32"]  # +4%
    assert not holds["d", "w4a8", "size reduction vs fp32"]
    assert claims.set_index(["model", "plan", "claim"]).measured["d", "w4a8", "WER within 3% relative of fp32"] == \
        pytest.approx(4.0)
