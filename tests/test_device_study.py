"""Notebook 06's device study (sub8.device_study): rows with issue 7's columns and the workload's footprint, runs
found and rebuilt from disk, the comparisons' percentages on constructed numbers, the sweep, and the ONNX Runtime
check. Tiny models, no data set: the integer WER itself is tested in tests/test_emulator_program.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sub8 import device_study as ds
from sub8 import profiles
from sub8.emulator import device as dev
from sub8.evaluate import score
from sub8.io import atomic_torch_save
from sub8.models import TransducerConfig, build_model
from sub8.qat import make_hooks
from sub8.quant import QuantPlan, UniformQuantizer, export_quantized, hard_quantize_, plan_quantizers

TINY = dict(vocab_size=6, input_dim=8, lstm_layers=2, lstm_hidden=8, conformer_dim=8, conformer_layers=1,
            conformer_heads=2, conformer_ffn_dim=16, conformer_conv_kernel=3, conformer_chunk_frames=2,
            conformer_subsampling_channels=2, pred_embed_dim=4, pred_hidden=8, joiner_dim=8, dropout=0.0)
REFS = ["one two", "three", "four five six"]


def tiny_model(encoder: str):
    torch.manual_seed(0)
    return build_model(TransducerConfig(encoder=encoder, **TINY)).eval()


def quantized(model, bits: int):
    """Hard-quantized per channel at ``bits`` (in place) and the export: what a uniform QAT run leaves."""
    quantizers = plan_quantizers(model, QuantPlan.uniform(bits), lambda b: UniformQuantizer(b))
    hard_quantize_(model, quantizers)
    return export_quantized(model, quantizers)


def make_run(encoder: str = "lstm", method: str = "uniform_per_channel", bits: int | None = 8,
             hyps: list[str] | None = None, int_hyps: list[str] | None = None) -> ds.DeviceRun:
    model = tiny_model(encoder)
    exported = quantized(model, bits) if bits is not None else {}
    base = f"{encoder}_tiny"
    spec = ds.RunSpec(base, "fp32") if bits is None else ds.RunSpec(base, method, f"{bits}b")
    hyps = hyps if hyps is not None else ["one", "three", "four five six"]
    utterances = ds.streaming_utterances([1.2, 0.5, 2.3], [len(h.split()) for h in hyps])
    return ds.DeviceRun(spec, model, exported, None, 32 if bits is None else bits,
                        dev.workload(model, exported or None), utterances, score(REFS, hyps),
                        score(REFS, int_hyps) if int_hyps is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------


def test_a_row_has_issue_7s_columns_and_the_workloads_footprint():
    run = make_run(int_hyps=["one two", "three", "four"])
    config = dev.PRESETS["edge_small"]
    row = ds.device_row(run, config)
    assert list(row) == [*ds.DEVICE_COLUMNS, *ds.EXTRA_COLUMNS]
    assert list(ds.DEVICE_COLUMNS) == ["model", "method", "plan", "mean_bits", "preset", "footprint_bytes",
                                       "weight_bytes", "latency_ms_per_frame", "upl_ms_p50", "upl_ms_p90", "rtf",
                                       "wer_int"]
    footprint = dev.workload(run.model, run.exported).footprint()
    assert row["footprint_bytes"] == footprint.total_bytes and row["weight_bytes"] == footprint.weight_bytes
    assert (row["model"], row["method"], row["plan"], row["mean_bits"]) == ("lstm_tiny", "uniform", "8b", 8)
    assert row["run"] == "lstm_tiny-uniform_per_channel-8b" and row["run_method"] == "uniform_per_channel"
    assert row["preset"] == "edge_small" and row["note"] == ""
    summary = dev.simulate(run.work, config, run.utterances).summary()
    for key in ("latency_ms_per_frame", "upl_ms_p50", "upl_ms_p90", "rtf"):
        assert row[key] == summary[key]
    assert row["wer_int"] == pytest.approx(100 * 2 / 6) and row["wer_fq"] == pytest.approx(100 * 1 / 6)


def test_fp32_and_undecoded_rows_have_no_integer_wer_and_say_why():
    conformer = ds.device_row(make_run("conformer", "native", 4, int_hyps=REFS),
                              dev.PRESETS["phone"])  # the Conformer has an integer program too
    assert conformer["wer_int"] == pytest.approx(0) and conformer["note"] == ""
    assert conformer["method"] == "native" and conformer["wer_fq"] == pytest.approx(100 / 6)
    fp32 = ds.device_row(make_run(bits=None), dev.PRESETS["phone"])
    assert math.isnan(fp32["wer_int"]) and fp32["note"] == ds.NOTE_FP32
    not_decoded = ds.device_row(make_run(bits=4), dev.PRESETS["phone"])  # an RNN-T run without an integer result
    assert math.isnan(not_decoded["wer_int"]) and not_decoded["note"] == ds.NOTE_NOT_DECODED
    assert (fp32["method"], fp32["plan"], fp32["mean_bits"], fp32["run"]) == ("fp32", "fp32", 32, "lstm_tiny")
    model = tiny_model("lstm")
    weights = [n for n, _ in QuantPlan.uniform(8).resolve(model) if not n.startswith("ctc_head")]
    assert fp32["weight_bytes"] == 4 * sum(model.get_parameter(n).numel() for n in weights)


def test_fewer_bits_fewer_bytes_and_every_preset_in_the_table():
    runs = [make_run(bits=None), make_run(bits=8), make_run(method="s8bqat", bits=4)]
    table = ds.device_table(runs, list(dev.PRESETS.values()))
    assert len(table) == 3 * len(dev.PRESETS) and list(table.preset.unique()) == list(dev.PRESETS)
    for _, rows in table.groupby("preset"):
        assert rows.footprint_bytes.is_monotonic_decreasing and rows.footprint_bytes.is_unique
        assert list(rows.method) == ["fp32", "uniform", "s8bqat"]


def test_footprint_table_parts_add_up():
    runs = [make_run(bits=None), make_run("conformer", "native", 4)]
    table = ds.footprint_table(runs)
    assert list(table.columns) == list(ds.FOOTPRINT_COLUMNS)
    parts = table[["code_bytes", "table_bytes", "scale_bytes", "float_weight_bytes", "param_bytes", "state_bytes",
                   "kv_cache_bytes", "activation_bytes"]].sum(axis=1)
    assert (parts == table.total_bytes).all()
    assert table.packing_ratio.iloc[0] == 1.0 and (table.packing_ratio >= 1).all()


def test_integer_wer_table_compares_hypotheses():
    runs = [make_run(int_hyps=["one", "three", "four five"]), make_run(bits=None),
            make_run("conformer", "native", 4)]
    table = ds.integer_wer_table(runs)
    assert len(table) == 1  # only the run with an integer result
    row = table.iloc[0]
    assert row.wer_fq == pytest.approx(100 / 6) and row.wer_int == pytest.approx(200 / 6)
    assert row["diff"] == pytest.approx(100 / 6) and row.same_hyp_pct == pytest.approx(200 / 3)
    assert not row.within_tolerance


# ---------------------------------------------------------------------------------------------------------------
# Comparisons on constructed numbers
# ---------------------------------------------------------------------------------------------------------------


def constructed(preset: str = "edge_small", gq: bool = True) -> pd.DataFrame:
    """device.csv-like rows: each small/large model at 8-bit uniform QAT, S8BQAT 5/4 bits and (``gq``) GQ 5 bits."""
    rows = []

    def add(model, run_method, plan, bits, footprint, weights, latency, p50, p90, wer):
        rows.append(dict(model=model, method=ds.DEVICE_METHODS[run_method], plan=plan, mean_bits=bits, preset=preset,
                         footprint_bytes=footprint, weight_bytes=weights, latency_ms_per_frame=latency,
                         upl_ms_p50=p50, upl_ms_p90=p90, rtf=latency / 40, wer_int=math.nan,
                         run=f"{model}-{run_method}-{plan}", run_method=run_method, wer_fq=wer, note=""))

    add("m_small", "uniform_per_channel", "8b", 8, 1000, 800, 2.0, 10.0, 20.0, 10.0)
    add("m_small", "s8bqat", "5b", 5, 700, 500, 1.5, 8.0, 15.0, 10.5)
    add("m_small", "s8bqat", "8b", 8, 1000, 800, 2.0, 10.0, 20.0, 10.0)  # not below 8 bits: no S8BQAT pair row
    add("m_large", "uniform_per_channel", "8b", 8, 2000, 1800, 4.0, 20.0, 30.0, 8.0)
    add("m_large", "s8bqat", "5b", 5, 1250, 1125, 2.5, 12.0, 18.0, 8.0)
    add("m_large", "s8bqat", "4b", 4, 1000, 900, 3.0, 14.0, 24.0, 9.0)
    if gq:
        add("m_small", "gq", "5b", 5, 693, 480, 1.4, 6.825, 10.0, 9.0)
        add("m_large", "gq", "5b", 5, 1400, 1100, 3.0, 16.0, 21.0, 8.0)
        add("m_large", "gq", "all4_joiner8", 4.5, 1100, 900, 3.0, 15.0, 20.0, 8.0)
    return pd.DataFrame(rows)


def test_reduction_pct():
    assert ds.reduction_pct(60, 100) == pytest.approx(40)
    assert ds.reduction_pct(150, 100) == pytest.approx(-50)
    assert math.isnan(ds.reduction_pct(1, 0)) and math.isnan(ds.reduction_pct(math.nan, 1))


def test_gq_comparison_percentages_and_targets():
    table = ds.gq_comparison(constructed())
    assert list(table.columns) == list(ds.GQ_COMPARISON_COLUMNS)
    assert list(table.model) == ["m_small", "m_large"]  # only the 5-bit plan, not the mixed one
    assert (table.comparison == "gq 5b vs uniform_per_channel 8b").all()
    small, large = table.iloc[0], table.iloc[1]
    assert small.memory_reduction_pct == pytest.approx(30.7)  # 1 − 693/1000
    assert small.weight_reduction_pct == pytest.approx(40.0)
    assert small.upl_p50_reduction_pct == pytest.approx(31.75) and small.upl_p90_reduction_pct == pytest.approx(50)
    assert small.latency_reduction_pct == pytest.approx(30.0) and small.wer_rel_pct == pytest.approx(-10.0)
    assert not small.meets_memory_target and small.meets_upl_target  # 30.70 < 30.73; 31.75 ≥ 31.75
    assert large.memory_reduction_pct == pytest.approx(30.0) and large.upl_p50_reduction_pct == pytest.approx(20.0)
    assert small.reference_run == "m_small-uniform_per_channel-8b" and large.run == "m_large-gq-5b"


def test_without_gq_the_comparison_is_made_for_s8bqat_and_labelled():
    table = ds.gq_comparison(constructed(gq=False))
    assert table.comparison.str.contains("s8bqat 5b").all() and table.comparison.str.contains("stand-in").all()
    assert list(table.run) == ["m_small-s8bqat-5b", "m_large-s8bqat-5b"]
    assert table.memory_reduction_pct.tolist() == pytest.approx([30.0, 37.5])
    assert table.upl_p50_reduction_pct.tolist() == pytest.approx([20.0, 40.0])


def test_reduction_table_every_plan_and_missing_reference():
    table = constructed()
    every = ds.reduction_table(table, "gq")
    assert list(every.run) == ["m_small-gq-5b", "m_large-gq-5b", "m_large-gq-all4_joiner8"]
    assert every.memory_reduction_pct.iloc[2] == pytest.approx(45.0)
    no_reference = table[table.run != "m_large-uniform_per_channel-8b"]
    assert list(ds.reduction_table(no_reference, "gq", ["5b"]).model) == ["m_small"]
    with pytest.raises(ValueError, match="one preset"):
        ds.reduction_table(pd.concat([table, constructed("phone")]), "gq")


def test_mixed_plan_table_marks_the_best_plan_within_the_wer_bound():
    table = constructed()
    extra = table[table.run == "m_large-gq-all4_joiner8"].assign(
        plan="auto-3b", run="m_large-gq-auto-3b", footprint_bytes=900, wer_fq=8.1)  # 55% smaller, +1.25%
    worse = extra.assign(plan="mixed-x", run="m_large-gq-mixed-x", footprint_bytes=600, wer_fq=9.0)  # +12.5%
    mixed = ds.mixed_plan_table(pd.concat([table, extra, worse], ignore_index=True))
    assert list(mixed.columns) == list(ds.MIXED_COLUMNS)
    assert sorted(mixed.run) == ["m_large-gq-all4_joiner8", "m_large-gq-auto-3b", "m_large-gq-mixed-x"]  # no 5b
    rows = mixed.set_index("run")
    assert rows.within_wer_target.to_dict() == {"m_large-gq-all4_joiner8": True, "m_large-gq-auto-3b": True,
                                                "m_large-gq-mixed-x": False}
    assert rows.meets_memory_target.all()  # 45%, 55%, 70% ≥ 40%
    assert rows.best[rows.best].index.tolist() == ["m_large-gq-auto-3b"]  # the smallest within +2%


def test_s8bqat_comparison_ratios():
    table = ds.s8bqat_comparison(constructed(), [("m_small", "m_large")])
    assert list(table.columns) == list(ds.S8BQAT_COMPARISON_COLUMNS)
    assert list(table.large_run) == ["m_large-s8bqat-5b", "m_large-s8bqat-4b"]
    five = table.iloc[0]
    assert five.small_run == "m_small-uniform_per_channel-8b" and five.large_bits == 5
    assert five.footprint_ratio == pytest.approx(1.25) and five.latency_ratio == pytest.approx(1.25)
    assert five.upl_p50_ratio == pytest.approx(1.2) and five.upl_p90_ratio == pytest.approx(0.9)
    assert table.iloc[1].footprint_ratio == pytest.approx(1.0) and table.iloc[1].upl_p50_ratio == pytest.approx(1.4)
    assert ds.s8bqat_comparison(constructed(), [("m_small", "absent")]).empty


def test_sweep_comparisons_at_every_grid_point():
    points = []
    for sram, factor in ((1000, 1.0), (1000, 2.0), (4000, 1.0)):
        t = constructed()
        t[["upl_ms_p50", "upl_ms_p90", "latency_ms_per_frame"]] /= factor
        points.append(t.assign(sram_bytes=sram, dram_bytes_per_s=2e9 * factor))
    gq, s8 = ds.sweep_comparisons(pd.concat(points, ignore_index=True), "5b", [("m_small", "m_large")])
    assert list(gq.columns[:2]) == ["sram_bytes", "dram_bytes_per_s"] and len(gq) == 3 * 2
    assert list(s8.columns[:2]) == ["sram_bytes", "dram_bytes_per_s"] and len(s8) == 3 * 2
    assert gq.upl_p50_reduction_pct.round(6).tolist() == [31.75, 20.0] * 3  # reductions are scale-free
    empty_gq, empty_s8 = ds.sweep_comparisons(pd.concat(points).assign(run_method="native"), "5b", [])
    assert empty_gq.empty and empty_s8.empty and list(empty_s8.columns[:2]) == ["sram_bytes", "dram_bytes_per_s"]


def test_sweep_table_and_grid():
    runs = [make_run(bits=8), make_run(method="s8bqat", bits=4)]
    base = dev.PRESETS["edge_small"]
    sram, bandwidth = ds.sweep_grid(runs, base, sram_points=5, bandwidth_factors=(0.5, 1.0))
    assert sram[0] == min(r.work.reserved_bytes for r in runs) and base.sram_bytes in sram
    assert sram == sorted(sram) and bandwidth == [base.dram_bytes_per_s / 2, base.dram_bytes_per_s]
    table = ds.sweep_table(runs, base, sram, bandwidth)
    assert len(table) == 2 * len(sram) * 2
    assert set(ds.DEVICE_COLUMNS) <= set(table.columns) and table.feasible.any()
    fits = table[table.feasible.astype(bool)]
    assert fits.upl_ms_p50.notna().all() and table[~table.feasible.astype(bool)].upl_ms_p50.isna().all()
    # more SRAM never slower (device.py's residency guarantee), at each bandwidth
    for _, rows in fits.groupby(["run", "dram_bytes_per_s"]):
        assert rows.sort_values("sram_bytes").upl_ms_p50.is_monotonic_decreasing


# ---------------------------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A profile whose runs live under tmp_path."""
    monkeypatch.setattr(profiles, "project_root", lambda: tmp_path)
    return profiles.Profile(name="unit", corpus=None)


def write_run(profile, name: str, model, hooks=None, spec: dict | None = None) -> None:
    run_dir = profile.runs_dir / "models" / name
    run_dir.mkdir(parents=True)
    atomic_torch_save({"model": model.state_dict(), "model_config": model.config.to_dict(),
                       "hooks": hooks.state_dict() if hooks is not None else {}}, run_dir / "final.pt")
    if spec is not None:
        (run_dir / "qat.json").write_text(json.dumps(spec))


def test_run_spec_names_and_parsing():
    assert ds.RunSpec.parse("rnnt_small", "fp32").name == "rnnt_small"
    spec = ds.RunSpec.parse("rnnt_large", "s8bqat-4b")
    assert (spec.method, spec.plan, spec.name) == ("s8bqat", "4b", "rnnt_large-s8bqat-4b")
    assert ds.RunSpec.parse("m", "gq-all4_joiner8").plan == "all4_joiner8"
    for bad in ("s8bqat", "s8bqat-", "ptq-4b"):
        with pytest.raises(ValueError):
            ds.RunSpec.parse("m", bad)
    with pytest.raises(ValueError, match="no plan"):
        ds.RunSpec("m", "fp32", "8b")


def test_select_runs_expands_skips_optional_and_names_missing(profile):
    model = tiny_model("lstm")
    write_run(profile, "m", model)
    for label in ("5b", "all4_joiner8"):
        write_run(profile, f"m-gq-{label}", model, spec={})
    (profile.runs_dir / "models" / "m-gq-3b").mkdir()  # unfinished: no final.pt
    specs = [ds.RunSpec("m", "fp32"), ds.RunSpec("m", "gq", "*"), ds.RunSpec("m", "gq", "6b")]
    chosen, skipped = ds.select_runs(profile, specs)
    assert [s.name for s in chosen] == ["m", "m-gq-5b", "m-gq-all4_joiner8"]
    assert [s.name for s in skipped] == ["m-gq-6b"]
    with pytest.raises(FileNotFoundError, match="m-s8bqat-4b"):
        ds.select_runs(profile, [ds.RunSpec("m", "s8bqat", "4b")])


def test_a_star_plan_leaves_out_the_variants_of_a_run(profile):
    """A variant (sub8.qat.run_name's ``-<variant>``: same plan, other options) is an ablation of its run's training,
    not another plan for the device; a label that only looks like one (another plan) stays."""
    model = tiny_model("lstm")
    spec = {"base": "m", "method": "gq", "plan": [["*", 5]], "options": {"anneal_steps": 100}}
    write_run(profile, "m-gq-5b", model, spec=spec)
    write_run(profile, "m-gq-5b-hard_start", model, spec={**spec, "options": {"anneal_steps": 0}})
    write_run(profile, "m-gq-5b-joiner2", model, spec={**spec, "plan": [["*", 5], ["joiner", 2]]})
    chosen, _ = ds.select_runs(profile, [ds.RunSpec("m", "gq", "*")])
    assert [s.name for s in chosen] == ["m-gq-5b", "m-gq-5b-joiner2"]


def test_load_run_rebuilds_the_export_the_run_evaluated(profile):
    model = tiny_model("lstm")
    exported = quantized(model, 8)
    hooks = make_hooks("uniform_per_channel", QuantPlan.uniform(8))
    write_run(profile, "m", tiny_model("lstm"))
    write_run(profile, "m-uniform_per_channel-8b", model, hooks,
              {"base": "m", "method": "uniform_per_channel", "plan": [["*", 8]], "options": {}})
    loaded, got, loaded_hooks, plan = ds.load_run(profile, ds.RunSpec("m", "uniform_per_channel", "8b"))
    assert plan.to_list() == [["*", 8]] and loaded_hooks is not None
    assert set(got) == set(exported)
    for name, q in exported.items():
        assert torch.equal(got[name].codes, q.codes) and torch.equal(got[name].lut, q.lut)
    assert dev.workload(loaded, got).footprint() == dev.workload(model, exported).footprint()
    fp32_model, fp32_export, fp32_hooks, fp32_plan = ds.load_run(profile, ds.RunSpec("m", "fp32"))
    assert fp32_export == {} and fp32_hooks is None and fp32_plan is None
    write_run(profile, "m-uniform_per_channel-4b", model, hooks,
              {"base": "other", "method": "uniform_per_channel", "plan": [["*", 4]], "options": {}})
    with pytest.raises(ValueError, match="qat.json"):
        ds.load_run(profile, ds.RunSpec("m", "uniform_per_channel", "4b"))


def test_streaming_utterances_need_one_count_per_duration():
    utterances = ds.streaming_utterances(np.array([0.5, 1.0]), [2, 0])
    assert [(u.duration_s, u.tokens) for u in utterances] == [(0.5, 2), (1.0, 0)]
    with pytest.raises(ValueError, match="durations"):
        ds.streaming_utterances([0.5], [1, 2])


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------


def test_ort_bit_exactness_cases_are_exact():
    table = ds.ort_bit_exactness(cases_per_op=2, seed=1)
    assert list(table.columns) == list(ds.ORT_COLUMNS) and len(table) == 6
    assert set(table.op) == {"MatMulInteger", "QLinearMatMul", "ConvInteger"}
    assert (table.max_abs_diff == 0).all()
    assert table[table.op == "QLinearMatMul"].saturated.iloc[1] > 0  # the non-tie cases saturate some outputs
