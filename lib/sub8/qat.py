"""From "a trained baseline + a quantization method + a plan" to one results row, shared by notebooks 03 (S8BQAT),
04 (GQ) and 05 (native QAT); and the level comparison of notebook 02.

**Methods** are named hook factories in a registry: ``make_hooks(method, plan, **options)`` gives the
:class:`sub8.train.Hooks` that fine-tune a baseline with that method (None for the fp32 control). This module
registers the methods of issue 4; another module adds its own with :func:`register_method`. The hooks of a method
that quantizes must have ``quantizers(model) -> {param name: Quantizer}``: the quantizer whose ``quantize_int8``
gives each weight's device form after fine-tuning (for S8BQAT the fixed Lloyd-Max LUTs, restored from the run's
checkpoint; for uniform QAT the uniform quantizer recomputed from the hard weights, which gives back the same codes).

**A row** (``ROW_COLUMNS``), per (baseline, method, plan):

- ``bits``: the plan's bits per quantized weight (the weight-count-weighted mean for a mixed plan); 32 for fp32.
- ``wer_test``, ``cer_test``: percent, on the test split, of the hard-quantized weights (what the device runs).
- ``size_bytes_packed``: :func:`sub8.quant.quantized_size_bytes` of the exported model: codes packed densely at b
  bits, each tensor's int8 LUT and float32 scale(s), and every parameter left unquantized (biases, norms, and all of
  the fp32 control) at 4 bytes.
- ``finetune_steps``, ``finetune_minutes``: the fine-tune's updates and wall-clock minutes (0 for PTQ).
- ``wer_delta_lo``, ``wer_delta_hi``: the 95% paired-bootstrap interval (1000 resamples over test utterances, seed
  0) of WER(this row) − WER(the same baseline in fp32), absolute points; an interval containing 0 means "not
  significantly different from fp32".

**Runs.** A fine-tune is the model ``runs/<profile>/models/<base>-<method>-<plan>`` (e.g. ``rnnt_large-s8bqat-4b``);
post-training quantization evaluates under ``<base>-ptq-<plan>``, so its cached hypotheses never mix with the
baseline's. Each run directory holds ``qat.json``: the baseline checkpoint's digest, the method, the plan and the
options. A run whose recorded settings differ from the ones asked for (a retrained baseline, other
hyper-parameters) is done again: its checkpoint and cached hypotheses belong to other settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sub8.data.prepare import PreparedData
from sub8.evaluate import EvalResult, compare
from sub8.experiment import evaluate_model, finetune, load_model, model_dir
from sub8.io import atomic_write_text, load_checkpoint
from sub8.models import Transducer
from sub8.profiles import Profile
from sub8.quant import (
    S8BQAT,
    QuantizedTensor,
    QuantPlan,
    Quantizer,
    UniformQAT,
    UniformQuantizer,
    export_quantized,
    hard_quantize_,
    int8_levels,
    nearest_level,
    plan_quantizers,
    quantizable_parameters,
    quantized_size_bytes,
    snap_to_int8_grid,
)
from sub8.quant.lloyd_max import SortedWeights, lloyd_max
from sub8.quant.mu_law import mu_law_levels
from sub8.train import Hooks

ROW_COLUMNS = (
    "model", "method", "bits", "wer_test", "cer_test", "size_bytes_packed", "finetune_steps", "finetune_minutes",
    "wer_delta_lo", "wer_delta_hi",
)
FP32_BITS = 32

# ---------------------------------------------------------------------------------------------------------------
# The registry of fine-tuning methods

HooksFactory = Callable[..., "Hooks | None"]  # (plan: QuantPlan | None, **options) -> hooks (None: plain fp32)
_METHODS: dict[str, HooksFactory] = {}


def register_method(name: str, factory: HooksFactory, *, replace: bool = False) -> None:
    """Make ``make_hooks(name, plan, **options)`` call ``factory(plan, **options)``. ``name`` becomes part of run
    directory names, so it is lower-case letters, digits and underscores. Re-registering a name needs ``replace``."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"register_method: {name!r} is not a method name (lower-case letters, digits, '_')")
    if name == "ptq":
        raise ValueError("register_method: 'ptq' is reserved for post-training quantization (ptq_row)")
    if name in _METHODS and not replace:
        raise ValueError(f"register_method: {name!r} is already registered (pass replace=True to change it)")
    _METHODS[name] = factory


def registered_methods() -> list[str]:
    """The names :func:`make_hooks` accepts, in registration order."""
    return list(_METHODS)


def make_hooks(method: str, plan: QuantPlan | None = None, **options: Any) -> Hooks | None:
    """The training hooks of ``method`` at ``plan`` (None for ``fp32_control``, which takes no plan).

    Raises ValueError for an unknown method (naming the known ones), a missing plan, or options the method does
    not take."""
    if method not in _METHODS:
        hint = " (post-training quantization is not a fine-tune: use ptq_row)" if method == "ptq" else ""
        raise ValueError(f"unknown QAT method {method!r}{hint}; registered: {', '.join(_METHODS)}")
    try:
        return _METHODS[method](plan, **options)
    except TypeError as e:  # an option the method's constructor does not take
        raise ValueError(f"method {method!r}: bad options {sorted(options)}: {e}") from e


def _need_plan(method: str, plan: QuantPlan | None) -> QuantPlan:
    if not isinstance(plan, QuantPlan):
        raise ValueError(f"method {method!r} quantizes weights: give it a QuantPlan, got {plan!r}")
    return plan


def _fp32_control(plan: QuantPlan | None) -> None:
    # Fine-tuned for the same steps as every QAT run, so a QAT gain is never just extra training.
    if plan is not None:
        raise ValueError("method 'fp32_control' quantizes nothing: pass plan=None")
    return None


register_method("fp32_control", _fp32_control)
# Per tensor: the same granularity as S8BQAT's one LUT per tensor, so the two differ only in where the levels lie.
register_method("uniform", lambda plan: UniformQAT(_need_plan("uniform", plan), per_channel=False))
# Per output channel: the papers' "8-bit QAT" baseline (design.md §5).
register_method(
    "uniform_per_channel", lambda plan: UniformQAT(_need_plan("uniform_per_channel", plan), per_channel=True)
)
register_method("s8bqat", lambda plan, **o: S8BQAT(_need_plan("s8bqat", plan), **o))
register_method(
    "s8bqat_no_compressor", lambda plan, **o: S8BQAT(_need_plan("s8bqat_no_compressor", plan), compress=False, **o)
)
register_method(
    "s8bqat_no_regularizer",
    lambda plan, **o: S8BQAT(_need_plan("s8bqat_no_regularizer", plan), regularize=False, **o),
)


def s8bqat_options(finetune_steps: int, reg_weight: float = 1.0) -> dict[str, Any]:
    """S8BQAT's hyper-parameters for a fine-tune of ``finetune_steps`` updates: final λ = ``reg_weight``, reached by
    a linear ramp over the first third of the updates; the hard compressor every third of the updates (T) and once
    at the end. (On the default profile's 200 updates: ramp 66, T = 66.)"""
    third = max(1, finetune_steps // 3)
    return {"reg_weight": reg_weight, "ramp_steps": third, "compress_every": third}


def trained_quantizers(hooks: Hooks | None, model: nn.Module, state: Mapping[str, Any]) -> dict[str, Quantizer]:
    """The quantizer of every weight ``hooks`` quantized, after fine-tuning: the hooks' final ``state`` (from the
    run's checkpoint, so this works for a run finished earlier too) loaded, then ``hooks.quantizers(model)``.
    ``{}`` for the fp32 control."""
    if hooks is None:
        return {}
    if not callable(getattr(hooks, "quantizers", None)):
        raise TypeError(
            f"{type(hooks).__name__} has no quantizers(model): a method's hooks must say which quantizer gives "
            "each weight's device form, for the export and the packed size"
        )
    hooks.load_state_dict(dict(state))
    return hooks.quantizers(model)


# ---------------------------------------------------------------------------------------------------------------
# Run names and their recorded settings


def plan_label(plan: QuantPlan) -> str:
    """Short, path-safe name of a plan: ``"4b"`` for every weight at 4 bits, else ``"<pattern><bits>"`` per rule
    joined by ``_`` (``*`` → ``x``, ``"*"`` alone → ``all``), e.g. ``all4_joiner8``."""
    if len(plan.rules) == 1 and plan.rules[0][0] == "*":
        return f"{plan.rules[0][1]}b"
    tags = []
    for pattern, bits in plan.rules:
        tag = "all" if pattern == "*" else re.sub(r"[^A-Za-z0-9.]+", "_", pattern.replace("*", "x")).strip("_")
        tags.append(f"{tag}{bits}")
    return "_".join(tags)


def run_name(base: str, method: str, plan: QuantPlan | None = None) -> str:
    """``<base>-<method>-<plan label>``, or ``<base>-<method>`` without a plan (the fp32 control)."""
    return f"{base}-{method}" + (f"-{plan_label(plan)}" if plan is not None else "")


def checkpoint_digest(profile: Profile, name: str) -> str:
    """SHA-256 (first 16 hex digits) of model ``name``'s ``final.pt``: which baseline a run started from."""
    path = model_dir(profile, name) / "final.pt"
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r} has no {path}: train the baselines first (notebook 01_baseline)")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _spec(profile: Profile, base: str, method: str, plan: QuantPlan | None, options: Mapping[str, Any]) -> dict:
    spec = {"base": base, "base_digest": checkpoint_digest(profile, base), "method": method,
            "plan": plan.to_list() if plan is not None else None, "options": dict(options)}
    return json.loads(json.dumps(spec))  # the form it has after a round trip through qat.json (tuples → lists)


def _prepare_run(profile: Profile, name: str, spec: dict, force: bool) -> None:
    """Record ``spec`` in the run's ``qat.json``; first delete the run's outputs (checkpoints, cached hypotheses)
    when ``force``, when the recorded spec differs, or when outputs exist without a recorded spec."""
    run_dir = model_dir(profile, name)
    path = run_dir / "qat.json"
    outputs = [*run_dir.glob("*.pt"), *run_dir.glob("eval_*.csv")]
    stale = force
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != spec:
            changed = sorted(k for k in spec.keys() | recorded.keys() if spec.get(k) != recorded.get(k))
            print(f"{name}: {', '.join(changed)} changed since it ran: running it again")
            stale = True
    elif outputs:
        stale = True  # made by something that did not record its settings: not trusted
    if stale:
        for stale_file in outputs:
            stale_file.unlink()
    atomic_write_text(path, json.dumps(spec, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Rows


@dataclass
class MethodResult:
    """One evaluated run: ``name`` (its directory under ``runs/<profile>/models``), ``row`` (``ROW_COLUMNS``) and
    ``test`` (per-utterance errors, for further paired comparisons)."""

    name: str
    row: dict[str, Any]
    test: EvalResult


def fp32_result(data: PreparedData, base: str) -> EvalResult:
    """Test result of the fp32 baseline ``base`` (its cached hypotheses from notebook 01)."""
    return evaluate_model(data, base, load_model(data.profile, base))


def plan_bits(model: nn.Module, plan: QuantPlan) -> int | float:
    """The plan's bits when all weights share them, else the mean bits per quantized weight (weighted by size)."""
    resolved = plan.resolve(model)
    if len({bits for _, bits in resolved}) == 1:
        return resolved[0][1]
    sizes = [(model.get_parameter(name).numel(), bits) for name, bits in resolved]
    return sum(n * b for n, b in sizes) / sum(n for n, _ in sizes)


def check_export(model: nn.Module, exported: Mapping[str, QuantizedTensor]) -> None:
    """Raise RuntimeError unless every exported tensor dequantizes to the model's weight: the packed size must be
    the size of the weights that were evaluated. The tolerance, 1e-4 · max|W|, admits the float rounding of a
    scale recomputed from hard weights (~127 ulp) and rejects any wrong code (≥ one grid step, max|W| / 127)."""
    for name, q in exported.items():
        weight = model.get_parameter(name).detach()
        tol = 1e-4 * float(weight.abs().max()) + 1e-30
        error = float((q.dequantize().to(weight.device) - weight).abs().max())
        if error > tol:
            raise RuntimeError(f"{name}: the exported codes differ from the evaluated weights by {error:.3g}")


def _row(
    base: str, method: str, bits: int | float, test: EvalResult, fp32: EvalResult, size: int, steps: int,
    minutes: float,
) -> dict[str, Any]:
    delta = compare(test, fp32)
    return dict(zip(ROW_COLUMNS, (base, method, bits, test.wer, test.cer, size, steps, minutes, delta.lo, delta.hi)))


def finetune_row(
    data: PreparedData,
    base: str,
    method: str,
    plan: QuantPlan | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    fp32: EvalResult | None = None,
    force: bool = False,
) -> MethodResult:
    """Fine-tune baseline ``base`` with ``method`` at ``plan`` on the profile's fine-tune schedule (skipped when the
    run finished with the same settings), evaluate the hard-quantized model on test, and make its row.

    Args:
        options: the method's hyper-parameters (e.g. :func:`s8bqat_options`), recorded with the run.
        fp32: the baseline's test result (:func:`fp32_result`), to save reloading it for every row.
    """
    options = dict(options or {})
    hooks = make_hooks(method, plan, **options)
    name = run_name(base, method, plan)
    _prepare_run(data.profile, name, _spec(data.profile, base, method, plan, options), force)
    model, trained = finetune(data, base, name, hooks)
    # Steps, minutes and the hooks' state as final.pt recorded them, so a reused run gives the row a fresh one gave
    # (TrainResult.minutes of a fresh run also counts writing final.pt).
    final = load_checkpoint(trained.final_checkpoint)
    exported = export_quantized(model, trained_quantizers(hooks, model, final["hooks"]))
    check_export(model, exported)
    with (hooks or Hooks()).evaluating(model) as deployed:  # e.g. activations quantized too, as the device runs
        test = evaluate_model(data, name, deployed)
    fp32 = fp32 if fp32 is not None else fp32_result(data, base)
    bits = FP32_BITS if hooks is None else plan_bits(model, plan)
    size = quantized_size_bytes(exported, model)
    return MethodResult(name, _row(base, method, bits, test, fp32, size, final["step"], final["seconds"] / 60), test)


def ptq_model(profile: Profile, base: str, plan: QuantPlan) -> tuple[Transducer, dict[str, Quantizer]]:
    """Post-training quantization: baseline ``base`` loaded afresh, every planned weight replaced by its
    per-tensor symmetric uniform quantization (no fine-tuning). Returns the model and its quantizers."""
    model = load_model(profile, base)
    quantizers = plan_quantizers(model, plan, lambda bits: UniformQuantizer(bits, per_channel=False))
    hard_quantize_(model, quantizers)
    return model, quantizers


def ptq_row(
    data: PreparedData, base: str, plan: QuantPlan | int, *, fp32: EvalResult | None = None, force: bool = False
) -> MethodResult:
    """The ``ptq`` row of baseline ``base`` at ``plan`` (an int: every weight at that many bits), evaluated as run
    ``<base>-ptq-<plan>`` so its cached hypotheses are its own."""
    plan = QuantPlan.uniform(plan) if isinstance(plan, int) and not isinstance(plan, bool) else plan
    name = run_name(base, "ptq", plan)
    _prepare_run(data.profile, name, _spec(data.profile, base, "ptq", plan, {}), force)
    model, quantizers = ptq_model(data.profile, base, plan)
    exported = export_quantized(model, quantizers)
    check_export(model, exported)
    test = evaluate_model(data, name, model)
    fp32 = fp32 if fp32 is not None else fp32_result(data, base)
    size = quantized_size_bytes(exported, model)
    return MethodResult(name, _row(base, "ptq", plan_bits(model, plan), test, fp32, size, 0, 0.0), test)


def results_table(results: Iterable[MethodResult]) -> pd.DataFrame:
    """The rows of ``results`` as a DataFrame with exactly ``ROW_COLUMNS``."""
    return pd.DataFrame([r.row for r in results], columns=list(ROW_COLUMNS))


def headline_table(
    results: Sequence[MethodResult],
    small: str,
    large: str,
    reference: tuple[str, int] = ("uniform_per_channel", 8),
    methods: Sequence[str] = ("s8bqat",),
) -> pd.DataFrame:
    """The larger model below ``reference``'s bits next to the smaller model at ``reference`` (method, bits).

    One row per result of ``large`` with a method in ``methods`` and fewer bits than the reference. Columns:
    ``large, large_method, large_bits, large_wer, large_bytes, small, small_method, small_bits, small_wer,
    small_bytes``; ``wer_rel_pct`` = 100 · (large_wer − small_wer) / small_wer (negative: the large model is
    better); ``bytes_ratio`` = large_bytes / small_bytes; ``wer_diff_lo``, ``wer_diff_hi``: 95% paired-bootstrap
    interval of large_wer − small_wer (absolute points)."""
    ref_method, ref_bits = reference
    refs = [r for r in results if (r.row["model"], r.row["method"], r.row["bits"]) == (small, ref_method, ref_bits)]
    if not refs:
        raise ValueError(f"headline_table: no {small} {ref_method} {ref_bits}-bit result among the results")
    ref = refs[0].row
    rows = []
    for r in results:
        row = r.row
        if row["model"] != large or row["method"] not in methods or not row["bits"] < ref_bits:
            continue
        diff = compare(r.test, refs[0].test)
        rows.append({
            "large": large, "large_method": row["method"], "large_bits": row["bits"], "large_wer": row["wer_test"],
            "large_bytes": row["size_bytes_packed"], "small": small, "small_method": ref_method,
            "small_bits": ref_bits, "small_wer": ref["wer_test"], "small_bytes": ref["size_bytes_packed"],
            "wer_rel_pct": 100 * (row["wer_test"] - ref["wer_test"]) / ref["wer_test"] if ref["wer_test"] else math.nan,
            "bytes_ratio": row["size_bytes_packed"] / ref["size_bytes_packed"],
            "wer_diff_lo": diff.lo, "wer_diff_hi": diff.hi,
        })
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


HEADLINE_COLUMNS = (
    "large", "large_method", "large_bits", "large_wer", "large_bytes", "small", "small_method", "small_bits",
    "small_wer", "small_bytes", "wer_rel_pct", "bytes_ratio", "wer_diff_lo", "wer_diff_hi",
)


def recovery_table(
    table: pd.DataFrame,
    fp32_wer: Mapping[str, float],
    baseline: str = "uniform",
    method: str = "s8bqat",
    threshold_pct: float = 10.0,
) -> pd.DataFrame:
    """How much of ``baseline``'s WER loss ``method`` recovers, per model and bit width where both ran.

    ``table``: rows as :func:`results_table`; ``fp32_wer``: each model's fp32 test WER. Columns: ``model, bits,
    wer_fp32, wer_<baseline>, wer_<method>``; ``<baseline>_loss_rel_pct`` = 100 · (wer_baseline − wer_fp32) /
    wer_fp32; ``recovered_share`` = (wer_baseline − wer_method) / (wer_baseline − wer_fp32), only where the relative
    loss is at least ``threshold_pct`` (NaN elsewhere: nothing worth recovering)."""
    pick = table[table.method.isin([baseline, method])]
    wide = pick.pivot_table(index=["model", "bits"], columns="method", values="wer_test").dropna().reset_index()
    wide.columns.name = None
    if wide.empty:
        return pd.DataFrame(columns=["model", "bits", "wer_fp32", f"wer_{baseline}", f"wer_{method}",
                                     f"{baseline}_loss_rel_pct", "recovered_share"])
    wide["wer_fp32"] = wide.model.map(fp32_wer)
    loss = wide[baseline] - wide.wer_fp32
    rel = 100 * loss / wide.wer_fp32.where(wide.wer_fp32 > 0)
    recovered = ((wide[baseline] - wide[method]) / loss).where(rel >= threshold_pct)
    out = wide.rename(columns={baseline: f"wer_{baseline}", method: f"wer_{method}"})
    out[f"{baseline}_loss_rel_pct"], out["recovered_share"] = rel, recovered
    return out[["model", "bits", "wer_fp32", f"wer_{baseline}", f"wer_{method}", f"{baseline}_loss_rel_pct",
                "recovered_share"]]

# ---------------------------------------------------------------------------------------------------------------
# Levels compared (notebook 02): uniform vs Lloyd-Max vs μ-law, on the int8 grid

CENTROID_METHODS = ("uniform", "lloyd_max", "mu_law")
# μ-law companding constants tried; the lowest-MSE one is kept per tensor and bits. Small μ are included because
# μ → 0 is uniform: a flat histogram (e.g. a barely trained LSTM, initialised uniformly) wants little compression.
MU_CHOICES = (1.0, 3.0, 15.0, 63.0, 255.0)
CENTROID_COLUMNS = ("model", "tensor", "bits", "method", "mse", "sqnr_db")


def int8_grid_levels(
    w: torch.Tensor, bits: int, method: str, mu: float | None = None, sorted_weights: SortedWeights | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lut, scale): ``method``'s 2^bits per-tensor levels for ``w`` snapped to the int8 grid (what the device
    runs). lut: (K,) int8, sorted (K = 2^b − 1 for uniform); scale: () float32.

    - ``uniform``: symmetric, ``max|w| / (2^(b−1) − 1)`` steps; already on the grid. Refuses b = 1.
    - ``lloyd_max``: Lloyd-Max levels of ``w`` (as S8BQAT derives them), snapped. ``sorted_weights``: a sorted copy
      of ``w`` to reuse across bit widths.
    - ``mu_law``: ``max|w| · F⁻¹_μ(u)`` for 2^b evenly spaced u in [−1, 1] (GQ's initial levels), snapped.
    """
    if method == "uniform":
        return UniformQuantizer(bits, per_channel=False).int8_grid(w)
    if method == "lloyd_max":
        return snap_to_int8_grid(lloyd_max(sorted_weights or SortedWeights.of(w), 2**bits))
    if method == "mu_law":
        if mu is None:
            raise ValueError("int8_grid_levels: mu_law needs mu")
        return snap_to_int8_grid(mu_law_levels(bits, w.detach().abs().max().cpu(), mu))
    raise ValueError(f"int8_grid_levels: unknown method {method!r}; one of {CENTROID_METHODS}")


def quantization_mse(w: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor) -> float:
    """Mean squared error of every weight of ``w`` (any shape) against its nearest level ``lut · scale``."""
    levels = int8_levels(lut, scale).to(w.device)
    error = w.detach().double() - levels[nearest_level(w, levels)].double()
    return float((error * error).mean())


def sqnr_db(power: float, mse: float) -> float:
    """Signal-to-quantization-noise ratio 10 log10(E[w²] / MSE); inf for exact quantization."""
    return math.inf if mse == 0 else 10 * math.log10(power / mse)


def tensor_centroids(
    w: torch.Tensor, bits: Iterable[int] = range(1, 9), mus: Sequence[float] = MU_CHOICES
) -> list[dict[str, Any]]:
    """For one tensor, per bit width and method: ``bits, method, mse, sqnr_db, mu`` (the μ kept, μ-law only) and
    ``levels`` (distinct int8-grid levels left after snapping). Uniform at 1 bit is absent: NaN MSE and SQNR."""
    w = w.detach().float().cpu()
    power = float((w.double() ** 2).mean())
    sorted_weights = SortedWeights.of(w)
    rows = []
    for b in bits:
        for method in CENTROID_METHODS:
            if method == "uniform" and b < 2:  # a symmetric grid with zero needs 3 codes
                rows.append({"bits": b, "method": method, "mse": math.nan, "sqnr_db": math.nan, "mu": math.nan,
                             "levels": math.nan})
                continue
            candidates = []
            for mu in mus if method == "mu_law" else (math.nan,):
                lut, scale = int8_grid_levels(w, b, method, mu, sorted_weights)
                candidates.append((quantization_mse(w, lut, scale), mu, lut.unique().numel()))
            mse, mu, levels = min(candidates, key=lambda c: c[0])
            rows.append({"bits": b, "method": method, "mse": mse, "sqnr_db": sqnr_db(power, mse), "mu": mu,
                         "levels": levels})
    return rows


def centroid_table(
    models: Mapping[str, nn.Module], bits: Iterable[int] = range(1, 9), mus: Sequence[float] = MU_CHOICES
) -> pd.DataFrame:
    """:func:`tensor_centroids` of every quantizable weight of every model. Columns: ``CENTROID_COLUMNS`` then
    ``mu``, ``levels``, ``numel`` and ``power`` (E[w²]), for summaries.

    Runs on one torch thread (restored afterwards): the work is many small operations (K-sized, or one search per
    tensor) that gain nothing from threads, and on a shared 2-core machine two threads made it 7× slower."""
    bits = list(bits)
    frames = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for model_name, model in models.items():
            for tensor in quantizable_parameters(model):
                w = model.get_parameter(tensor)
                rows = pd.DataFrame(tensor_centroids(w, bits, mus))
                power = float((w.detach().double() ** 2).mean())
                frames.append(rows.assign(model=model_name, tensor=tensor, numel=w.numel(), power=power))
    finally:
        torch.set_num_threads(threads)
    table = pd.concat(frames, ignore_index=True)
    return table[[*CENTROID_COLUMNS, "mu", "levels", "numel", "power"]]


def centroid_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, bits and method, over tensors: ``tensors``; ``sqnr_db_mean`` (mean of the tensors' SQNR);
    ``sqnr_db_pooled`` (10 log10 of Σ numel·E[w²] / Σ numel·MSE: the whole model's SQNR, large tensors weighing
    more); ``levels_mean`` (distinct int8-grid levels left); ``best_share`` (fraction of tensors where the method has
    the lowest MSE of the three)."""
    df = table.assign(signal=table.numel * table.power, noise=table.numel * table.mse)
    best = df.loc[df.mse.notna()].groupby(["model", "tensor", "bits"]).mse.transform("min")
    df["best"] = (df.mse == best.reindex(df.index)).astype(float)
    groups = df.groupby(["model", "bits", "method"], sort=False)
    summary = groups.agg(tensors=("tensor", "size"), sqnr_db_mean=("sqnr_db", "mean"), signal=("signal", "sum"),
                         noise=("noise", lambda s: s.sum(min_count=len(s))), levels_mean=("levels", "mean"),
                         best_share=("best", "mean")).reset_index()
    summary["sqnr_db_pooled"] = 10 * np.log10(summary.signal / summary.noise)
    summary.loc[summary.noise.isna(), "best_share"] = math.nan  # absent (uniform at 1 bit), not "never best"
    return summary[["model", "bits", "method", "tensors", "sqnr_db_mean", "sqnr_db_pooled", "levels_mean",
                    "best_share"]]
