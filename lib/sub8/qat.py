"""From "a trained baseline + a quantization method + a plan" to one results row, shared by notebooks 03 (S8BQAT),
04 (GQ) and 05 (native QAT); and the level comparison of notebook 02.

**Methods** are named hook factories in a registry: ``make_hooks(method, plan, **options)`` gives the
:class:`sub8.train.Hooks` that fine-tune a baseline with that method (None for the fp32 control). This module
registers the methods of issue 4 (weight-only, with a :class:`~sub8.quant.QuantPlan`), ``gq`` (issue 5: the General
Quantizer, trainable μ-law levels, per-tensor bits from a QuantPlan, 1 bit included) and ``native`` (issue 6: native
integer QAT of weights and activations, with a :class:`~sub8.quant.NativePlan`); another module adds its own with
:func:`register_method`. The hooks of a method that quantizes must have ``quantizers(model) -> {param name:
Quantizer}``: the quantizer whose ``quantize_int8`` gives each weight's device form after fine-tuning (for S8BQAT the
fixed Lloyd-Max LUTs, restored from the run's checkpoint; for uniform and native QAT the uniform quantizer recomputed
from the hard weights, which gives back the same codes). Evaluation runs inside the hooks' ``evaluating(model)``:
for ``native`` that re-applies the run's activation ranges, so the test split is decoded with weights AND
activations quantized and every matmul on integers, as the device runs it.

**A row** (``ROW_COLUMNS``), per (baseline, method, plan):

- ``bits``: the plan's bits per quantized weight (the weight-count-weighted mean for a mixed plan); 32 for fp32.
  (:func:`plan_bits`; for a NativePlan the weight bits: its activation bits are :func:`activation_bits`.)
- ``wer_test``, ``cer_test``: percent, on the test split, of the hard-quantized weights (what the device runs;
  with ``native``, activations quantized too).
- ``size_bytes_packed``: the bytes the device stores, by the method's registered ``size`` rule. By default
  :func:`sub8.quant.quantized_size_bytes` of the exported model: codes packed densely at b bits, each tensor's int8
  LUT and float32 scale(s), and every parameter left unquantized (biases, norms, and all of the fp32 control) at 4
  bytes. For ``native``: :func:`sub8.quant.native_size` ``["total"]``: codes packed densely at b_w bits with NO LUT
  (the device multiplies the symmetric integer codes directly), a float32 scale per output channel, a float32 scale
  and a one-byte zero point per activation site, and every other deployed parameter at 4 bytes.
- ``finetune_steps``, ``finetune_minutes``: the fine-tune's updates and wall-clock minutes (0 for PTQ).
- ``wer_delta_lo``, ``wer_delta_hi``: the 95% paired-bootstrap interval (1000 resamples over test utterances, seed
  0) of WER(this row) − WER(the same baseline in fp32), absolute points; an interval containing 0 means "not
  significantly different from fp32".

**Runs.** A fine-tune is the model ``runs/<profile>/models/<base>-<method>-<plan>`` (e.g. ``rnnt_large-s8bqat-4b``,
``rnnt_large-gq-mixed-lstm1b``: a :class:`NamedPlan` is labelled by its name, see :func:`plan_label`);
post-training quantization evaluates under ``<base>-ptq-<plan>``, so its cached hypotheses never mix with the
baseline's. Each run directory holds ``qat.json``: the baseline checkpoint's digest, the method, the plan and the
options. A run whose recorded settings differ from the ones asked for (a retrained baseline, other
hyper-parameters) is done again: its checkpoint and cached hypotheses belong to other settings.

**GQ (notebook 04).** :func:`gq_options` (the sharpness schedule scaled to the fine-tune), :func:`gq_sensitivity`
(per-layer sensitivities, measured once per baseline and cached), :func:`gq_auto_plan` (an ``auto-<b>b`` plan: the
least-sensitive bits within the packed size of the uniform b-bit plan), :func:`gq_table` and :func:`gq_claims` (gq.csv
and issue 5's targets), :func:`same_bits_table` (GQ against other methods at the same bits, paired) and
:func:`gq_level_snapshots` (levels before and after fine-tuning, for the figure).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from sub8.data.prepare import PreparedData
from sub8.evaluate import EvalResult, compare, compare_by_group
from sub8.experiment import evaluate_model, finetune, hooks_state, load_model, model_dir, train_loader
from sub8.io import atomic_write_text, load_checkpoint
from sub8.models import Transducer
from sub8.parallel import run_side_by_side
from sub8.profiles import Profile
from sub8.quant import (
    GQ,
    NATIVE_PLANS,
    S8BQAT,
    BitAllocation,
    GQQuantizer,
    GQSchedule,
    NativePlan,
    NativeQAT,
    QuantizedTensor,
    QuantPlan,
    Quantizer,
    UniformQAT,
    UniformQuantizer,
    allocate_bits,
    export_quantized,
    hard_quantize_,
    int8_levels,
    measure_sensitivity,
    native_plan,
    native_size,
    nearest_level,
    plan_quantizers,
    quantizable_parameters,
    quantized_size_bytes,
    snap_to_int8_grid,
)
from sub8.quant.allocate import DEFAULT_BITS as ALLOCATION_BITS
from sub8.quant.allocate import float_bytes
from sub8.quant.allocate import packed_bytes as tensor_packed_bytes
from sub8.quant.gq import DEFAULT_MU as GQ_DEFAULT_MU
from sub8.quant.lloyd_max import SortedWeights, lloyd_max
from sub8.quant.mu_law import mu_law_levels
from sub8.quant.native import activation_sites
from sub8.train import Hooks

ROW_COLUMNS = (
    "model", "method", "bits", "wer_test", "cer_test", "size_bytes_packed", "finetune_steps", "finetune_minutes",
    "wer_delta_lo", "wer_delta_hi",
)
FP32_BITS = 32

# ---------------------------------------------------------------------------------------------------------------
# The registry of fine-tuning methods

HooksFactory = Callable[..., "Hooks | None"]  # (plan | None, **options) -> hooks (None: plain fp32)
# (fine-tuned model with hard-quantized weights, plan, exported weights) -> bytes the device stores
SizeRule = Callable[[nn.Module, Any, Mapping[str, QuantizedTensor]], int]


def packed_size(model: nn.Module, plan: Any, exported: Mapping[str, QuantizedTensor]) -> int:
    """The default size rule: :func:`sub8.quant.quantized_size_bytes` (packed codes + int8 LUT + scales per
    exported tensor, every other deployed parameter at 4 bytes)."""
    return quantized_size_bytes(dict(exported), model)


@dataclass(frozen=True)
class _Method:
    factory: HooksFactory
    size: SizeRule = packed_size


_METHODS: dict[str, _Method] = {}


def register_method(name: str, factory: HooksFactory, *, size: SizeRule | None = None, replace: bool = False) -> None:
    """Make ``make_hooks(name, plan, **options)`` call ``factory(plan, **options)``. ``name`` becomes part of run
    directory names, so it is lower-case letters, digits and underscores. Re-registering a name needs ``replace``.

    ``size``: how a row counts the bytes the device stores for this method (``size(model, plan, exported)``; default
    :func:`packed_size`), for a method whose device form is not "codes through a LUT" (e.g. ``native``)."""
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise ValueError(f"register_method: {name!r} is not a method name (lower-case letters, digits, '_')")
    if name == "ptq":
        raise ValueError("register_method: 'ptq' is reserved for post-training quantization (ptq_row)")
    if name in _METHODS and not replace:
        raise ValueError(f"register_method: {name!r} is already registered (pass replace=True to change it)")
    _METHODS[name] = _Method(factory, size or packed_size)


def registered_methods() -> list[str]:
    """The names :func:`make_hooks` accepts, in registration order."""
    return list(_METHODS)


def make_hooks(method: str, plan: Any = None, **options: Any) -> Hooks | None:
    """The training hooks of ``method`` at ``plan`` (None for ``fp32_control``, which takes no plan).

    Raises ValueError for an unknown method (naming the known ones), a missing plan, or options the method does
    not take."""
    if method not in _METHODS:
        hint = " (post-training quantization is not a fine-tune: use ptq_row)" if method == "ptq" else ""
        raise ValueError(f"unknown QAT method {method!r}{hint}; registered: {', '.join(_METHODS)}")
    try:
        return _METHODS[method].factory(plan, **options)
    except TypeError as e:  # an option the method's constructor does not take
        raise ValueError(f"method {method!r}: bad options {sorted(options)}: {e}") from e


def _need_plan(method: str, plan: Any, kind: type = QuantPlan) -> Any:
    if not isinstance(plan, kind):
        raise ValueError(f"method {method!r} quantizes weights: give it a {kind.__name__}, got {plan!r}")
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
# Native integer QAT (issue 6): weights AND activations quantized, integer matmuls in the forward. Its size counts
# what that device stores (native_size: no LUT, per-channel and activation scales), not the LUT form of packed_size.
register_method(
    "native",
    lambda plan, **o: NativeQAT(_need_plan("native", plan, NativePlan), **o),
    size=lambda model, plan, exported: int(native_size(model, plan)["total"]),
)
# GQ (issue 5): trainable μ-law levels per tensor, bits per tensor from the plan (1 bit included). Its options are
# GQ's constructor arguments (gq_options gives the study's), recorded with the run. Packed size: the default rule (its
# LUT holds 2^b int8 entries, its codes b bits each).
register_method("gq", lambda plan, **o: GQ(_need_plan("gq", plan), **o))


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


def _pattern_tag(pattern: str) -> str:
    return "all" if pattern == "*" else re.sub(r"[^A-Za-z0-9.]+", "_", pattern.replace("*", "x")).strip("_")


# A plan label longer than this is replaced by a digest form (plan_label): a run directory name must stay well under
# the 255 bytes a file name may have, and an automatic plan names every weight (~40 rules for a Conformer).
MAX_PLAN_LABEL = 80
_PLAN_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")


class NamedPlan(QuantPlan):
    """A :class:`QuantPlan` with a short name, which is its label: tables (gq.csv's ``plan``) and run directories use
    it (``rnnt_large-gq-mixed-lstm1b``). The rules, not the name, are what a run records in its ``qat.json``: the same
    name with other rules is a changed setting and runs again.

    ``name``: lower-case letters, digits, ``_``, ``.``, ``-``, starting with a letter or digit (path-safe; ``-`` is
    fine inside a label: a run name splits into baseline and method at its first two ``-``, as baselines and methods
    have none)."""

    def __init__(self, name: str, rules: Iterable[tuple[str, int]] | dict[str, int]) -> None:
        super().__init__(rules)
        if not isinstance(name, str) or not _PLAN_NAME.fullmatch(name) or len(name) > MAX_PLAN_LABEL:
            raise ValueError(f"NamedPlan: {name!r} is not a plan name (lower-case letters, digits, '_', '.', '-'; "
                             f"at most {MAX_PLAN_LABEL} characters)")
        self.name = name

    def __repr__(self) -> str:
        return f"NamedPlan({self.name!r}, {self.rules!r})"


def plan_label(plan: QuantPlan | NativePlan) -> str:
    """Short, path-safe name of a plan.

    - :class:`NamedPlan`: its name (``mixed-lstm1b``, ``auto-4b``).
    - QuantPlan: ``"4b"`` for every weight at 4 bits, else ``"<pattern><bits>"`` per rule joined by ``_`` (``*`` →
      ``x``, ``"*"`` alone → ``all``), e.g. ``all4_joiner8``. A label longer than ``MAX_PLAN_LABEL`` characters (a
      plan naming many weights one by one) becomes ``"<n>rules_<digest>"``: the rule count and the first 12 hex
      digits of the SHA-256 of the rules, distinct per plan and path-safe; give such a plan a name instead
      (:class:`NamedPlan`) to make it readable.
    - NativePlan: the name of the named plan it equals (:func:`sub8.quant.native_plan`: ``w8a8``, ``w4a8``, ``w4a4``,
      ``mixed``; ``_attnfloat`` appended when the attention products are left in float), else
      ``"<pattern>w<w_bits>a<a_bits>"`` (``<pattern>fp`` for a rule that leaves targets in float) per rule joined by
      ``_``, e.g. ``allw8a8_joinerw4a4``."""
    if isinstance(plan, NativePlan):
        return _native_plan_label(plan)
    if not isinstance(plan, QuantPlan):
        raise TypeError(f"plan_label: no label for a {type(plan).__name__}; give a QuantPlan or a NativePlan")
    if isinstance(plan, NamedPlan):
        return plan.name
    if len(plan.rules) == 1 and plan.rules[0][0] == "*":
        return f"{plan.rules[0][1]}b"
    label = "_".join(f"{_pattern_tag(pattern)}{bits}" for pattern, bits in plan.rules)
    if len(label) <= MAX_PLAN_LABEL:
        return label
    digest = hashlib.sha256(json.dumps(plan.to_list()).encode()).hexdigest()[:12]
    return f"{len(plan.rules)}rules_{digest}"


def _native_plan_label(plan: NativePlan) -> str:
    # The named plans first: their names are what the notebooks and tables use, and they stay short (the mixed
    # plan's rules would give a run directory name of ~100 characters).
    for attention_products in (True, False):
        for encoder in ("conformer", "lstm"):
            for name in NATIVE_PLANS:
                try:
                    named = native_plan(name, encoder, attention_products)
                except ValueError:  # e.g. "mixed" has no LSTM form
                    continue
                if named == plan:
                    return name if attention_products else f"{name}_attnfloat"
    return "_".join(f"{_pattern_tag(pattern)}" + ("fp" if w_bits is None else f"w{w_bits}a{a_bits}")
                    for pattern, w_bits, a_bits in plan.rules)


def run_name(base: str, method: str, plan: QuantPlan | NativePlan | None = None, variant: str | None = None) -> str:
    """``<base>-<method>-<plan label>``, or ``<base>-<method>`` without a plan (the fp32 control); ``-<variant>``
    appended for a run of the same method and plan with other options (an ablation, e.g. ``hard_start``)."""
    if variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", variant):
        raise ValueError(f"run_name: a variant is letters, digits and '_', got {variant!r}")
    name = f"{base}-{method}" + (f"-{plan_label(plan)}" if plan is not None else "")
    return f"{name}-{variant}" if variant else name


def variant_of(profile: Profile, name: str, others: Iterable[str]) -> str | None:
    """The run among ``others`` that run ``name`` is a variant of (:func:`run_name`: the same method and plan, other
    options, named ``<run>-<variant>``), or None. Decided by what the runs recorded, not by the name alone (a plan
    label may hold ``-``): ``name`` must extend the other's name by ``-<variant>`` and both ``qat.json`` must hold
    the same baseline, method and plan."""

    def recorded(run: str) -> tuple | None:
        path = model_dir(profile, run) / "qat.json"
        if not path.is_file():
            return None
        spec = json.loads(path.read_text())
        return spec.get("base"), spec.get("method"), spec.get("plan")

    own = recorded(name)
    if own is None:
        return None
    for other in others:
        suffix = name[len(other) + 1 :] if name.startswith(f"{other}-") else ""
        if re.fullmatch(r"[A-Za-z0-9_]+", suffix) and recorded(other) == own:
            return other
    return None


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


def _spec(profile: Profile, base: str, method: str, plan: Any, options: Mapping[str, Any]) -> dict:
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
    """One evaluated run: ``name`` (its directory under ``runs/<profile>/models``), ``row`` (``ROW_COLUMNS``),
    ``test`` (per-utterance errors, for further paired comparisons), ``plan`` (the plan it ran; None for the fp32
    control, or where the maker did not say) and ``variant`` (see :func:`run_name`; None for the method's own
    settings)."""

    name: str
    row: dict[str, Any]
    test: EvalResult
    plan: QuantPlan | NativePlan | None = None
    variant: str | None = None


def fp32_result(data: PreparedData, base: str) -> EvalResult:
    """Test result of the fp32 baseline ``base`` (its cached hypotheses from notebook 01)."""
    return evaluate_model(data, base, load_model(data.profile, base))


def plan_bits(model: nn.Module, plan: QuantPlan | NativePlan) -> int | float:
    """The plan's bits when all weights share them, else the mean bits per quantized weight (weighted by size).

    For a NativePlan: its weight bits, over exactly the weights native QAT quantizes and exports
    (``NativeQAT.quantizers``: every Linear/Conv/Embedding weight and LSTM weight matrix the plan covers; biases and
    the attention products, which have no weights, are not counted)."""
    if isinstance(plan, NativePlan):
        sizes = [(model.get_parameter(name).numel(), q.bits) for name, q in NativeQAT(plan).quantizers(model).items()]
    else:
        sizes = [(model.get_parameter(name).numel(), bits) for name, bits in plan.resolve(model)]
    return _mean_bits(sizes)


def activation_bits(model: nn.Module, plan: NativePlan) -> int | float:
    """A NativePlan's activation bits when every activation site shares them, else their mean over sites, each site
    counted once (a site is one per-tensor range; its element count depends on the utterance, so it is not
    weighted). Sites are those with a calibrated range (:func:`sub8.quant.native.activation_sites`): the inputs of
    every quantized matmul and convolution and the Q, K, V operands of the attention products; the attention
    probabilities, on a fixed grid, have no range and are not counted."""
    return _mean_bits([(1, bits) for bits in activation_sites(model, plan).values()])


def _mean_bits(sizes: Sequence[tuple[int, int]]) -> int | float:
    """The common bits of ``(count, bits)`` pairs (an int), else the count-weighted mean."""
    if not sizes:
        raise ValueError("the plan quantizes nothing here")
    if len({bits for _, bits in sizes}) == 1:
        return sizes[0][1]
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
    plan: QuantPlan | NativePlan | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    variant: str | None = None,
    fp32: EvalResult | None = None,
    force: bool = False,
) -> MethodResult:
    """Fine-tune baseline ``base`` with ``method`` at ``plan`` on the profile's fine-tune schedule (skipped when the
    run finished with the same settings), evaluate the hard-quantized model on test (inside the hooks'
    ``evaluating``: as the device runs it), and make its row.

    Args:
        options: the method's hyper-parameters (e.g. :func:`s8bqat_options`), recorded with the run.
        variant: names a run whose ``options`` depart from the method's usual ones (:func:`run_name`), so it gets
            a directory of its own instead of replacing that run.
        fp32: the baseline's test result (:func:`fp32_result`), to save reloading it for every row.
    """
    options = dict(options or {})
    hooks = make_hooks(method, plan, **options)
    name = run_name(base, method, plan, variant)
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
    size = _METHODS[method].size(model, plan, exported)
    row = _row(base, method, bits, test, fp32, size, final["step"], final["seconds"] / 60)
    return MethodResult(name, row, test, plan, variant)


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of :func:`finetune_rows`: the arguments of a :func:`finetune_row` call."""

    base: str
    method: str
    plan: QuantPlan | NativePlan | None = None
    options: Mapping[str, Any] | None = None
    variant: str | None = None

    @property
    def name(self) -> str:
        return run_name(self.base, self.method, self.plan, self.variant)


def finetune_rows(
    data: PreparedData,
    jobs: Sequence[FineTune],
    *,
    fp32: Mapping[str, EvalResult] | None = None,
    force: bool = False,
) -> list[MethodResult]:
    """:func:`finetune_row` of every job, in order; the fine-tunes (and their test decodes) that are not finished run
    side by side first (:func:`sub8.parallel.run_side_by_side`, the profile's fine-tune threads each; the largest
    baselines' first, as they take longest). A run that appears twice runs once.

    ``fp32``: each baseline's test result (:func:`fp32_result`) by name, where the caller has it."""
    fp32 = dict(fp32 or {})
    unique = list({job.name: job for job in jobs}.values())
    pending = unique if force else [job for job in unique if not _finished(data.profile, job)]
    sizes = {base: sum(p.numel() for p in load_model(data.profile, base).parameters())
             for base in {job.base for job in pending}}
    pending.sort(key=lambda job: -sizes[job.base])
    run_side_by_side(_finetune_job, data, [(job, force) for job in pending], [job.name for job in pending],
                     data.profile.finetune.get("num_threads"))
    return [finetune_row(data, job.base, job.method, job.plan, job.options, variant=job.variant,
                         fp32=fp32.get(job.base))
            for job in jobs]


def _finished(profile: Profile, job: FineTune) -> bool:
    """Whether ``job``'s run finished with these settings: its recorded spec, final checkpoint and test decode."""
    run_dir = model_dir(profile, job.name)
    if not ((run_dir / "final.pt").is_file() and (run_dir / "eval_test.csv").is_file()
            and (run_dir / "qat.json").is_file()):
        return False
    spec = _spec(profile, job.base, job.method, job.plan, dict(job.options or {}))
    return json.loads((run_dir / "qat.json").read_text()) == spec


def _finetune_job(data: PreparedData, job: FineTune, force: bool) -> None:
    finetune_row(data, job.base, job.method, job.plan, job.options, variant=job.variant, force=force)


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
    return MethodResult(name, _row(base, "ptq", plan_bits(model, plan), test, fp32, size, 0, 0.0), test, plan)


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
# GQ (notebook 04)

GQ_COLUMNS = (
    "model", "plan", "mean_bits", "min_bits", "wer_test", "cer_test", "size_bytes_packed", "finetune_minutes",
    "wer_delta_lo", "wer_delta_hi",
)
SAME_BITS_COLUMNS = ("model", "bits", "method", "wer_gq", "wer_method", "diff_lo", "diff_hi")
# Issue 5's targets: GQ at 5 bits and below not significantly worse than fp32 (the interval's low end ≤ 0) with its
# point WER within 2% (relative) of fp32; a mixed plan with 1-bit layers within 5% (relative).
GQ_CLAIM_MAX_BITS = 5
GQ_MAX_WER_REL_PCT = 2.0
GQ_ONE_BIT_MAX_WER_REL_PCT = 5.0
SENSITIVITY_COLUMNS = ("model", "tensor", "numel", "bits", "loss_increase")


def gq_options(
    finetune_steps: int,
    mu: float = GQ_DEFAULT_MU,
    alpha_start: float = 1.0,
    alpha_hard: float = 128.0,
    anneal_fraction: float = 0.5,
    level_lr_scale: float = 1.0,
) -> dict[str, Any]:
    """GQ's hyper-parameters (the :class:`sub8.quant.GQ` arguments, recorded with each run) for a fine-tune of
    ``finetune_steps`` updates: α̂ anneals geometrically from ``alpha_start`` to ``alpha_hard`` over the first
    ``anneal_fraction`` of the updates (at least one), hard (straight-through on the int8-grid levels) after that.
    On the default profile's 200 updates: 100 soft, 100 hard (GQ's own default of 100 soft updates).
    ``anneal_fraction`` 0: no soft phase, hard from the first update (an ablation: what the soft phase adds)."""
    if not 0 <= anneal_fraction <= 1:
        raise ValueError(f"gq_options: anneal_fraction must be in [0, 1], got {anneal_fraction}")
    anneal_steps = max(1, round(finetune_steps * anneal_fraction)) if anneal_fraction > 0 else 0
    return {"mu": float(mu), "alpha_start": float(alpha_start), "alpha_hard": float(alpha_hard),
            "anneal_steps": anneal_steps, "level_lr_scale": float(level_lr_scale)}


def gq_schedule(options: Mapping[str, Any]) -> GQSchedule:
    """The α̂ schedule GQ runs with ``options`` (:func:`gq_options`), GQ's defaults for what they leave out."""
    return make_hooks("gq", QuantPlan.uniform(8), **options).schedule


def gq_plan_name(plan: QuantPlan) -> str:
    """gq.csv's ``plan``: ``uniform-<b>`` for every weight at b bits, a :class:`NamedPlan`'s name (``mixed-<name>``,
    ``auto-<b>b``), else :func:`plan_label`."""
    if not isinstance(plan, NamedPlan) and len(plan.rules) == 1 and plan.rules[0][0] == "*":
        return f"uniform-{plan.rules[0][1]}"
    return plan_label(plan)


def plan_size_bytes(model: nn.Module, plan: QuantPlan) -> int:
    """The packed bytes of ``model`` under ``plan`` with one codebook per tensor, as a GQ (or S8BQAT) row counts them
    (:func:`packed_size`): per planned weight ⌈N·b/8⌉ code bytes + a 2^b-entry int8 LUT + a float32 scale, and 4
    bytes for every other deployed parameter (not the training-only CTC head). Known before any training: the
    budget of an automatic plan."""
    resolved = dict(plan.resolve(model))
    size = sum(tensor_packed_bytes(model.get_parameter(name).numel(), bits) for name, bits in resolved.items())
    return size + float_bytes(model, resolved)


def _sensitivity_path(profile: Profile, base: str) -> Path:
    return profile.runs_dir / "gq" / f"sensitivity_{base}.json"


def _sensitivity_spec(data: PreparedData, base: str, num_batches: int, bits: Sequence[int], seed: int) -> dict:
    """What a cached sensitivity measurement was made on."""
    return {"base": base, "base_digest": checkpoint_digest(data.profile, base), "bits": sorted(set(bits)),
            "num_batches": num_batches, "seed": seed, "batch_frames": data.profile.batch_frames}


def _sensitivity_cached(data: PreparedData, base: str, num_batches: int, bits: Sequence[int], seed: int) -> bool:
    path = _sensitivity_path(data.profile, base)
    spec = _sensitivity_spec(data, base, num_batches, bits, seed)
    return path.is_file() and json.loads(path.read_text())["spec"] == spec


def gq_sensitivity(
    data: PreparedData,
    base: str,
    num_batches: int = 4,
    bits: Sequence[int] = ALLOCATION_BITS,
    seed: int = 0,
    force: bool = False,
) -> dict[str, dict[int, float]]:
    """:func:`sub8.quant.measure_sensitivity` of baseline ``base``: ``{weight: {bits: training-loss increase}}`` with
    only that weight quantized (per-tensor levels on the int8 grid), on the first ``num_batches`` training batches of
    the loader with ``seed``, in its order (the same batches for every weight and width; unaugmented).

    Cached in ``runs/<profile>/gq/sensitivity_<base>.json`` with what it was measured on (the baseline checkpoint's
    digest, the widths, the batches); measured again when any of that changed, or with ``force``: on the default
    profile a Conformer costs ~40 weights × 7 widths × ``num_batches`` forwards."""
    if num_batches < 1:
        raise ValueError(f"gq_sensitivity: num_batches must be >= 1, got {num_batches}")
    spec = _sensitivity_spec(data, base, num_batches, bits, seed)
    path = _sensitivity_path(data.profile, base)
    if path.is_file() and not force:
        cached = json.loads(path.read_text())
        if cached["spec"] == spec:
            return {name: {int(b): v for b, v in row.items()} for name, row in cached["sensitivity"].items()}
    model = load_model(data.profile, base)
    loader, batches = train_loader(data, seed), []
    while len(batches) < num_batches:  # into the next epoch(s) when one has fewer batches (a tiny corpus)
        batches += itertools.islice(iter(loader), num_batches - len(batches))
    # As many CPU threads as the profile's fine-tunes use (smoke: 1; None: torch's default). On the shared 2-core
    # machine two threads made the smoke measurement 7-15× slower than one.
    threads = torch.get_num_threads()
    if data.profile.finetune.get("num_threads"):
        torch.set_num_threads(data.profile.finetune["num_threads"])
    try:
        table = measure_sensitivity(model, batches, spec["bits"])
    finally:
        torch.set_num_threads(threads)
    atomic_write_text(path, json.dumps({"spec": spec, "sensitivity": table}, indent=1) + "\n")
    return table


def gq_sensitivities(
    data: PreparedData,
    bases: Sequence[str],
    num_batches: int = 4,
    bits: Sequence[int] = ALLOCATION_BITS,
    seed: int = 0,
    force: bool = False,
) -> dict[str, dict[str, dict[int, float]]]:
    """:func:`gq_sensitivity` of every baseline in ``bases`` (by name), measured side by side
    (:func:`sub8.parallel.run_side_by_side`, the profile's fine-tune threads each) where not cached."""
    pending = [base for base in bases if force or not _sensitivity_cached(data, base, num_batches, bits, seed)]
    run_side_by_side(_sensitivity_job, data, [(base, num_batches, tuple(bits), seed, force) for base in pending],
                     pending, data.profile.finetune.get("num_threads"))
    return {base: gq_sensitivity(data, base, num_batches, bits, seed) for base in bases}


def _sensitivity_job(data: PreparedData, base: str, num_batches: int, bits: Sequence[int], seed: int,
                     force: bool) -> None:
    gq_sensitivity(data, base, num_batches, bits, seed, force)


def sensitivity_table(sensitivities: Mapping[str, Mapping[str, Mapping[int, float]]],
                      models: Mapping[str, nn.Module]) -> pd.DataFrame:
    """``{model: gq_sensitivity(...)}`` as a long table (``SENSITIVITY_COLUMNS``), weights in model order."""
    rows = [{"model": model, "tensor": name, "numel": models[model].get_parameter(name).numel(), "bits": b,
             "loss_increase": value}
            for model, table in sensitivities.items() for name, row in table.items() for b, value in row.items()]
    return pd.DataFrame(rows, columns=list(SENSITIVITY_COLUMNS))


def gq_auto_plan(
    model: nn.Module, sensitivity: Mapping[str, Mapping[int, float]], budget_bits: int
) -> tuple[NamedPlan, BitAllocation]:
    """The automatic plan ``auto-<budget_bits>b``: per weight the bits (among those measured) that minimise the
    summed sensitivity (:func:`sub8.quant.allocate_bits`, exact) within the packed size of the same model with every
    weight at ``budget_bits`` (:func:`plan_size_bytes`). Returns the plan (every measured weight named) and the
    allocation (its bytes, the predicted loss increase).

    The fixed part of the budget is the deployed float parameters, as :func:`plan_size_bytes` and the rows count
    them (:func:`sub8.quant.allocate.float_bytes`)."""
    budget = plan_size_bytes(model, QuantPlan.uniform(budget_bits))
    numels = {name: model.get_parameter(name).numel() for name in sensitivity}
    allocation = allocate_bits({k: dict(v) for k, v in sensitivity.items()}, numels, budget,
                               fixed_bytes=float_bytes(model, numels))
    return NamedPlan(f"auto-{budget_bits}b", list(allocation.bits.items())), allocation


def gq_table(profile: Profile, results: Iterable[MethodResult]) -> pd.DataFrame:
    """gq.csv (``GQ_COLUMNS``) from ``gq`` fine-tune results (:func:`finetune_row`).

    ``plan``: :func:`gq_plan_name` of the result's plan; ``mean_bits``: the row's ``bits`` (:func:`plan_bits`: mean
    over quantized weights, weighted by size); ``min_bits``: the fewest bits of any weight the run quantized (from its
    checkpointed GQ state); the other columns are the row's."""
    rows = []
    for result in results:
        row = result.row
        if row["method"] != "gq":
            raise ValueError(f"gq_table: {result.name} is a {row['method']!r} run, not a 'gq' one")
        if result.plan is None:
            raise ValueError(f"gq_table: {result.name} does not say its plan (make it with finetune_row)")
        rows.append({
            "model": row["model"], "plan": gq_plan_name(result.plan), "mean_bits": row["bits"],
            "min_bits": min(hooks_state(profile, result.name)["bits"]), "wer_test": row["wer_test"],
            "cer_test": row["cer_test"], "size_bytes_packed": row["size_bytes_packed"],
            "finetune_minutes": row["finetune_minutes"], "wer_delta_lo": row["wer_delta_lo"],
            "wer_delta_hi": row["wer_delta_hi"],
        })
    return pd.DataFrame(rows, columns=list(GQ_COLUMNS))


def _wer_rel_pct(wer: float, fp32: float) -> float:
    """100 · (WER − WER_fp32) / WER_fp32; with WER_fp32 = 0: 0 if WER is 0 too, else inf."""
    return 100 * (wer - fp32) / fp32 if fp32 > 0 else (0.0 if wer == 0 else math.inf)


def gq_claims(table: pd.DataFrame, fp32_wer: Mapping[str, float]) -> pd.DataFrame:
    """Issue 5's targets, measured on ``table`` (:func:`gq_table`); ``fp32_wer``: each model's fp32 test WER. One row
    per (model, plan, claim), ``CLAIM_COLUMNS``, ``holds`` a bool:

    - every ``uniform-<b>`` plan with b ≤ 5: "not significantly worse than fp32" (``wer_delta_lo`` ≤ 0) and "WER
      within 2% relative of fp32" (100 · (WER − WER_fp32) / WER_fp32 ≤ 2; with WER_fp32 = 0 only WER = 0 holds);
    - every other plan with a 1-bit layer (``min_bits`` = 1: the mixed plans that have one, and an automatic plan
      that chose one): "1-bit layers: WER within 5% relative of fp32".
    Other rows have no target and are not listed."""
    rows = []
    for r in table.itertuples():
        rel = _wer_rel_pct(r.wer_test, fp32_wer[r.model])
        uniform = r.plan.startswith("uniform-")
        if uniform and r.mean_bits <= GQ_CLAIM_MAX_BITS:
            rows += [
                (r.model, r.plan, "not significantly worse than fp32", "wer_delta_lo <= 0", r.wer_delta_lo,
                 bool(r.wer_delta_lo <= 0)),
                (r.model, r.plan, f"WER within {GQ_MAX_WER_REL_PCT:g}% relative of fp32",
                 f"wer_rel_pct <= {GQ_MAX_WER_REL_PCT:g}", rel, bool(rel <= GQ_MAX_WER_REL_PCT)),
            ]
        elif not uniform and r.min_bits == 1:
            rows.append((r.model, r.plan, f"1-bit layers: WER within {GQ_ONE_BIT_MAX_WER_REL_PCT:g}% relative of fp32",
                         f"wer_rel_pct <= {GQ_ONE_BIT_MAX_WER_REL_PCT:g}", rel,
                         bool(rel <= GQ_ONE_BIT_MAX_WER_REL_PCT)))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def same_bits_table(gq_results: Iterable[MethodResult], others: Iterable[MethodResult]) -> pd.DataFrame:
    """GQ against other methods at the same bits, paired on the test utterances (``SAME_BITS_COLUMNS``).

    One row per pair of a GQ result and a result of another method with the same model, both with every weight at
    the same bits (uniform plans): ``wer_gq``, ``wer_method`` (%), and ``diff_lo``, ``diff_hi``: the 95%
    paired-bootstrap interval of WER(GQ) − WER(method), absolute points (below 0 throughout: GQ is better)."""
    def uniform_bits(result: MethodResult) -> int | None:
        plan = result.plan
        if isinstance(plan, QuantPlan) and len(plan.rules) == 1 and plan.rules[0][0] == "*":
            return plan.rules[0][1]
        return None

    others = [r for r in others if uniform_bits(r) is not None]
    rows = []
    for g in gq_results:
        bits = uniform_bits(g)
        if g.row["method"] != "gq" or bits is None:
            continue
        for o in others:
            if o.row["model"] == g.row["model"] and uniform_bits(o) == bits and o.row["method"] != "gq":
                diff = compare(g.test, o.test)
                rows.append({"model": g.row["model"], "bits": bits, "method": o.row["method"],
                             "wer_gq": g.row["wer_test"], "wer_method": o.row["wer_test"], "diff_lo": diff.lo,
                             "diff_hi": diff.hi})
    return pd.DataFrame(rows, columns=list(SAME_BITS_COLUMNS))


CONTROL_COLUMNS = ("model", "method", "plan", "wer_test", "wer_control", "diff_lo", "diff_hi")
CONTROL_GROUP_COLUMNS = ("model", "method", "plan", "variant", "group", "utterances", "words", "wer_test",
                         "wer_control", "diff_lo", "diff_hi")


def _with_controls(results: Iterable[MethodResult], controls: Mapping[str, MethodResult],
                   plan_name: Callable[[Any], str]) -> Iterator[tuple[MethodResult, MethodResult, dict[str, Any]]]:
    """(result, its model's control, the row's model/method/plan) for each result."""
    for r in results:
        model = r.row["model"]
        control = controls[model]
        if control.row["method"] != "fp32_control":
            raise ValueError(f"control tables: {control.name} is not an fp32_control run")
        yield r, control, {"model": model, "method": r.row["method"], "plan": plan_name(r.plan) if r.plan else ""}


def control_table(results: Iterable[MethodResult], controls: Mapping[str, MethodResult],
                  plan_name: Callable[[Any], str] = plan_label) -> pd.DataFrame:
    """Each result against its model's **fp32 control** (the baseline fine-tuned in fp32 for the same updates:
    ``finetune_row(data, model, "fp32_control")``), paired on the test utterances (``CONTROL_COLUMNS``).

    A quantized run better than the fp32 baseline may only show that the baseline had not converged; against the
    control, the same extra training is on both sides. ``diff_lo``, ``diff_hi``: the 95% paired-bootstrap interval
    of WER(result) − WER(control), absolute points; ``plan``: ``plan_name`` of the run's plan (empty without one;
    e.g. :func:`gq_plan_name` to match notebook 04's table)."""
    rows = []
    for r, control, run in _with_controls(results, controls, plan_name):
        diff = compare(r.test, control.test)
        rows.append({**run, "wer_test": r.row["wer_test"], "wer_control": control.row["wer_test"], "diff_lo": diff.lo,
                     "diff_hi": diff.hi})
    return pd.DataFrame(rows, columns=list(CONTROL_COLUMNS))


def control_group_table(results: Iterable[MethodResult], controls: Mapping[str, MethodResult],
                        grouping: str | None, plan_name: Callable[[Any], str] = plan_label) -> pd.DataFrame:
    """:func:`control_table` broken down by ``grouping`` (e.g. "engine", the synthesizer of the synthetic corpus;
    :func:`sub8.evaluate.compare_by_group`): one row per run and group, the whole split first as group "all" (only
    that row with ``grouping`` None, for a corpus without such metadata). The runs' ``variant`` ("" for none) tells
    ablations of one plan apart (``CONTROL_GROUP_COLUMNS``)."""
    rows = []
    for r, control, run in _with_controls(results, controls, plan_name):
        for group in compare_by_group(r.test, control.test, grouping).itertuples(index=False):
            rows.append({**run, "variant": r.variant or "", "group": group.group, "utterances": group.utterances,
                         "words": group.words, "wer_test": group.wer_a, "wer_control": group.wer_b,
                         "diff_lo": group.diff_lo, "diff_hi": group.diff_hi})
    return pd.DataFrame(rows, columns=list(CONTROL_GROUP_COLUMNS))


@dataclass
class LevelSnapshot:
    """One GQ tensor's levels before and after fine-tuning, on the int8 grid (what the device runs).

    ``weights``: the baseline's float weights (flattened), which GQ started from; ``before``: GQ's initial levels
    for them (even u, least-squares s; :meth:`sub8.quant.GQQuantizer.fit`); ``after``: the trained levels (the
    run's final s and u), where the fine-tuned weights now sit; ``counts``: how many fine-tuned weights sit on each
    level of ``after``; ``scale_before``, ``scale_after``: s."""

    tensor: str
    bits: int
    weights: np.ndarray
    before: np.ndarray
    after: np.ndarray
    counts: np.ndarray
    scale_before: float
    scale_after: float


def gq_level_snapshots(
    profile: Profile, base: str, run: str, tensors: Sequence[str] | None = None
) -> list[LevelSnapshot]:
    """:class:`LevelSnapshot` of ``tensors`` (default: every tensor the run quantized) of the GQ run ``run`` of
    baseline ``base``: the initial levels are fitted again to the baseline's weights, exactly as the run's
    ``on_train_start`` did (the fit is deterministic), the trained ones come from the run's checkpointed state."""
    state = hooks_state(profile, run)
    bits = dict(zip(state["names"], state["bits"], strict=True))
    hooks = make_hooks("gq", QuantPlan(list(bits.items())), mu=state["mu"])
    hooks.load_state_dict(state)
    baseline, tuned = load_model(profile, base), load_model(profile, run)
    snapshots = []
    for name in tensors if tensors is not None else list(bits):
        if name not in bits:
            raise ValueError(f"gq_level_snapshots: {run} did not quantize {name!r}; it quantized {list(bits)}")
        w0, w1 = baseline.get_parameter(name).detach(), tuned.get_parameter(name).detach()
        start, trained = GQQuantizer.fit(w0, bits[name], state["mu"]), hooks.tensors[name]
        before, after = int8_levels(*start.int8_grid(w0)), int8_levels(*trained.int8_grid(w1))
        counts = torch.bincount(nearest_level(w1, after).reshape(-1), minlength=after.numel())
        snapshots.append(LevelSnapshot(
            name, bits[name], w0.reshape(-1).numpy().copy(), before.numpy(), after.numpy(), counts.numpy(),
            float(start.log_scale.detach().exp()), float(trained.log_scale.detach().exp()),
        ))
    return snapshots


# ---------------------------------------------------------------------------------------------------------------
# Native integer QAT (notebook 05)

NATIVE_COLUMNS = (
    "model", "plan", "w_bits", "a_bits", "wer_test", "cer_test", "size_bytes", "size_ratio_vs_fp32",
    "finetune_minutes", "wer_delta_lo", "wer_delta_hi",
)
# Issue 6's targets for the Conformer: w4a8 not significantly worse than fp32 (the interval's low end ≤ 0), its point
# WER within 3% (relative) of fp32, at ≥ 7× less storage than fp32 (scales counted); the mixed 4/8 plan ≥ 5×.
W4A8_MAX_WER_REL_PCT = 3.0
W4A8_MIN_SIZE_RATIO = 7.0
MIXED_MIN_SIZE_RATIO = 5.0
CLAIM_COLUMNS = ("model", "plan", "claim", "target", "measured", "holds")


def native_table(profile: Profile, results: Iterable[MethodResult]) -> pd.DataFrame:
    """Notebook 05's table (``NATIVE_COLUMNS``) from ``native`` fine-tune results (:func:`finetune_row`).

    ``plan``: :func:`plan_label` of the run's plan (read back from its checkpoint); ``w_bits``: the row's ``bits``
    (:func:`plan_bits`: mean over quantized weights, weighted by size); ``a_bits``: :func:`activation_bits` (mean over
    activation sites); ``size_bytes``: the row's ``size_bytes_packed``, i.e. :func:`sub8.quant.native_size`
    ``["total"]`` (checked here); ``size_ratio_vs_fp32``: the deployed float32 bytes ÷ ``size_bytes``."""
    rows = []
    for result in results:
        row = result.row
        if row["method"] != "native":
            raise ValueError(f"native_table: {result.name} is a {row['method']!r} run, not a 'native' one")
        plan = NativePlan.from_list(hooks_state(profile, result.name)["plan"])
        model = load_model(profile, result.name)
        size = native_size(model, plan)
        if size["total"] != row["size_bytes_packed"]:
            raise RuntimeError(f"{result.name}: the row's size {row['size_bytes_packed']} is not native_size's "
                               f"{size['total']}")
        rows.append({
            "model": row["model"], "plan": plan_label(plan), "w_bits": row["bits"],
            "a_bits": activation_bits(model, plan), "wer_test": row["wer_test"], "cer_test": row["cer_test"],
            "size_bytes": row["size_bytes_packed"], "size_ratio_vs_fp32": size["fp32"] / size["total"],
            "finetune_minutes": row["finetune_minutes"], "wer_delta_lo": row["wer_delta_lo"],
            "wer_delta_hi": row["wer_delta_hi"],
        })
    return pd.DataFrame(rows, columns=list(NATIVE_COLUMNS))


def native_claims(table: pd.DataFrame, fp32_wer: Mapping[str, float], conformers: Iterable[str]) -> pd.DataFrame:
    """Issue 6's targets, measured on ``table`` (:func:`native_table`) for each Conformer in ``conformers`` that ran
    the plan concerned. ``fp32_wer``: each model's fp32 test WER (notebook 01). One row per (model, claim):
    ``CLAIM_COLUMNS``, ``holds`` a bool (a claim whose row is missing is not listed).

    - w4a8, "not significantly worse than fp32": ``wer_delta_lo`` ≤ 0.
    - w4a8, "WER within 3% relative": 100 · (WER − WER_fp32) / WER_fp32 ≤ 3 (with WER_fp32 = 0: holds only at 0).
    - w4a8, "≥ 7× smaller": ``size_ratio_vs_fp32`` ≥ 7; mixed, "≥ 5× smaller": ≥ 5."""
    rows = []
    by = table.set_index(["model", "plan"])
    for model in conformers:
        if (model, "w4a8") in by.index:
            r = by.loc[(model, "w4a8")]
            fp32 = fp32_wer[model]
            rel = 100 * (r.wer_test - fp32) / fp32 if fp32 > 0 else (0.0 if r.wer_test == 0 else math.inf)
            rows += [
                (model, "w4a8", "not significantly worse than fp32", "wer_delta_lo <= 0", r.wer_delta_lo,
                 bool(r.wer_delta_lo <= 0)),
                (model, "w4a8", "WER within 3% relative of fp32", f"wer_rel_pct <= {W4A8_MAX_WER_REL_PCT:g}", rel,
                 bool(rel <= W4A8_MAX_WER_REL_PCT)),
                (model, "w4a8", "size reduction vs fp32", f"ratio >= {W4A8_MIN_SIZE_RATIO:g}", r.size_ratio_vs_fp32,
                 bool(r.size_ratio_vs_fp32 >= W4A8_MIN_SIZE_RATIO)),
            ]
        if (model, "mixed") in by.index:
            r = by.loc[(model, "mixed")]
            rows.append((model, "mixed", "size reduction vs fp32", f"ratio >= {MIXED_MIN_SIZE_RATIO:g}",
                         r.size_ratio_vs_fp32, bool(r.size_ratio_vs_fp32 >= MIXED_MIN_SIZE_RATIO)))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


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
