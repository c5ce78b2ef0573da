"""GQ, the General Quantizer (design.md §5): soft-to-hard quantization with trainable levels in a μ-law space.

Per tensor, K = 2^b levels ``c_k = s · F⁻¹_μ(u_k)`` (:func:`sub8.quant.mu_law.mu_law_expand`), with a trainable
scale ``s`` and trainable ``u_k`` in [−1, 1], sorted. During training a weight ``w`` is replaced by its soft value
``w̃ = Σ_k softmax_k(−α (w − c_k)² / s²) c_k``, with the sharpness α annealed upward; once α passes its hard
threshold the forward uses ``w̃ + stopgrad(Q(w) − w̃)`` (the nearest level, with the soft gradient). At the end the
weights are hard-quantized onto the levels snapped to the int8 grid. No regularizer: the task loss alone moves the
weights, ``s`` and ``u``.

As in torchao's PARQ the quantizer (:class:`GQQuantizer`, one per tensor: its levels, its soft assignment) is
separate from how it takes part in training (:class:`GQ`, the :class:`sub8.train.Hooks`): a parametrization
(``torch.nn.utils.parametrize``, as :class:`sub8.quant.apply.UniformQAT`) replaces each planned weight, so nn.LSTM
still runs its fused kernel on the quantized matrices.

Usage, as for the other hooks::

    hooks = GQ(QuantPlan([("*", 4), ("joiner", 2), ("transcriber.lstm.weight_hh_l2", 1)]), anneal_steps=100)
    train(model, loader, cfg, run_dir, hooks)             # ends with a plain, hard-quantized model
    exported = export_quantized(model, hooks.quantizers())  # codes, int8 LUT and scale per tensor

Design decisions, and why:

- ``s = exp(log_s)``: positive without a constraint, and Adam moves it by a relative amount per step, whatever the
  tensor's magnitude.
- ``u`` is a free Parameter, projected after every update: clamped to [−1, 1] and sorted. The quantizer depends
  only on the SET of levels (the soft assignment sums over all of them), so sorting is a relabelling that changes
  no value; the optimizer's per-level state (Adam's moments) is permuted along, so each level keeps its own
  history. Clamping is the Euclidean projection onto the box. Alternatives were worse: a cumulative softmax of
  gap logits cannot start from the even grid (its end levels sit at ±1, gaps of 0, logits of −∞) and couples
  every level's gradient to every other's; sort+clamp inside the forward would zero the gradient of a clamped
  level. The forward still sorts the (K,) levels itself (differentiably), so a caller that skips the projection
  (a benchmark) still gets a correct nearest-level search.
- Sharpness: α = α̂ / g₀², where g₀ is the smallest gap between the initial levels in units of ``s`` (a constant of
  b and μ). The logit difference between the two nearest levels of a weight on a level, in the densest region, is
  then α̂, the same meaning at every bit width (the raw α needed at 8 bits is ~10⁵ × that at 1 bit).
- Schedule: α̂ grows geometrically from ``alpha_start`` (1) at update 0 to ``alpha_hard`` (128) at update
  ``anneal_steps`` (100); from then on the forward is hard (straight-through, on the int8-grid levels) and α̂ stays
  at ``alpha_hard``: the backward needs a finite sharpness (at α = ∞, ∂w̃/∂w = 0).
  Why a high threshold and a short soft phase: with no regularizer, the soft forward rewards a weight for sitting
  in the transition band between two levels, where w̃ takes intermediate values (a weight exactly at a midpoint
  keeps w̃ at the midpoint for any α), and at the switch to hard such weights jump. The band narrows as 1/α̂. On a
  teacher-student toy (2-layer MLP, the first layer quantized, 300 Adam updates at lr 3e-4 decaying linearly;
  mean squared error of the exported model; straight-through training on fixed Lloyd-Max levels reached 0.0044,
  0.0017, 0.0006 at 1, 2, 3 bits), α_hard = 8 after 200 soft updates gave 0.0058, 0.0033, 0.0010 and
  α_hard = 128 after 100 gave 0.0045, 0.0005, 0.0001. With all three layers of a deeper MLP quantized (STE:
  0.0017, 0.0006, 0.0002), (200, 8) gave 0.0017, 0.0012, 0.0003, (100, 128) 0.0017, 0.0005, 0.0001, and a hard
  forward from the start at α̂ = 128 0.0055, 0.0027, 0.0007: the soft phase is what lets the weights move (at
  α̂ = 128 a weight away from every decision boundary gets an exactly zero gradient), the sharp hard phase what
  settles them. Toys, not ASR: notebook 04 ablates this on the transducers (no soft phase, α̂ from 16, a
  25-update anneal, fixed levels). There the start at α̂ = 1 cost both Conformers WER on an unseen synthesis
  engine, which no soft phase or α̂ from 16 avoided, while on the RNN-Ts no variant did better than this schedule.
- Only the few nearest levels: each weight looks at a window of ``window`` (default 4) consecutive levels, the two
  that bracket it and one more on each side (shifted inward at the ends, so always ``min(window, K)`` real levels;
  a 1- or 2-bit tensor sees all its levels). A level outside the window is at least two gaps g beyond the
  nearer bracket, so relative to the nearest level its softmax weight is at most exp(−4 β g²); with the initial
  levels that is exp(−4 α̂) in the densest region (2 % at α̂ = 1, 10⁻¹⁴ at α̂ = 8) and less where the μ-law gaps
  widen. Memory and time are O(N · window), never O(N · K). Once β is so high that every level beyond the two
  brackets weighs less than float32 resolves (β g_min² >= 17, g_min the smallest gap; from ~60 % of the anneal on,
  and the whole hard phase), the window is the two brackets, in closed form (a sigmoid of the logit difference,
  every operation on n-vectors): ~4 × fewer operations than a window of four.
- The cell of each weight (which two levels bracket it) comes from a uniform bin table over the level range plus
  one compare (:class:`_CellIndex`), exact like a binary search but ~5 × cheaper than torch's searchsorted, which
  cost more than everything else together at 8 bits.
- A custom autograd.Function (:func:`soft_quantize`): the forward keeps only each weight's cell (one byte) for the
  backward, which recomputes the window terms chunk by chunk (``chunk_size`` weights at a time); training holds
  the soft weights (N floats per tensor, as any fake quantization does), the cells and one chunk of scratch.
  Autograd would have kept ~6 (window, N) tensors per weight tensor until the backward. In PyTorch ops (the CUDA
  path) the whole soft forward and backward is ~30 passes over (window, chunk) blocks, one gather of the window,
  one scatter-add of the level gradients, and window exps per weight: ~51 ns a weight on this 2-core CPU with a
  window of four, ~25 ns with two or in the hard phase (forward and backward together, 1.6M weights at 8 bits, one
  thread; ``benchmarks/kernels.py``). On the CPU the same formulas run in one C kernel per direction
  (``sub8.quant.kernels``: 256-weight tiles through vectorized loops, exp by a polynomial): ~19 ns and ~11-12 ns.
- Initial ``s``: u starts evenly spaced (design.md §5); ``s`` is the value on a log grid of max|w| · [10⁻³, 1]
  that minimises the mean squared error of hard quantization on a strided sample of ``w`` (deterministic, no RNG,
  so resumed and straight runs match).
- μ = 4 by default: with u even and the best s, the initial levels' squared error was 1.0–1.2 × Lloyd-Max's for
  Gaussian weights at 1–6 bits, 1.0–1.4 × for Laplace, 1.2–1.6 × for layers of a partly trained baseline at 2–4
  bits; heavier tails (Student-t, 4 degrees of freedom) want larger μ at 5–6 bits (2.4–4.4 × at μ = 4). Larger μ
  was worse on all but those; the levels move from this start in training anyway.
- nn.LSTM reads each weight up to four times per forward; a parametrization reuses its output until the backward
  has consumed it (:class:`_Reusable`), so the fused LSTM kernel costs one GQ evaluation per weight too. (sub8.train
  runs its forward under ``parametrize.cached()``, which does the same for every parametrization; the reuse keeps
  GQ as cheap in a training loop without it.)
- No bool tensors in the per-weight passes: a comparison is made into a float tensor and selects by ``lerp``
  (:func:`_select`); ``torch.where`` on this CPU cost 30x a float multiply.
- Evaluation (a module in eval mode, e.g. the dev evaluation during training) always runs the int8-grid
  hard-quantized weights, cached until the weight, ``s`` or ``u`` changes (greedy decoding reads the predictor and
  joiner weights at every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sub8.quant import kernels
from sub8.quant.apply import hard_quantize_
from sub8.quant.base import Quantizer, dequantize, int8_levels, nearest_level, snap_to_int8_grid
from sub8.quant.mu_law import even_grid, mu_law_expand
from sub8.quant.plan import QuantPlan
from sub8.train import Hooks

DEFAULT_MU = 4.0  # see the module docstring
DEFAULT_WINDOW = 4
DEFAULT_CHUNK_SIZE = 1 << 16  # weights per chunk: ~6 MB of scratch; larger chunks measured slower (cache)
# Logits relative to the nearest level's are clamped here before exp: exp(-64) ~ 1e-28 is nothing next to Z >= 1,
# and exp of a logit in the float32 underflow range runs a slow path, ~10x slower per element on this CPU. Once
# the sharpness is high most window terms land there: unclamped, exp was ~30% of an RNN-T GQ step.
LOGIT_FLOOR = -64.0
# exp(-17) < 2^-24: a level whose logit is this far below the nearest level's cannot change a float32 sum with Z >= 1.
PAIR_LOGIT_GAP = 17.0
KERNEL_MAX_WINDOW = 16  # the C kernel's GQ_MAX_WIDTH: wider windows (a caller's choice) run the PyTorch version


def _rows_at(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[:, index]``, (R, n), by one 1-D ``index_select`` per row: on this CPU a gather along dim 1 of the
    (R, ·) table took ~1.5-2x as long, and advanced indexing ~3x."""
    out = table.new_empty((table.shape[0], index.numel()))
    for row, dst in zip(table, out):
        torch.index_select(row, 0, index, out=dst)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The soft assignment over a window of nearest levels


class _CellTables:
    """Per-call (K-sized) tables over the K − 1 cells [c_i, c_(i+1)]. A weight in cell i looks at the W consecutive
    levels starting at ``start_i = clamp(i − W/2 + 1, 0, K − W)``: its two brackets in the middle, the window
    shifted inward at the ends so it always holds W real levels (W = min(window, K); with W = K, every level).
    Column i of ``columns`` (W, K − 1) holds that window; one gather per weight fetches it as a (W, n) block with
    contiguous rows, so every later op runs on contiguous n-vectors (a row-major (n, W) layout, with its
    reductions over a short last dimension, was several times slower).

    W shrinks to 2, the brackets, once every level beyond them is negligible at this sharpness: such a level is at
    least one gap g beyond the farther bracket, so its logit is at least β g² below the nearest level's; with
    β · g_min² >= ``PAIR_LOGIT_GAP`` its weight is below float32's resolution of Z >= 1 and dropping it changes no
    value. (Equal levels, which the int8 snap of the hard phase can make at 8 bits, then count once.)"""

    def __init__(self, levels: torch.Tensor, window: int, beta: float) -> None:
        num_levels = levels.numel()
        self.width = min(window, num_levels)
        if self.width > 2:
            gaps = levels.diff()
            gaps = gaps[gaps > 0]
            if gaps.numel() and beta * float(gaps.min()) ** 2 >= PAIR_LOGIT_GAP:
                self.width = 2
        cells = torch.arange(num_levels - 1, device=levels.device)
        start = (cells - self.width // 2 + 1).clamp_(0, num_levels - self.width)
        self.level_index = start + torch.arange(self.width, device=levels.device)[:, None]  # (W, K − 1)
        self.columns = levels[self.level_index]
        self.brackets = torch.stack([levels[:-1], levels[1:]])  # (2, K − 1)


class _CellIndex:
    """Finds the cell of every weight, i with c_i <= x < c_(i+1) clamped to 0 … K − 2 (weights below c_0 or above
    c_(K−1) use the first or last cell, whose brackets hold their nearest level), with a uniform bin table instead
    of a binary search (torch's searchsorted cost ~100 ns a weight at K = 256, more than everything else together).

    Bins of width h <= g_min / 4 over [c_0, c_(K−1)] (g_min: the smallest positive gap; at most ``max_bins``).
    A weight's computed bin b = ⌊(x − c_0) / h⌋ may be off by one through rounding, so x lies in
    [e_b − h, e_(b+1) + h). The table gives the cell of e_b − h, a lower bound, the next level to compare with, and
    the cell to step to past it: the last of a run of equal levels (the int8 snap of the hard phase merges levels
    at 8 bits), so a run is crossed in one step. ``passes`` = the most distinct levels any such 3h interval holds
    (1 unless levels nearly coincide and the bins were capped) is how many compare-and-step passes make the cell
    exact. Cost per weight: a few elementwise ops and one gather per pass."""

    def __init__(self, levels: torch.Tensor, max_bins: int = 1 << 14) -> None:
        self.levels = levels
        num_levels = levels.numel()
        values = levels.tolist()
        self.low, span = values[0], values[-1] - values[0]
        gaps = [b - a for a, b in zip(values, values[1:]) if b > a]
        bins = min(max_bins, math.ceil(4 * span / min(gaps))) if gaps else 1
        self.bins = max(bins, 1)
        self.inv_width = self.bins / span if span > 0 else 0.0
        width = span / self.bins if span > 0 else 1.0
        edges = self.low + width * torch.arange(self.bins + 1, dtype=torch.float64, device=levels.device)
        sorted64 = levels.double()
        lower = self._cell(sorted64, edges[:-1] - width)
        upper = self._cell(sorted64, edges[1:] + width)
        upper[-1] = num_levels - 2  # the last bin also holds every weight above c_(K−1)
        distinct_rank = torch.searchsorted(torch.unique(sorted64), sorted64)
        self.passes = max(1, int((distinct_rank[upper] - distinct_rank[lower]).max()))
        # Per cell: the next level to pass (none after the last cell) and the cell past it, the last of its run.
        self.thresholds = torch.cat([levels[1:-1], levels.new_full((1,), math.inf)])
        self.targets = self._cell(sorted64, sorted64[1:]).to(levels.dtype)
        self.table = torch.stack([lower.to(levels.dtype), self.thresholds[lower], self.targets[lower]])  # (3, bins)

    @staticmethod
    def _cell(levels: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (torch.searchsorted(levels, x, right=True) - 1).clamp_(0, levels.numel() - 2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = (x - self.low).mul_(self.inv_width).clamp_(0, self.bins - 1).int()  # int32: a 4x cheaper cast
        start, threshold, target = _rows_at(self.table, b)
        cell = _select(x, threshold, target, start)  # a pass where none was needed changes nothing
        for _ in range(self.passes - 1):
            index = cell.long()
            cell = _select(x, self.thresholds.index_select(0, index), self.targets.index_select(0, index), cell)
        return cell.long()


def _select(
    x: torch.Tensor, threshold: torch.Tensor, if_above: torch.Tensor, otherwise: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.where(x >= threshold, if_above, otherwise)`` for float tensors, exactly, without a bool tensor: on this
    CPU ``where`` and a bool comparison run unvectorised (65,536 floats, one thread: ``where`` 260 µs and ``>=`` 31 µs,
    against 9 µs for ``>=`` into a float tensor and 8 µs for ``lerp``); they were a sixth of GQ's hard-phase cost.
    ``lerp`` returns its ends exactly at weights 0 and 1 (it computes ``end − (end − start)(1 − w)`` for w >= 0.5)."""
    above = torch.ge(x, threshold, out=torch.empty_like(x))
    return torch.lerp(otherwise, if_above, above, out=out)


def _window_weights(
    x: torch.Tensor, cell: torch.Tensor, tables: _CellTables, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(levels c, x − c, unnormalised softmax weights e, their sum Z) over each weight's window; (W, n) but Z (n,).
    The logits are taken relative to the nearest level's, so e <= 1, Z >= 1 and nothing overflows; they are clamped
    at ``LOGIT_FLOOR``, which changes no sum and keeps exp off its slow underflow path."""
    c = _rows_at(tables.columns, cell)
    d = x - c
    d2 = d * d
    e = d2.sub_(d2.amin(dim=0)).mul_(-beta).clamp_(min=LOGIT_FLOOR).exp_()
    return c, d, e, e.sum(dim=0)


def _pair_probability(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, beta: float) -> torch.Tensor:
    """The window of two levels in closed form: the softmax weight of ``hi`` is σ(t) with the logit difference
    t = β((x − lo)² − (x − hi)²) = β (hi − lo)(2x − lo − hi), clamped (σ is 0 or 1 in float32 well before ±64,
    and exp stays off its slow path)."""
    t = (x + x).sub_(lo).sub_(hi).mul_(hi - lo).mul_(beta)
    return t.clamp_(LOGIT_FLOOR, -LOGIT_FLOOR).sigmoid_()


def _kernel_tables(levels: torch.Tensor, tables: _CellTables, cell_of: _CellIndex, beta: float) -> tuple:
    """The arguments ``sub8.quant._kernels`` reads the tables from (the C source's GQTables, in order)."""
    return (
        levels.data_ptr(), levels.numel(), tables.width, beta, cell_of.low, cell_of.inv_width, cell_of.bins,
        cell_of.passes, *(row.data_ptr() for row in cell_of.table), cell_of.thresholds.data_ptr(),
        cell_of.targets.data_ptr(),
    )  # fmt: skip


def _forward_by_torch(x_all, out_all, cells_all, levels, tables, cell_of, beta, hard, chunk_size) -> None:
    """The forward with PyTorch ops (any device), ``chunk_size`` weights at a time: fills the soft or hard weights
    and every weight's cell."""
    for a in range(0, x_all.numel(), chunk_size):
        x, out = x_all[a : a + chunk_size], out_all[a : a + chunk_size]
        cell = cell_of(x)
        cells_all[a : a + chunk_size] = cell
        if hard:
            # The nearest level, by the same midpoint arithmetic and tie rule (up) as base.nearest_level.
            lo, hi = _rows_at(tables.brackets, cell)
            _select(x, (lo + hi) / 2, hi, lo, out=out)
        elif tables.width == 2:
            lo, hi = _rows_at(tables.brackets, cell)
            torch.addcmul(lo, _pair_probability(x, lo, hi, beta), hi - lo, out=out)
        else:
            c, _, e, total = _window_weights(x, cell, tables, beta)
            torch.div((e * c).sum(dim=0), total, out=out)


def _backward_by_torch(x_all, g_all, cells_all, grad_w_all, per_cell, tables, beta, chunk_size) -> float:
    """The backward with PyTorch ops: fills ``grad_w_all`` (unless None), adds to ``per_cell``; returns ∂L/∂β."""
    minus_grad_beta = torch.zeros((), dtype=torch.float64, device=x_all.device)
    for a in range(0, x_all.numel(), chunk_size):
        x, g = x_all[a : a + chunk_size], g_all[a : a + chunk_size]
        cell = cells_all[a : a + chunk_size].long()
        if tables.width == 2:
            grad_x, level_grads, dot = _pair_backward(x, g, cell, tables, beta)
            if grad_w_all is not None:
                grad_w_all[a : a + chunk_size] = grad_x
            minus_grad_beta -= dot
            per_cell.index_add_(1, cell, level_grads)
            continue
        c, d, e, total = _window_weights(x, cell, tables, beta)
        p = e.div_(total)
        soft = (p * c).sum(dim=0)
        gp = p.mul_(g)  # g p_k
        rd = (c - soft).mul_(gp).mul_(d)  # r_k d_k
        if grad_w_all is not None:
            grad_w_all[a : a + chunk_size] = rd.sum(dim=0).mul_(-2 * beta)
        minus_grad_beta += torch.dot(rd.view(-1), d.view(-1))
        per_cell.index_add_(1, cell, gp.add_(rd, alpha=2 * beta))
    return -float(minus_grad_beta)


class _SoftQuantize(torch.autograd.Function):
    """w̃ (or Q(w) with w̃'s gradient, when ``hard``) for every weight; gradients to the weights, the levels and
    β = α / s². Derivation, with ℓ_k = −β d_k², d_k = w − c_k, p = softmax(ℓ), w̃ = Σ p_k c_k and g = ∂L/∂w̃:
    ∂L/∂ℓ_k = r_k = g p_k (c_k − w̃); ∂L/∂w = −2β Σ_k r_k d_k; ∂L/∂c_k = Σ_weights (g p_k + 2β r_k d_k);
    ∂L/∂β = −Σ_weights Σ_k r_k d_k².

    Memory: the forward keeps only each weight's cell, one byte (K <= 256), for the backward; every (W, n)
    intermediate lives for one chunk. Time: one bin lookup per weight per step (:class:`_CellIndex`); one gather of
    W levels and W exps per weight in each direction; the level gradient is accumulated per cell (one scatter-add
    of W values per weight) and spread onto the levels with a K-sized scatter.

    On the CPU both directions run in ``sub8.quant._kernels`` (the same formulas and tables, one pass per weight,
    no (W, n) intermediates); elsewhere (CUDA) in PyTorch ops. The two agree to float rounding."""

    @staticmethod
    def forward(ctx, w, levels, beta, hard, window, chunk_size, on_backward):
        flat = w.detach().reshape(-1).contiguous()
        beta_value = beta.detach().item()
        tables, cell_of = _CellTables(levels, window, beta_value), _CellIndex(levels)
        ctx.kernel = tables.width <= KERNEL_MAX_WINDOW and kernels.usable(flat, levels)
        if ctx.kernel:
            ctx.kernel_tables = _kernel_tables(levels, tables, cell_of, beta_value)
            ctx.cell_of = cell_of  # holds the tables the addresses point into
            out, cells = kernels.gq_forward(ctx.kernel_tables, flat, hard)
        else:
            out = torch.empty_like(flat)
            cells = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
            _forward_by_torch(flat, out, cells, levels, tables, cell_of, beta_value, hard, chunk_size)
        ctx.save_for_backward(w, levels, beta)
        ctx.cells, ctx.tables, ctx.chunk_size, ctx.on_backward = cells, tables, chunk_size, on_backward
        return out.reshape(w.shape)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.on_backward is not None:
            ctx.on_backward()
        w, levels, beta = ctx.saved_tensors
        flat, grad_flat = w.detach().reshape(-1).contiguous(), grad_out.reshape(-1).contiguous()
        tables, beta_value = ctx.tables, beta.detach().item()
        grad_w = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        per_cell = torch.zeros_like(tables.columns)  # (W, K − 1): each cell's window's level gradients
        if ctx.kernel:
            grad_beta_value = kernels.gq_backward(ctx.kernel_tables, flat, grad_flat, ctx.cells, per_cell, grad_w)
        else:
            grad_beta_value = _backward_by_torch(flat, grad_flat, ctx.cells, grad_w, per_cell, tables, beta_value,
                                                 ctx.chunk_size)
        grad_levels = torch.zeros_like(levels).index_add_(0, tables.level_index.reshape(-1), per_cell.reshape(-1))
        grad_beta = torch.tensor(grad_beta_value, dtype=beta.dtype, device=beta.device)
        return (grad_w.reshape(w.shape) if grad_w is not None else None), grad_levels, grad_beta, None, None, None, None


def _pair_backward(
    x: torch.Tensor, g: torch.Tensor, cell: torch.Tensor, tables: _CellTables, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of a window of two, on n-vectors (the general formulas of :class:`_SoftQuantize` with
    p = σ(t), w̃ = lo + p Δ, Δ = hi − lo, r = g p (1 − p) Δ = r_hi = −r_lo): ∂L/∂w = 2β r Δ, ∂L/∂hi = g p + 2β r (w −
    hi), ∂L/∂lo = g (1 − p) − 2β r (w − lo), ∂L/∂β = r t / β = r Δ (2w − lo − hi). Returns (∂L/∂w, the level
    gradients (2, n) as [lo, hi], ∂L/∂β summed)."""
    lo, hi = _rows_at(tables.brackets, cell)
    width = hi - lo
    p = _pair_probability(x, lo, hi, beta)
    gp = g * p
    r = (g - gp).mul_(p).mul_(width)  # g p (1 − p) Δ
    two_beta_r = r * (2 * beta)
    grad_beta = torch.dot(r, (x + x).sub_(lo).sub_(hi).mul_(width)).double()
    grad_hi = torch.addcmul(gp, two_beta_r, x - hi)
    grad_lo = (g - gp).sub_(two_beta_r.mul(x - lo))
    return two_beta_r.mul_(width), torch.stack([grad_lo, grad_hi]), grad_beta


def soft_quantize(
    w: torch.Tensor,
    levels: torch.Tensor,
    beta: torch.Tensor,
    hard: bool = False,
    window: int = DEFAULT_WINDOW,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    on_backward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """GQ's soft weights ``Σ_k softmax_k(−β (w − c_k)²) c_k`` over the ``window`` nearest levels of each weight,
    or with ``hard`` the nearest level in the forward and the soft gradient in the backward
    (``w̃ + stopgrad(Q(w) − w̃)``). Differentiable in ``w``, ``levels`` and ``beta``.

    Args:
        w: weights, any shape.
        levels: (K,) sorted levels.
        beta: () the sharpness α / s².
        window: levels per weight (an even number; at most K are used).
        chunk_size: weights processed at a time by the PyTorch version (bounds its scratch memory; the CPU
            kernel works through its own tiles of 256).
        on_backward: called when the backward reaches this node (its graph is then consumed).
    """
    if window < 2 or window % 2:
        raise ValueError(f"soft_quantize: window must be an even number >= 2, got {window}")
    if levels.dim() != 1 or levels.numel() < 2:
        raise ValueError(f"soft_quantize: expected (K,) levels with K >= 2, got {tuple(levels.shape)}")
    if levels.numel() > 256:
        raise ValueError(f"soft_quantize: at most 256 levels (8 bits), got {levels.numel()}")
    return _SoftQuantize.apply(w, levels.contiguous(), beta, hard, window, chunk_size, on_backward)


# ---------------------------------------------------------------------------------------------------------------
# The per-tensor quantizer


def smallest_initial_gap(bits: int, mu: float) -> float:
    """g₀: the smallest gap between the initial levels F⁻¹_μ(even grid), in units of ``s`` (between the two levels
    around zero, where the μ-law packs them densest)."""
    return float(mu_law_expand(even_grid(bits).double(), mu).diff().min())


def mse_scale(w: torch.Tensor, unit_levels: torch.Tensor, samples: int = 1 << 16, candidates: int = 48) -> float:
    """The scale ``s`` (on a log grid of max|w| · [10⁻³, 1]) for which ``s · unit_levels`` hard-quantizes a
    strided sample of ``w`` with the least mean squared error. An all-zero tensor gets a tiny positive scale."""
    flat = w.detach().reshape(-1)
    x = flat[:: max(1, flat.numel() // samples)].float()
    absmax = float(x.abs().max()) if x.numel() else 0.0
    if absmax == 0.0:
        return 1e-8
    unit_levels = unit_levels.to(x)
    best, best_error = absmax, math.inf
    for fraction in torch.logspace(-3, 0, candidates, dtype=torch.float64).tolist():
        levels = absmax * fraction * unit_levels
        error = float((x - levels[nearest_level(x, levels)]).square().mean())
        if error < best_error:
            best, best_error = absmax * fraction, error
    return best


class GQQuantizer(Quantizer):
    """One tensor's GQ levels ``c_k = s · F⁻¹_μ(u_k)``: ``log_scale`` () and ``u`` (K,) are the trainable
    Parameters. As a :class:`Quantizer` (export, evaluation) it quantizes to the current levels, snapped to the
    int8 grid by :meth:`Quantizer.quantize_int8`."""

    def __init__(self, bits: int, mu: float = DEFAULT_MU, scale: float = 1.0, device: torch.device | None = None):
        super().__init__(bits)
        if not mu > 0:
            raise ValueError(f"GQ: mu must be > 0, got {mu}")
        self.mu = float(mu)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale), device=device))
        self.u = nn.Parameter(even_grid(bits).to(device))
        self.min_gap = smallest_initial_gap(bits, self.mu)

    @classmethod
    def fit(cls, w: torch.Tensor, bits: int, mu: float = DEFAULT_MU) -> GQQuantizer:
        """Even ``u`` and the least-squared-error scale for ``w`` (the start of GQ training, or post-training GQ)."""
        unit = mu_law_expand(even_grid(bits), mu)
        return cls(bits, mu, mse_scale(w, unit), device=w.device)

    def parameters(self) -> list[nn.Parameter]:
        return [self.log_scale, self.u]

    def trainable_levels(self) -> torch.Tensor:
        """(K,) sorted levels, differentiable in ``log_scale`` and ``u``."""
        return torch.sort(self.log_scale.exp() * mu_law_expand(self.u, self.mu)).values

    def levels(self, w: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            levels = self.trainable_levels()
        return levels if w is None else levels.to(w.device)

    def beta(self, alpha_hat: float) -> torch.Tensor:
        """α / s² with α = α̂ / g₀² (module docstring); differentiable in ``log_scale``."""
        return alpha_hat / self.min_gap**2 * torch.exp(-2 * self.log_scale)

    def soft_quantize(
        self,
        w: torch.Tensor,
        alpha_hat: float,
        hard: bool,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_backward: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """The weight as the training forward sees it: ``w̃``, or, when ``hard``, ``Q(w)`` with ``w̃``'s gradient.
        The hard forward quantizes to the levels snapped to the int8 grid (their gradient passes straight through
        the rounding to the float levels): exactly the weights the device will run, so the final export changes
        nothing the hard phase trained on. (Quantizing to the float levels instead, weights that training left
        just beside a decision boundary flipped when the export snapped the levels.)"""
        levels = self.trainable_levels()
        if hard:
            snapped = int8_levels(*snap_to_int8_grid(levels.detach()))
            levels = levels + (snapped - levels).detach()
        return soft_quantize(w, levels, self.beta(alpha_hat), hard, window, chunk_size, on_backward)

    def hard_int8(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` on its nearest int8-grid level (what evaluation and the device see); no gradient."""
        with torch.no_grad():
            codes, lut, scale = self.quantize_int8(w)
            return dequantize(codes, int8_levels(lut, scale)).to(w.dtype)

    @torch.no_grad()
    def project_(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep ``u`` in [−1, 1] and sorted (module docstring); the optimizer's per-level state follows the sort."""
        self.u.clamp_(-1.0, 1.0)
        order = torch.argsort(self.u, stable=True)
        if torch.equal(order, torch.arange(order.numel(), device=order.device)):
            return
        self.u.copy_(self.u[order])
        state = optimizer.state.get(self.u, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == self.u.shape:
                value.copy_(value[order])


# ---------------------------------------------------------------------------------------------------------------
# Training hooks


class GQSchedule:
    """α̂ per update: geometric from ``alpha_start`` (update 0) to ``alpha_hard`` (update ``anneal_steps``), then
    constant; the forward is hard (straight-through) from update ``anneal_steps`` on."""

    def __init__(self, alpha_start: float = 1.0, alpha_hard: float = 128.0, anneal_steps: int = 100) -> None:
        if not 0 < alpha_start <= alpha_hard:
            raise ValueError(f"GQ: need 0 < alpha_start <= alpha_hard, got {alpha_start}, {alpha_hard}")
        if anneal_steps < 0:
            raise ValueError(f"GQ: anneal_steps must be >= 0, got {anneal_steps}")
        self.alpha_start, self.alpha_hard, self.anneal_steps = alpha_start, alpha_hard, anneal_steps

    def alpha(self, step: int) -> float:
        if step >= self.anneal_steps:
            return self.alpha_hard
        return self.alpha_start * (self.alpha_hard / self.alpha_start) ** (step / self.anneal_steps)

    def hard(self, step: int) -> bool:
        return step >= self.anneal_steps


class _Sharpness:
    """The current α̂ and hard flag, shared by every parametrization of one :class:`GQ` (set in ``before_step``)."""

    def __init__(self) -> None:
        self.alpha_hat, self.hard = 1.0, False


class _Counter:
    """How many times the backward passed through a parametrization's outputs (the autograd node holds only this,
    so no reference cycle runs through the graph)."""

    def __init__(self) -> None:
        self.count = 0

    def increment(self) -> None:
        self.count += 1


class _Reusable:
    """The last training-mode output of a parametrization, reused until the backward consumes its graph.

    nn.LSTM reads each weight up to four times per forward (``hasattr`` and ``getattr`` in ``_weights_have_changed``
    and again in ``_init_flat_weights``); without reuse its GQ weights cost 2-4 × as much. The key holds everything
    the output depends on, and the number of backward passes through it: a second forward before the update
    (gradient accumulation) builds a fresh graph. The output stays referenced until the next forward (N floats a
    tensor, alive during the backward anyway)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.out: torch.Tensor | None = None
        self.backwards = _Counter()

    def get(self, key: tuple) -> torch.Tensor | None:
        return self.out if key == self.key else None

    def put(self, key: tuple, out: torch.Tensor) -> None:
        self.key, self.out = key, out


class GQParametrization(nn.Module):
    """The weight as GQ's training forward sees it (soft, or straight-through hard); in eval mode the int8-grid
    hard weight. Registers its quantizer's ``log_scale`` and ``u`` (the same Parameter objects) as its own, so
    while the model trains they are part of it: DistributedDataParallel averages their gradients over ranks like
    any other, ``model.to`` moves them, and the model's checkpoint holds them. They go with the parametrization at
    the end of training."""

    def __init__(self, quantizer: GQQuantizer, sharpness: _Sharpness, window: int, chunk_size: int) -> None:
        super().__init__()
        self.quantizer, self.sharpness = quantizer, sharpness
        self.log_scale, self.u = quantizer.log_scale, quantizer.u
        self.window, self.chunk_size = window, chunk_size
        self._reusable = _Reusable()
        self._eval_key: tuple | None = None
        self._eval_weight: torch.Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (copy.deepcopy of a parametrized model) leave the reused outputs behind: a tensor
        # inside an autograd graph cannot be deep-copied. (A copy gets its own copy of the quantizer's s and u.)
        state = self.__dict__.copy()
        state["_reusable"], state["_eval_key"], state["_eval_weight"] = _Reusable(), None, None
        return state

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        # Tensor._version counts in-place changes (the optimizer's updates, the projection, a load_state_dict).
        versions = tuple((t.data_ptr(), t._version) for t in (weight, q.log_scale, q.u))
        if self.training:
            reusable = self._reusable
            key = (*versions, self.sharpness.alpha_hat, self.sharpness.hard, torch.is_grad_enabled(),
                   reusable.backwards.count)
            out = reusable.get(key)
            if out is None:
                out = q.soft_quantize(weight, self.sharpness.alpha_hat, self.sharpness.hard, self.window,
                                      self.chunk_size, reusable.backwards.increment)
                reusable.put(key, out)
            return out
        if versions != self._eval_key:
            self._eval_key, self._eval_weight = versions, q.hard_int8(weight)
        return self._eval_weight


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


class GQ(Hooks):
    """GQ training (module docstring) at the plan's bits per tensor, 1 bit included.

    Args:
        plan: which weights, at how many bits.
        mu: μ of the level space (one for every tensor).
        alpha_start, alpha_hard, anneal_steps: the sharpness schedule (:class:`GQSchedule`).
        level_lr_scale: the learning rate of ``s`` and ``u`` relative to the weights' (their param group follows
            the same schedule).
        window, chunk_size: see :func:`soft_quantize`.
    """

    def __init__(
        self,
        plan: QuantPlan,
        mu: float = DEFAULT_MU,
        alpha_start: float = 1.0,
        alpha_hard: float = 128.0,
        anneal_steps: int = 100,
        level_lr_scale: float = 1.0,
        window: int = DEFAULT_WINDOW,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if window < 2 or window % 2:
            raise ValueError(f"GQ: window must be an even number >= 2, got {window}")
        if not mu > 0:
            raise ValueError(f"GQ: mu must be > 0, got {mu}")
        self.plan = plan
        self.mu = float(mu)
        self.schedule = GQSchedule(alpha_start, alpha_hard, anneal_steps)
        self.level_lr_scale = level_lr_scale
        self.window, self.chunk_size = window, chunk_size
        self.tensors: dict[str, GQQuantizer] = {}
        self.sharpness = _Sharpness()
        self.parametrized: list[str] = []

    def level_parameters(self) -> list[nn.Parameter]:
        """``s`` and ``u`` of every quantized tensor (what :meth:`on_train_start` adds to the optimizer)."""
        return [p for q in self.tensors.values() for p in q.parameters()]

    def quantizers(self, model: nn.Module | None = None) -> dict[str, Quantizer]:
        """The per-tensor quantizers (for :func:`sub8.quant.apply.export_quantized`): their current levels,
        snapped to the int8 grid."""
        return dict(self.tensors)

    def set_step(self, step: int) -> None:
        """Sharpness and hard flag of update ``step``."""
        self.sharpness.alpha_hat, self.sharpness.hard = self.schedule.alpha(step), self.schedule.hard(step)

    def on_train_start(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Fit the initial levels, parametrize the weights, add ``s`` and ``u`` to ``optimizer`` in a group of their
        own (no weight decay). With ``optimizer`` None the caller trains them itself: from here to
        :meth:`on_train_end` they are among ``model.parameters()``. On a resumed run the model's and the hooks'
        checkpointed state then restore the levels into these same Parameters."""
        self.tensors = {}
        for name, bits in self.plan.resolve(model):
            self.tensors[name] = GQQuantizer.fit(model.get_parameter(name), bits, self.mu)
        for name, quantizer in self.tensors.items():
            parametrization = GQParametrization(quantizer, self.sharpness, self.window, self.chunk_size)
            parametrize.register_parametrization(*_owner(model, name), parametrization.train(model.training))
        self.parametrized = list(self.tensors)
        if optimizer is not None:
            optimizer.add_param_group({
                "params": self.level_parameters(),
                "lr": optimizer.defaults["lr"] * self.level_lr_scale,
                "weight_decay": 0.0,  # s and u are not pulled toward zero
            })
        self.set_step(1)

    def before_step(self, step: int, model: nn.Module) -> None:
        self.set_step(step)

    def after_step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for quantizer in self.tensors.values():
            quantizer.project_(optimizer)

    def on_train_end(self, model: nn.Module) -> None:
        """Remove the parametrizations (the float weights come back as plain Parameters) and hard-quantize every
        weight onto its int8-grid levels."""
        for name in self.parametrized:
            parametrize.remove_parametrizations(*_owner(model, name), leave_parametrized=False)
        self.parametrized = []
        hard_quantize_(model, self.quantizers(model))

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.tensors),
            "bits": [q.bits for q in self.tensors.values()],
            "mu": self.mu,
            "log_scales": [q.log_scale.detach().clone() for q in self.tensors.values()],
            "us": [q.u.detach().clone() for q in self.tensors.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the levels: in place into the running Parameters (a resumed run: the optimizer holds them), or,
        before any training (the hooks of a finished run, for export), as new quantizers."""
        if state["mu"] != self.mu:
            raise ValueError(f"GQ: checkpoint has mu={state['mu']}, these hooks mu={self.mu}")
        rows = list(zip(state["names"], state["bits"], state["log_scales"], state["us"], strict=True))
        if self.tensors:
            expected = [(name, q.bits) for name, q in self.tensors.items()]
            if [(name, bits) for name, bits, _, _ in rows] != expected:
                raise ValueError(f"GQ: checkpoint quantizes {list(zip(state['names'], state['bits']))}, "
                                 f"this plan {expected}")
            with torch.no_grad():
                for name, _, log_scale, u in rows:
                    self.tensors[name].log_scale.copy_(log_scale)
                    self.tensors[name].u.copy_(u)
            return
        self.tensors = {}
        for name, bits, log_scale, u in rows:
            quantizer = GQQuantizer(bits, self.mu, device=u.device)
            with torch.no_grad():
                quantizer.log_scale.copy_(log_scale)
                quantizer.u.copy_(u)
            self.tensors[name] = quantizer
