"""Notebook 06's study of the int8 accelerator: the quantized runs of notebooks 03–05 on the device emulator
(:mod:`sub8.emulator`): memory footprint, modelled latency, and the integer program's WER.

**Runs.** A run is (baseline, method, plan label) as :mod:`sub8.qat` names it: ``runs/<profile>/models/<base>-
<method>-<plan>`` (``rnnt_large-s8bqat-4b``, ``conformer_small-native-w4a8``, ``rnnt_small-gq-5b``), or the fp32
baseline itself (method ``fp32``, no plan: ``runs/<profile>/models/<base>``). A fine-tuned run is rebuilt from what it
recorded: its ``qat.json`` (method, plan, options) gives the hooks (:func:`sub8.qat.make_hooks`), whose final state
(:func:`sub8.experiment.hooks_state`) gives each weight's trained quantizer (:func:`sub8.qat.trained_quantizers`), so
the export is the one the run evaluated (:func:`sub8.qat.check_export` verifies it against the loaded weights). The
methods are :mod:`sub8.qat`'s registry (GQ included); one that a module of its own registers on import is looked up
by importing ``sub8.quant.<method>``. A plan label ``*`` stands for every run of that baseline and method found on
disk (how GQ's mixed plans, whose labels are not known in advance, are picked up).

**device.csv** (:data:`DEVICE_COLUMNS`, one row per run and preset):

- ``method``: the device table's name of the run's method (:data:`DEVICE_METHODS`): ``fp32``, ``uniform`` (the
  papers' 8-bit QAT baseline, :mod:`sub8.qat`'s ``uniform_per_channel``; its per-tensor ``uniform`` also maps here,
  the ``run`` column tells them apart), ``s8bqat``, ``gq``, ``native``.
- ``plan``: the run's plan label (``5b``, ``w4a8``, ...; ``fp32`` for the baseline).
- ``mean_bits``: :func:`sub8.qat.plan_bits`: bits per quantized weight, weighted by size for a mixed plan (weight bits
  for native plans); 32 for fp32.
- ``footprint_bytes``, ``weight_bytes``, ``latency_ms_per_frame``, ``upl_ms_p50``, ``upl_ms_p90``, ``rtf``:
  :meth:`sub8.emulator.device.StreamingResult.summary` of the run's workload (:func:`sub8.emulator.device.workload`
  of the fine-tuned model and its exported weights: packed codes + int8 LUT + float32 scales per tensor; fp32:
  every weight float32) streamed over the whole test split on the preset. Every weight a method exports goes
  through the LUT decompressor, native QAT's too (its LUT is the identity table of its uniform codes, ≤ 256 bytes
  a tensor), so all methods run on the same device.
- ``wer_int``: test WER (%) of the **integer program** (:func:`sub8.emulator.program.to_integer_program`: int8
  weights and activations, int32 accumulation, integer LSTM, attention, LayerNorm and SiLU/GLU tables, calibrated
  on the dev split; the Conformer's encoder in :mod:`sub8.emulator.conformer_program`), for the runs asked for (the
  integer decode is the expensive step). NaN for fp32 (no integer weights) and for runs not decoded; the ``note``
  column says which.
- Extra columns: ``run`` (the run directory), ``run_method`` (the registry's method name), ``wer_fq`` (the run's
  own test WER: hard-quantized weights as notebook 03/04/05 evaluated them — for native QAT with its quantized
  activations; fp32: the baseline's WER), ``note``.

**Streaming input.** Each test utterance lasts its feature frames × the 10 ms hop (the 15 ms window overhang is left
out, as :mod:`sub8.emulator.device` says) and emits as many tokens as the run's own cached hypothesis
(``eval_test.csv``) has, spread evenly over its encoder frames (the hypotheses carry no alignment). A model that
emits more pays more predictor and joiner calls, as on the device. The Conformer's K/V cache is sized for
:data:`MAX_AUDIO_S` or the longest test utterance, whichever is longer.

**Comparisons** (:func:`reduction_table`, :func:`gq_comparison`, :func:`s8bqat_comparison`): a reduction is
``100 · (1 − x / x_ref)`` (positive: smaller or faster than the reference), a ratio ``x / x_ref``. The reference of
both is the 8-bit per-channel uniform QAT run of a baseline (:data:`REFERENCE`).
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from sub8.data.prepare import PreparedData
from sub8.emulator import device as dev
from sub8.emulator import kernels as K
from sub8.emulator import program as prog
from sub8.emulator.reference import run_onnx_node
from sub8.evaluate import EvalResult, decode, score_feature_set
from sub8.experiment import evaluate_model, hooks_state, load_model, model_dir
from sub8.io import atomic_write_text
from sub8.parallel import run_side_by_side
from sub8.profiles import Profile
from sub8.qat import (
    FP32_BITS, check_export, checkpoint_digest, make_hooks, plan_bits, registered_methods, trained_quantizers,
    variant_of,
)
from sub8.quant import NativePlan, QuantPlan, export_quantized
from sub8.train import Hooks

DEVICE_COLUMNS = (
    "model", "method", "plan", "mean_bits", "preset", "footprint_bytes", "weight_bytes", "latency_ms_per_frame",
    "upl_ms_p50", "upl_ms_p90", "rtf", "wer_int",
)
EXTRA_COLUMNS = ("run", "run_method", "wer_fq", "note")
# The registry's method names → device.csv's (issue 7: fp32, uniform, s8bqat, gq, native).
DEVICE_METHODS = {"fp32": "fp32", "uniform_per_channel": "uniform", "uniform": "uniform", "s8bqat": "s8bqat",
                  "gq": "gq", "native": "native"}
FP32 = "fp32"
REFERENCE = ("uniform_per_channel", "8b")  # the papers' "8-bit QAT" baseline (design.md §5)
MAX_AUDIO_S = 20.0  # the K/V cache's size unless the test split has longer utterances
CALIBRATION_UTTERANCES = 32  # dev utterances that calibrate the integer program's activation scales
WER_INT_TOLERANCE = 0.5  # issue 7: |WER(integer) − WER(fake-quant)| ≤ 0.5 absolute
# The GQ seed's figures (issue 7): GQ at 5 bits vs 8-bit QAT on the default preset.
GQ_MEMORY_TARGET_PCT = 30.73
GQ_UPL_TARGET_PCT = 31.75
# Issue 7: the best plan mixing bit widths saves at least 40% memory against 8-bit QAT at at most 2% relative WER loss.
MIXED_MEMORY_TARGET_PCT = 40.0
MIXED_MAX_WER_REL_PCT = 2.0
NOTE_FP32 = "float32 weights: no integer program, wer_int NaN"
NOTE_NOT_DECODED = "integer program not decoded for this run (not among the runs asked for): wer_int NaN"
INT_CACHE = "eval_int_test"  # <run>/eval_int_test.csv (+ .json): the integer program's test hypotheses


# ---------------------------------------------------------------------------------------------------------------
# Which runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """A run: baseline ``model``, registry ``method`` (``fp32`` for the baseline itself) and ``plan`` label (None
    for fp32; ``*``: every run of this model and method on disk)."""

    model: str
    method: str
    plan: str | None = None

    def __post_init__(self) -> None:
        if (self.method == FP32) != (self.plan is None):
            raise ValueError(f"RunSpec: the fp32 baseline takes no plan, every other method one; got {self}")
        if self.method not in DEVICE_METHODS:
            raise ValueError(f"RunSpec: method {self.method!r} has no device.csv name; one of {sorted(DEVICE_METHODS)}")

    @property
    def name(self) -> str:
        """The run's directory under ``runs/<profile>/models`` (:func:`sub8.qat.run_name`'s scheme)."""
        return self.model if self.method == FP32 else f"{self.model}-{self.method}-{self.plan}"

    @classmethod
    def parse(cls, model: str, text: str) -> RunSpec:
        """``"fp32"`` or ``"<method>-<plan label>"`` (e.g. ``"s8bqat-4b"``, ``"gq-*"``) for baseline ``model``."""
        if text == FP32:
            return cls(model, FP32)
        method, sep, plan = text.partition("-")
        if not sep or not plan:
            raise ValueError(f"run {text!r}: expected 'fp32' or '<method>-<plan label>', e.g. 's8bqat-4b'")
        return cls(model, method, plan)


def run_exists(profile: Profile, spec: RunSpec) -> bool:
    """The run finished (``final.pt``) and, unless fp32, recorded its settings (``qat.json``)."""
    run_dir = model_dir(profile, spec.name)
    return (run_dir / "final.pt").is_file() and (spec.method == FP32 or (run_dir / "qat.json").is_file())


def select_runs(
    profile: Profile, specs: Iterable[RunSpec], optional_methods: Sequence[str] = ("gq",)
) -> tuple[list[RunSpec], list[RunSpec]]:
    """The runs of ``specs`` to study, and those of ``optional_methods`` that are absent (skipped).

    A ``*`` plan expands to every finished run ``<model>-<method>-<label>`` on disk, sorted by label (none: nothing,
    not an error), but for the variants of another (:func:`sub8.qat.variant_of`: ablations of a run's training
    options, like notebook 04's ``5b-hard_start``; the device study is about the methods' plans). An absent run of
    an optional method is skipped; any other absent run is an error that names it, since the notebook that makes it
    (03, 04, 05) has to run first."""
    chosen, skipped, missing = [], [], []
    for spec in specs:
        if spec.plan == "*":
            prefix = f"{spec.model}-{spec.method}-"
            found = sorted(p.name for p in (profile.runs_dir / "models").glob(f"{prefix}*") if p.is_dir())
            chosen += [s for name in found if variant_of(profile, name, found) is None
                       and run_exists(profile, s := RunSpec(spec.model, spec.method, name[len(prefix):]))]
        elif run_exists(profile, spec):
            chosen.append(spec)
        elif spec.method in optional_methods:
            skipped.append(spec)
        else:
            missing.append(spec.name)
    if missing:
        raise FileNotFoundError(f"runs not found under {profile.runs_dir / 'models'}: {missing}; run the notebooks "
                                "that make them first (01 baselines, 03 uniform/S8BQAT, 04 GQ, 05 native)")
    return list(dict.fromkeys(chosen)), skipped


# ---------------------------------------------------------------------------------------------------------------
# One run, loaded and evaluated
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DeviceRun:
    """A run as the device study uses it.

    Attributes:
        spec: which run.
        model: the fine-tuned model (hard-quantized weights), eval mode; the baseline for fp32.
        exported: each quantized weight's device form (codes, int8 LUT, scale); {} for fp32.
        hooks: the method's hooks with the run's final state (None for fp32).
        mean_bits: :func:`sub8.qat.plan_bits` (32 for fp32).
        work: the device workload of ``model`` with ``exported``.
        utterances: the test split as the device streams it (durations, the run's token counts).
        fake_quant: the run's test result (its cached hypotheses).
        integer: the integer program's test result (runs with quantized weights that were decoded; else None).
    """

    spec: RunSpec
    model: nn.Module
    exported: dict[str, Any]
    hooks: Hooks | None
    mean_bits: float
    work: dev.Workload
    utterances: list[dev.Utterance]
    fake_quant: EvalResult
    integer: EvalResult | None = None

    @property
    def note(self) -> str:
        if self.spec.method == FP32:
            return NOTE_FP32
        return "" if self.integer is not None else NOTE_NOT_DECODED


def _plan_from_list(method: str, rules: list | None) -> QuantPlan | NativePlan | None:
    """The plan a run recorded in its ``qat.json``: a NativePlan for ``native``, else a QuantPlan."""
    if rules is None:
        return None
    if method == "native":
        return NativePlan.from_list(rules)
    return QuantPlan([tuple(rule) for rule in rules])


def _ensure_registered(method: str) -> None:
    """Import ``sub8.quant.<method>`` when ``method`` is not registered yet (a method module may register itself
    on import); an error naming the registered methods if that does not help."""
    if method in registered_methods():
        return
    try:
        importlib.import_module(f"sub8.quant.{method}")
    except ImportError:
        pass
    if method not in registered_methods():
        raise ValueError(f"method {method!r} is not registered with sub8.qat (registered: "
                         f"{', '.join(registered_methods())}); import the module that registers it first")


def load_run(profile: Profile, spec: RunSpec) -> tuple[nn.Module, dict[str, Any], Hooks | None, Any]:
    """(model, exported weights, hooks with the run's final state, plan) of a finished run (see the module
    docstring); for fp32 the baseline, {}, None, None."""
    model = load_model(profile, spec.name)
    if spec.method == FP32:
        return model, {}, None, None
    recorded = json.loads((model_dir(profile, spec.name) / "qat.json").read_text())
    if recorded["method"] != spec.method or recorded["base"] != spec.model:
        raise ValueError(f"{spec.name}: its qat.json records base {recorded['base']!r}, method "
                         f"{recorded['method']!r}, not the run's name")
    _ensure_registered(spec.method)
    plan = _plan_from_list(spec.method, recorded["plan"])
    hooks = make_hooks(spec.method, plan, **recorded.get("options", {}))
    exported = export_quantized(model, trained_quantizers(hooks, model, hooks_state(profile, spec.name)))
    check_export(model, exported)  # the device form is exactly the weights the run evaluated
    return model, exported, hooks, plan


def split_durations_s(data: PreparedData, split: str = "test") -> np.ndarray:
    """Audio seconds of each utterance of ``split``: feature frames × the hop."""
    fs = data.features[split]
    return fs.lengths.numpy().astype(np.float64) * data.profile.features.frame_shift_ms / 1000.0


def streaming_utterances(durations_s: Sequence[float], token_counts: Sequence[int]) -> list[dev.Utterance]:
    """The device's utterances: each duration with its token count (spread evenly over the encoder frames)."""
    if len(durations_s) != len(token_counts):
        raise ValueError(f"{len(durations_s)} durations for {len(token_counts)} token counts")
    return [dev.Utterance(float(d), int(t)) for d, t in zip(durations_s, token_counts)]


def fake_quant_result(data: PreparedData, spec: RunSpec, model: nn.Module, hooks: Hooks | None) -> EvalResult:
    """The run's test result, from its cached hypotheses (decoded as its notebook did — inside the hooks'
    ``evaluating``, e.g. native QAT's activations quantized — if the cache is missing)."""
    with (hooks or Hooks()).evaluating(model) as deployed:
        return evaluate_model(data, spec.name, deployed)


def integer_settings(profile: Profile, spec: RunSpec, calibration_utterances: int) -> dict[str, Any]:
    """What the integer program's cached hypotheses depend on: the run's weights, the converter's version and the
    calibration and rounding settings."""
    return {
        "final_digest": checkpoint_digest(profile, spec.name),
        "program_version": prog.PROGRAM_VERSION,
        "calibration_split": "dev",
        "calibration_utterances": calibration_utterances,
        "calibration_seed": 0,
        "percentile": prog.CALIBRATION_PERCENTILE,
        "rounding": "half_to_even",
        "hidden": "bound",
    }


def integer_result(
    data: PreparedData, spec: RunSpec, model: nn.Module, exported: Mapping[str, Any], *, force: bool = False,
    calibration_utterances: int = CALIBRATION_UTTERANCES,
) -> EvalResult:
    """Test result of the run's integer program (a model with quantized weights), converted with the default
    settings of :func:`sub8.emulator.program.to_integer_program` (percentile 99.99, RNN-T hidden states at their
    bound, half-to-even) and calibrated on ``calibration_utterances`` dev utterances.

    The hypotheses are cached in the run's directory (``eval_int_test.csv``, with the settings in
    ``eval_int_test.json``: the weights' digest included, so a retrained run is decoded again; the name matches the
    ``eval_*.csv`` that a forced or changed fine-tune deletes)."""
    run_dir = model_dir(data.profile, spec.name)
    csv, meta = run_dir / f"{INT_CACHE}.csv", run_dir / f"{INT_CACHE}.json"
    fs = data.features["test"]
    settings = integer_settings(data.profile, spec, calibration_utterances)
    cached = None if force else _cached_integer_hyps(data, spec, calibration_utterances)
    if cached is not None:
        return score_feature_set(fs, cached)
    calibration = prog.calibration_features(data.features["dev"], data.cmvn, calibration_utterances)
    program = prog.to_integer_program(model, dict(exported), calibration)
    hyps = decode(program, fs, data.cmvn, data.tokenizer, data.profile.eval_batch_frames)
    atomic_write_text(csv, pd.DataFrame({"utt_id": fs.utt_ids, "hyp": hyps}).to_csv(index=False))
    atomic_write_text(meta, json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return score_feature_set(fs, hyps)


def _cached_integer_hyps(data: PreparedData, spec: RunSpec, calibration_utterances: int) -> list[str] | None:
    """The integer program's cached test hypotheses of the run, if they belong to its current settings."""
    run_dir = model_dir(data.profile, spec.name)
    csv, meta = run_dir / f"{INT_CACHE}.csv", run_dir / f"{INT_CACHE}.json"
    if not (csv.is_file() and meta.is_file()):
        return None
    if json.loads(meta.read_text()) != integer_settings(data.profile, spec, calibration_utterances):
        return None
    cached = pd.read_csv(csv, keep_default_na=False, dtype=str)
    return list(cached.hyp) if list(cached.utt_id) == list(data.features["test"].utt_ids) else None


def _integer_job(data: PreparedData, spec: RunSpec, force: bool, calibration_utterances: int) -> None:
    model, exported, _, _ = load_run(data.profile, spec)
    integer_result(data, spec, model, exported, force=force, calibration_utterances=calibration_utterances)


def prepare_runs(
    data: PreparedData, specs: Iterable[RunSpec], *, integer_wer: bool | Collection[str] = True,
    force: bool = False, max_audio_s: float | None = None, calibration_utterances: int = CALIBRATION_UTTERANCES,
) -> list[DeviceRun]:
    """Load every run, build its workload and streaming utterances, read its test result, and convert the runs
    with quantized weights to integer programs and decode the test split with them (cached; ``force`` decodes
    again). ``integer_wer``: True for every such run, False for none, or the run names (:attr:`RunSpec.name`) to
    convert (the integer decode is the expensive step: ~0.015-0.02 × the audio per run, see
    :mod:`sub8.emulator.program` and :mod:`sub8.emulator.conformer_program`)."""
    specs = list(specs)
    durations = split_durations_s(data)
    max_audio_s = max_audio_s or max(MAX_AUDIO_S, math.ceil(float(durations.max())))
    decoded = [spec for spec in specs if spec.method != FP32
               and (integer_wer if isinstance(integer_wer, bool) else spec.name in set(integer_wer))]
    # The integer decodes first, side by side (the programs are NumPy: one core each); then only read back below.
    pending = [spec for spec in decoded if force or _cached_integer_hyps(data, spec, calibration_utterances) is None]
    run_side_by_side(_integer_job, data, [(spec, force, calibration_utterances) for spec in pending],
                     [spec.name for spec in pending], num_threads=1)
    runs = []
    for spec in specs:
        model, exported, hooks, plan = load_run(data.profile, spec)
        work = dev.workload(model, exported or None, max_audio_s=max_audio_s)
        fq = fake_quant_result(data, spec, model, hooks)
        tokens = [len(data.tokenizer.encode(hyp)) if hyp.strip() else 0 for hyp in fq.per_utterance.hyp]
        run = DeviceRun(spec, model, exported, hooks, FP32_BITS if plan is None else plan_bits(model, plan), work,
                        streaming_utterances(durations, tokens), fq)
        if spec in decoded and exported:  # decoded above: read back (force is spent)
            run.integer = integer_result(data, spec, model, exported, calibration_utterances=calibration_utterances)
        runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------------------------
# device.csv
# ---------------------------------------------------------------------------------------------------------------


def _identity(run: DeviceRun) -> dict[str, Any]:
    spec = run.spec
    return {"model": spec.model, "method": DEVICE_METHODS[spec.method], "plan": spec.plan or FP32,
            "mean_bits": run.mean_bits}


def device_row(run: DeviceRun, config: dev.AcceleratorConfig) -> dict[str, Any]:
    """One row of device.csv (:data:`DEVICE_COLUMNS` + :data:`EXTRA_COLUMNS`): ``run`` streamed on ``config``."""
    summary = dev.simulate(run.work, config, run.utterances).summary()
    row = {**_identity(run), **{k: summary[k] for k in DEVICE_COLUMNS if k in summary}}
    row["wer_int"] = run.integer.wer if run.integer is not None else math.nan
    row |= {"run": run.spec.name, "run_method": run.spec.method, "wer_fq": run.fake_quant.wer, "note": run.note}
    return {k: row[k] for k in (*DEVICE_COLUMNS, *EXTRA_COLUMNS)}


def device_table(runs: Sequence[DeviceRun], configs: Sequence[dev.AcceleratorConfig]) -> pd.DataFrame:
    """device.csv: every run on every configuration (runs in order within each configuration)."""
    rows = [device_row(run, config) for config in configs for run in runs]
    return pd.DataFrame(rows, columns=[*DEVICE_COLUMNS, *EXTRA_COLUMNS])


def integer_wer_table(runs: Sequence[DeviceRun], tolerance: float = WER_INT_TOLERANCE) -> pd.DataFrame:
    """The integer program against the fake-quant model, per RNN-T run with an integer result: ``wer_fq``,
    ``wer_int``, ``diff`` = wer_int − wer_fq (absolute points), ``same_hyp_pct`` (utterances whose two hypotheses
    are identical, %), ``within_tolerance`` (|diff| ≤ ``tolerance``)."""
    rows = []
    for run in runs:
        if run.integer is None:
            continue
        same = (run.integer.per_utterance.hyp.values == run.fake_quant.per_utterance.hyp.values).mean()
        diff = run.integer.wer - run.fake_quant.wer
        rows.append({**_identity(run), "run": run.spec.name, "wer_fq": run.fake_quant.wer, "wer_int": run.integer.wer,
                     "diff": diff, "same_hyp_pct": 100 * float(same), "within_tolerance": bool(abs(diff) <= tolerance)})
    return pd.DataFrame(rows, columns=["model", "method", "plan", "mean_bits", "run", "wer_fq", "wer_int", "diff",
                                       "same_hyp_pct", "within_tolerance"])


FOOTPRINT_COLUMNS = (
    "model", "method", "plan", "run", "code_bytes", "table_bytes", "scale_bytes", "float_weight_bytes", "param_bytes",
    "state_bytes", "kv_cache_bytes", "activation_bytes", "total_bytes", "physical_bound_bytes", "packing_ratio",
    "total_ratio",
)


def footprint_table(runs: Sequence[DeviceRun]) -> pd.DataFrame:
    """Each run's device memory by part (:class:`sub8.emulator.device.Footprint`, bytes; the same on every preset):
    ``packing_ratio`` = stored weights ÷ their physical bound Σ N·b/8 + LUTs + scales (the byte padding of the
    packed codes; issue 7's target ≤ 1.02), ``total_ratio`` = the whole footprint ÷ that bound."""
    rows = []
    for run in runs:
        fp = run.work.footprint()
        rows.append({**{k: v for k, v in _identity(run).items() if k != "mean_bits"}, "run": run.spec.name,
                     "code_bytes": fp.code_bytes, "table_bytes": fp.table_bytes, "scale_bytes": fp.scale_bytes,
                     "float_weight_bytes": fp.float_weight_bytes, "param_bytes": fp.param_bytes,
                     "state_bytes": fp.state_bytes, "kv_cache_bytes": fp.kv_cache_bytes,
                     "activation_bytes": fp.activation_bytes, "total_bytes": fp.total_bytes,
                     "physical_bound_bytes": fp.physical_bound_bytes, "packing_ratio": fp.packing_ratio,
                     "total_ratio": fp.total_ratio})
    return pd.DataFrame(rows, columns=list(FOOTPRINT_COLUMNS))


def preset_table(configs: Iterable[dev.AcceleratorConfig]) -> pd.DataFrame:
    """The accelerator configurations, one row each (units in the column names)."""
    return pd.DataFrame([{"preset": c.name, "macs_per_cycle": c.macs_per_cycle, "clock_mhz": c.clock_hz / 1e6,
                          "tops_int8": c.tops, "sram_kib": c.sram_bytes / dev.KiB,
                          "dram_gb_per_s": c.dram_bytes_per_s / dev.GB,
                          "decompress_codes_per_cycle": c.decompress_codes_per_cycle} for c in configs])


# ---------------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------------

REDUCTION_COLUMNS = (
    "model", "run", "reference_run", "footprint_bytes", "reference_footprint_bytes", "memory_reduction_pct",
    "weight_reduction_pct", "upl_ms_p50", "reference_upl_ms_p50", "upl_p50_reduction_pct", "upl_p90_reduction_pct",
    "latency_reduction_pct", "wer_fq", "reference_wer_fq", "wer_rel_pct",
)


def reduction_pct(value: float, reference: float) -> float:
    """100 · (1 − value / reference): positive when ``value`` is smaller (NaN for a zero or NaN reference)."""
    if not reference or math.isnan(reference) or math.isnan(value):
        return math.nan
    return 100.0 * (1.0 - value / reference)


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference and not math.isnan(reference) else math.nan


def _pick(table: pd.DataFrame, model: str, method: str, plan: str) -> pd.Series | None:
    rows = table[(table.model == model) & (table.run_method == method) & (table.plan == plan)]
    if len(rows) > 1:
        raise ValueError(f"{len(rows)} rows of {model} {method} {plan}: filter the table to one preset first")
    return rows.iloc[0] if len(rows) else None


def reduction_table(
    table: pd.DataFrame, method: str, plans: Sequence[str] | None = None, reference: tuple[str, str] = REFERENCE,
) -> pd.DataFrame:
    """Each ``method`` row (of ``plans``, or every plan) against the same baseline's ``reference`` (run method, plan)
    row, on one preset (``table``: device.csv's columns, one preset). Columns :data:`REDUCTION_COLUMNS`: memory =
    ``footprint_bytes``, weights = ``weight_bytes``, UPL p50 / p90, latency = ``latency_ms_per_frame``, each as
    :func:`reduction_pct`; ``wer_rel_pct`` = 100 · (wer_fq − reference wer_fq) / reference wer_fq. Baselines
    without the reference row are left out."""
    if table.preset.nunique() > 1:
        raise ValueError(f"reduction_table: one preset at a time, got {sorted(table.preset.unique())}")
    rows = []
    candidates = table[(table.run_method == method) & (table.plan.isin(plans) if plans is not None else True)]
    for cand in candidates.itertuples():
        ref = _pick(table, cand.model, *reference)
        if ref is None:
            continue
        rows.append({
            "model": cand.model, "run": cand.run, "reference_run": ref.run,
            "footprint_bytes": cand.footprint_bytes, "reference_footprint_bytes": ref.footprint_bytes,
            "memory_reduction_pct": reduction_pct(cand.footprint_bytes, ref.footprint_bytes),
            "weight_reduction_pct": reduction_pct(cand.weight_bytes, ref.weight_bytes),
            "upl_ms_p50": cand.upl_ms_p50, "reference_upl_ms_p50": ref.upl_ms_p50,
            "upl_p50_reduction_pct": reduction_pct(cand.upl_ms_p50, ref.upl_ms_p50),
            "upl_p90_reduction_pct": reduction_pct(cand.upl_ms_p90, ref.upl_ms_p90),
            "latency_reduction_pct": reduction_pct(cand.latency_ms_per_frame, ref.latency_ms_per_frame),
            "wer_fq": cand.wer_fq, "reference_wer_fq": ref.wer_fq,
            "wer_rel_pct": 100 * (cand.wer_fq - ref.wer_fq) / ref.wer_fq if ref.wer_fq else math.nan,
        })
    return pd.DataFrame(rows, columns=list(REDUCTION_COLUMNS))


GQ_COMPARISON_COLUMNS = ("comparison", *REDUCTION_COLUMNS, "meets_memory_target", "meets_upl_target")


def gq_comparison(table: pd.DataFrame, plan: str = "5b", reference: tuple[str, str] = REFERENCE) -> pd.DataFrame:
    """The GQ seed's comparison: GQ at ``plan`` against 8-bit uniform QAT, per baseline (:func:`reduction_table`),
    with whether each meets the seed's figures (memory ≥ 30.73%, UPL p50 ≥ 31.75%). Without any GQ run at
    ``plan`` the same comparison is made for S8BQAT at ``plan``, and the ``comparison`` column says so."""
    method = "gq" if ((table.run_method == "gq") & (table.plan == plan)).any() else "s8bqat"
    out = reduction_table(table, method, [plan], reference)
    label = f"{method} {plan} vs {reference[0]} {reference[1]}"
    if method != "gq":
        label += " (stand-in: no GQ run)"
    out.insert(0, "comparison", label)
    out["meets_memory_target"] = out.memory_reduction_pct >= GQ_MEMORY_TARGET_PCT
    out["meets_upl_target"] = out.upl_p50_reduction_pct >= GQ_UPL_TARGET_PCT
    return out[list(GQ_COMPARISON_COLUMNS)]


MIXED_COLUMNS = (*REDUCTION_COLUMNS, "within_wer_target", "meets_memory_target", "best")


def mixed_plan_table(table: pd.DataFrame, reference: tuple[str, str] = REFERENCE) -> pd.DataFrame:
    """Issue 7's mixed-plan target: every GQ run whose plan mixes bit widths (``mixed-*``, ``auto-*``) against 8-bit
    uniform QAT (:func:`reduction_table`, one preset), with whether its relative WER loss is within
    :data:`MIXED_MAX_WER_REL_PCT` and its memory reduction at least :data:`MIXED_MEMORY_TARGET_PCT`; ``best`` marks,
    per baseline, the run with the largest memory reduction among those within the WER bound."""
    mixed = sorted(p for p in table[table.run_method == "gq"].plan.unique() if not re.fullmatch(r"\d+b", p))
    out = reduction_table(table, "gq", mixed, reference)
    out["within_wer_target"] = out.wer_rel_pct <= MIXED_MAX_WER_REL_PCT
    out["meets_memory_target"] = out.memory_reduction_pct >= MIXED_MEMORY_TARGET_PCT
    eligible = out[out.within_wer_target]
    best = set(eligible.loc[eligible.groupby("model").memory_reduction_pct.idxmax()].run) if len(eligible) else set()
    out["best"] = out.run.isin(best)
    return out[list(MIXED_COLUMNS)]


S8BQAT_COMPARISON_COLUMNS = (
    "large", "large_run", "large_bits", "small", "small_run", "large_footprint_bytes", "small_footprint_bytes",
    "footprint_ratio", "large_latency_ms_per_frame", "small_latency_ms_per_frame", "latency_ratio",
    "large_upl_ms_p50", "small_upl_ms_p50", "upl_p50_ratio", "upl_p90_ratio", "large_wer_fq", "small_wer_fq",
)


def s8bqat_comparison(
    table: pd.DataFrame, pairs: Sequence[tuple[str, str]], method: str = "s8bqat",
    reference: tuple[str, str] = REFERENCE,
) -> pd.DataFrame:
    """The S8BQAT claim on the device: each (small, large) pair, every ``method`` run of the large model below 8
    bits against the small model's ``reference`` run (one preset). Ratios are large ÷ small (< 1: the large model
    is smaller or faster): footprint, latency per frame, UPL p50 and p90."""
    if table.preset.nunique() > 1:
        raise ValueError(f"s8bqat_comparison: one preset at a time, got {sorted(table.preset.unique())}")
    rows = []
    for small, large in pairs:
        ref = _pick(table, small, *reference)
        if ref is None:
            continue
        for cand in table[(table.model == large) & (table.run_method == method) & (table.mean_bits < 8)].itertuples():
            rows.append({
                "large": large, "large_run": cand.run, "large_bits": cand.mean_bits, "small": small,
                "small_run": ref.run, "large_footprint_bytes": cand.footprint_bytes,
                "small_footprint_bytes": ref.footprint_bytes,
                "footprint_ratio": _ratio(cand.footprint_bytes, ref.footprint_bytes),
                "large_latency_ms_per_frame": cand.latency_ms_per_frame,
                "small_latency_ms_per_frame": ref.latency_ms_per_frame,
                "latency_ratio": _ratio(cand.latency_ms_per_frame, ref.latency_ms_per_frame),
                "large_upl_ms_p50": cand.upl_ms_p50, "small_upl_ms_p50": ref.upl_ms_p50,
                "upl_p50_ratio": _ratio(cand.upl_ms_p50, ref.upl_ms_p50),
                "upl_p90_ratio": _ratio(cand.upl_ms_p90, ref.upl_ms_p90),
                "large_wer_fq": cand.wer_fq, "small_wer_fq": ref.wer_fq,
            })
    return pd.DataFrame(rows, columns=list(S8BQAT_COMPARISON_COLUMNS))


# ---------------------------------------------------------------------------------------------------------------
# Sweep over SRAM size and DRAM bandwidth
# ---------------------------------------------------------------------------------------------------------------


def sweep_grid(
    runs: Sequence[DeviceRun], base: dev.AcceleratorConfig, sram_points: int = 9, bandwidth_factors: Sequence[float]
    = (0.25, 0.5, 1.0, 2.0, 4.0),
) -> tuple[list[int], list[float]]:
    """SRAM sizes: ``sram_points`` geometrically spaced from the smallest SRAM any of ``runs`` fits in (its
    reserved buffers) to 1.25 × the largest footprint (beyond it everything is resident and nothing moves), plus
    ``base``'s own size; bandwidths: ``base``'s × ``bandwidth_factors``. Sized from the models, so the grid shows the
    transition on the tiny smoke models and the real ones alike."""
    low = min(run.work.reserved_bytes for run in runs)
    high = max(1.25 * max(run.work.footprint().total_bytes for run in runs), low + 1)
    sram = sorted({int(round(x)) for x in np.geomspace(low, high, sram_points)} | {int(base.sram_bytes)})
    return sram, [float(base.dram_bytes_per_s * f) for f in bandwidth_factors]


def sweep_table(
    runs: Sequence[DeviceRun], base: dev.AcceleratorConfig, sram_bytes: Sequence[int],
    dram_bytes_per_s: Sequence[float],
) -> pd.DataFrame:
    """:func:`sub8.emulator.device.sweep` of every run over ``sram_bytes`` × ``dram_bytes_per_s`` (other fields of
    ``base``): device.csv's columns (``preset`` is ``base``'s name) plus ``sram_bytes``, ``dram_bytes_per_s`` and
    ``feasible`` (False where the SRAM cannot hold the run's reserved buffers: NaN latencies)."""
    rows = []
    for run in runs:
        for point in dev.sweep(run.work, run.utterances, base, sram_bytes, dram_bytes_per_s):
            rows.append({**_identity(run), "preset": base.name, "sram_bytes": point["sram_bytes"],
                         "dram_bytes_per_s": point["dram_bytes_per_s"], "feasible": point["feasible"],
                         **{k: point[k] for k in ("footprint_bytes", "weight_bytes", "latency_ms_per_frame",
                                                  "upl_ms_p50", "upl_ms_p90", "rtf")},
                         "wer_int": run.integer.wer if run.integer is not None else math.nan,
                         "run": run.spec.name, "run_method": run.spec.method, "wer_fq": run.fake_quant.wer})
    return pd.DataFrame(rows)


def sweep_comparisons(
    sweep: pd.DataFrame, gq_plan: str = "5b", pairs: Sequence[tuple[str, str]] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`gq_comparison` and :func:`s8bqat_comparison` at every (SRAM, bandwidth) point of ``sweep``: the two
    tables with ``sram_bytes`` and ``dram_bytes_per_s`` columns in front."""
    gq, s8 = [], []
    for (sram, bandwidth), point in sweep.groupby(["sram_bytes", "dram_bytes_per_s"], sort=True):
        where = {"sram_bytes": sram, "dram_bytes_per_s": bandwidth}
        gq.append(gq_comparison(point, gq_plan).assign(**where))
        s8.append(s8bqat_comparison(point, pairs).assign(**where))
    front = ["sram_bytes", "dram_bytes_per_s"]

    def frame(parts: list[pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
        parts = [p for p in parts if len(p)]
        out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*columns, *front])
        return out[front + list(columns)]

    return frame(gq, GQ_COMPARISON_COLUMNS), frame(s8, S8BQAT_COMPARISON_COLUMNS)


# ---------------------------------------------------------------------------------------------------------------
# Bit-exactness against ONNX Runtime (a few random cases, for the notebook; tests/test_emulator_kernels.py has more)
# ---------------------------------------------------------------------------------------------------------------


def _full_range(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.int8) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


ORT_COLUMNS = ("op", "case", "shapes", "outputs", "saturated", "max_abs_diff")


def ort_bit_exactness(cases_per_op: int = 3, seed: int = 0) -> pd.DataFrame:
    """Random cases of the emulator's :func:`~sub8.emulator.kernels.matmul_integer`,
    :func:`~sub8.emulator.kernels.qlinear_matmul` and :func:`~sub8.emulator.kernels.conv_integer` against ONNX
    Runtime's ``MatMulInteger``, ``QLinearMatMul`` and ``ConvInteger``: one row per case with the largest absolute
    difference (0 = bit-exact) and how many int8 outputs saturated (QLinearMatMul).

    Cases: int8 × int8 full-range operands with random zero points (MatMulInteger; ORT's u8 × s8 path is exact only
    for 7-bit weights, see tests/test_emulator_kernels.py); QLinearMatMul with per-column weight scales, the output
    scale drawn so that some outputs saturate, and one case at scale ratio 0.5 where every odd accumulator is a
    rounding tie; ConvInteger as the Conformer runs it (a causal depthwise Conv1d, a strided Conv2d of the
    subsampling, with a nonzero input zero point so padding must use it)."""
    from onnx import TensorProto

    rng = np.random.default_rng(seed)
    rows = []
    for case in range(cases_per_op):
        m, k, n = (int(x) for x in rng.integers(1, 48, 3))
        a, b = _full_range(rng, (m, k)), _full_range(rng, (k, n))
        az, bz = np.array(rng.integers(-8, 8), np.int8), np.array(rng.integers(-8, 8), np.int8)
        expected = run_onnx_node("MatMulInteger", {"a": a, "b": b, "az": az, "bz": bz}, TensorProto.INT32)
        got = K.matmul_integer(a, b, int(az), int(bz))
        rows.append(("MatMulInteger", case, f"({m},{k})x({k},{n})", got.size, 0, _max_diff(got, expected)))
    for case in range(cases_per_op):
        m, k, n = (int(x) for x in rng.integers(2, 48, 3))
        a, b = _full_range(rng, (m, k)), _full_range(rng, (k, n))
        if case == 0:  # ties: a_scale · b_scale / y_scale = 0.5 exactly
            a_scale, b_scale, y_scale = 1.0, np.full(n, 0.5, np.float32), 1.0
            a = rng.integers(-6, 7, (m, k)).astype(np.int8)
            b = rng.integers(-6, 7, (k, n)).astype(np.int8)
        else:
            a_scale = float(rng.uniform(0.005, 0.05))
            b_scale = rng.uniform(0.002, 0.05, n).astype(np.float32)
            # The output scale puts the 90th percentile of |a_scale · b_scale · acc| at 127: ~10% saturate.
            real = a_scale * b_scale * K.matmul_integer(a, b).astype(np.float64)
            y_scale = float(np.percentile(np.abs(real), 90) / 127)
        az, yz = np.array(rng.integers(-4, 4), np.int8), np.array(rng.integers(-4, 4), np.int8)
        inputs = {"a": a, "a_scale": np.array(a_scale, np.float32), "a_zp": az, "b": b,
                  "b_scale": np.asarray(b_scale, np.float32), "b_zp": np.zeros(n, np.int8),
                  "y_scale": np.array(y_scale, np.float32), "y_zp": yz}
        expected = run_onnx_node("QLinearMatMul", inputs, TensorProto.INT8)
        got = K.qlinear_matmul(a, a_scale, int(az), b, np.asarray(b_scale, np.float32), 0, y_scale, int(yz))
        saturated = int(((got == -128) | (got == 127)).sum())
        rows.append(("QLinearMatMul", case, f"({m},{k})x({k},{n})", got.size, saturated, _max_diff(got, expected)))
    for case in range(cases_per_op):
        if case % 2 == 0:  # the Conformer's causal depthwise Conv1d: left padding kernel − 1
            channels, frames, kernel = (int(x) for x in rng.integers(2, 12, 3))
            x_shape, w_shape, pads, strides, group = ((2, channels, frames + kernel), (channels, 1, kernel),
                                                      [kernel - 1, 0], [1], channels)
        else:  # a subsampling Conv2d: stride 2, time padded on the left (causal)
            c_in, c_out = (int(x) for x in rng.integers(1, 6, 2))
            x_shape, w_shape, pads, strides, group = ((1, c_in, 13, 20), (c_out, c_in, 3, 3), [2, 0, 0, 0],
                                                      [2, 2], 1)
        x, w = _full_range(rng, x_shape, np.uint8), _full_range(rng, w_shape)
        xz, wz = np.array(rng.integers(100, 156), np.uint8), np.array(rng.integers(-4, 4), np.int8)
        expected = run_onnx_node("ConvInteger", {"x": x, "w": w, "xz": xz, "wz": wz}, TensorProto.INT32,
                                 pads=pads, strides=strides, group=group)
        spatial = len(x_shape) - 2
        got = K.conv_integer(x, w, int(xz), int(wz), stride=strides,
                             padding=list(zip(pads[:spatial], pads[spatial:])), groups=group)
        rows.append(("ConvInteger", case, f"x{x_shape} w{w_shape}", got.size, 0, _max_diff(got, expected)))
    return pd.DataFrame(rows, columns=list(ORT_COLUMNS))


def _max_diff(got: np.ndarray, expected: np.ndarray) -> int:
    if got.shape != expected.shape:
        raise ValueError(f"shapes differ: emulator {got.shape}, ONNX Runtime {expected.shape}")
    return int(np.abs(got.astype(np.int64) - expected.astype(np.int64)).max(initial=0))


__all__ = [
    "DEVICE_COLUMNS", "DEVICE_METHODS", "EXTRA_COLUMNS", "FOOTPRINT_COLUMNS", "GQ_COMPARISON_COLUMNS", "ORT_COLUMNS",
    "REDUCTION_COLUMNS", "S8BQAT_COMPARISON_COLUMNS", "DeviceRun", "RunSpec", "device_row", "device_table",
    "MIXED_COLUMNS", "footprint_table", "gq_comparison", "integer_result", "mixed_plan_table", "integer_wer_table", "load_run", "ort_bit_exactness",
    "prepare_runs", "preset_table", "reduction_pct", "reduction_table", "run_exists", "run_onnx_node",
    "s8bqat_comparison", "select_runs", "split_durations_s", "streaming_utterances", "sweep_comparisons",
    "sweep_grid", "sweep_table",
]
