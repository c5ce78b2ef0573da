"""sub8.qat: the method registry, fine-tune and PTQ rows (packed size from the bits, levels, run bookkeeping), the
headline and recovery tables, and the level comparison of notebook 02."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from test_evaluate import TEXTS, make_feature_set
from test_quant_apply import tiny_model

from sub8 import profiles, qat
from sub8.data.features import Cmvn
from sub8.data.prepare import PreparedData
from sub8.data.tokenizer import build_tokenizer
from sub8.evaluate import score
from sub8.experiment import hooks_state, load_model, model_dir
from sub8.io import atomic_torch_save
from sub8.qat import (
    CENTROID_COLUMNS,
    CENTROID_METHODS,
    MU_CHOICES,
    ROW_COLUMNS,
    MethodResult,
    centroid_summary,
    centroid_table,
    finetune_row,
    headline_table,
    int8_grid_levels,
    make_hooks,
    plan_label,
    ptq_model,
    ptq_row,
    recovery_table,
    register_method,
    run_name,
    s8bqat_options,
    tensor_centroids,
)
from sub8.quant import S8BQAT, QuantPlan, UniformQAT, int8_levels, quantizable_parameters

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
    model = tiny_model(input_dim=80, vocab_size=tokenizer.vocab_size)
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config.to_dict()},
                      model_dir(profile, "base") / "final.pt")
    return PreparedData(profile, {}, tokenizer, {s: fs for s in ("train", "dev", "test")}, Cmvn.from_features(fs))


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
