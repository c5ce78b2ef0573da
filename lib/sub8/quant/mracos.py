"""The MRACos regularizer (S8BQAT step 2, design.md §5): pulls every weight towards its nearest level.

Between neighbouring levels c_k < c_{k+1} with Δ_k = c_{k+1} − c_k:

    R(w) = 1 − |cos(π (w − c_k) / Δ_k)|

zero on every level, one at every midpoint, and its gradient points away from the nearest level, so gradient
descent on λ·R moves a weight towards it. Outside [c_1, c_K] the cosine would pull a weight to a level that does
not exist, so R is a linear pull to the end level: R(w) = 2 |w − c_end| / Δ_end, with Δ_end the width of the end
cell. R is 0 at both sides of an end level, hence continuous; the slope 2/Δ makes R reach 1 half a cell outside, as
it does half a cell inside (a weight outside is pulled as hard as one at the same distance inside, on average).
"""

from __future__ import annotations

import math

import torch

from sub8.quant import kernels


def _cell_coordinate(w: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u = (w − c_k) / Δ_k in the weight's cell (the first or last cell for weights outside), and 1 / Δ_k."""
    levels = levels.detach()
    if levels.dim() != 1 or levels.numel() < 2:
        raise ValueError(f"mracos: expected at least 2 levels in a 1-D tensor, got shape {tuple(levels.shape)}")
    inv_widths = 1 / (levels[1:] - levels[:-1])
    cell = (torch.searchsorted(levels, w.detach(), right=True) - 1).clamp_(0, levels.numel() - 2)
    inv_width = inv_widths[cell]
    return (w - levels[cell]) * inv_width, inv_width


def mracos(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """R(w) elementwise.

    Args:
        w: weights, any shape.
        levels: (K,) strictly increasing, K >= 2.

    Returns:
        R: same shape as ``w``, in [0, 1] inside [c_1, c_K], differentiable in ``w`` (levels are constants).
    """
    u, _ = _cell_coordinate(w, levels)
    # Inside the levels u = v in [0, 1]; outside, |u − v| is the distance past the end level in end-cell widths.
    v = u.clamp(0, 1)
    return 1 - torch.abs(torch.cos(math.pi * v)) + 2 * torch.abs(u - v)


class _Int8GridCells:
    """The cell of every int8 grid point for levels on the int8 grid: in grid units y = w / scale every level is an
    integer, so floor(y) finds a weight's cell through this 256-entry table instead of a binary search per weight
    (on 1M weights, one thread, the search alone took 23 ms). The table is read with ``index_select`` and int32
    indices: advanced indexing (``table[index]``) and int64 indices were ~3x slower and made the lookups half of the
    regularizer's time."""

    def __init__(self, lut: torch.Tensor, scale: torch.Tensor, device: torch.device) -> None:
        m = torch.unique(lut).float().to(device)  # snapping may merge levels; R needs them distinct
        if m.numel() < 2:
            raise ValueError(f"mracos: expected at least 2 distinct levels, got {m.tolist()}")
        grid = torch.arange(-128, 128, dtype=torch.float32, device=device)
        cell = (torch.searchsorted(m, grid, right=True) - 1).clamp_(0, m.numel() - 2)
        self.low, self.inv_width = m[cell], 1 / (m[1:] - m[:-1])[cell]
        self.scale = scale

    def coordinate(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u = (w − c_k) / Δ_k in each weight's cell (module docstring) and du/dw, for a 1-D ``w``."""
        y = w / self.scale
        index = torch.floor(y).clamp_(-128, 127).add_(128).int()
        inv_width_w = self.inv_width.index_select(0, index)
        u = y.sub_(self.low.index_select(0, index)).mul_(inv_width_w)
        return u, inv_width_w.div_(self.scale)


def _gradient_by_torch(flat: torch.Tensor, cells: _Int8GridCells, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dR/dw and Σ R of 1-D ``flat`` with PyTorch ops, on any device. (The CPU runs the fused kernel of
    ``sub8.quant.kernels`` instead: one pass; forward and backward ~2x faster on one thread, ``benchmarks/kernels.py``;
    its sin and cos are polynomials, so the two agree to float rounding, not bit for bit.) ``chunk`` weights at a
    time, so the ~25 elementwise passes read and write data that stays in the core's L2 cache (a pass over a whole
    1280 × 320 LSTM matrix, 1.6 MB a float tensor, streams memory). Every weight goes through the same operations
    whatever the chunk; only the order of the sum of R changes."""
    grad = torch.empty_like(flat)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for a in range(0, flat.numel(), chunk):
        # In place wherever a value is not needed again: this runs over every quantized weight at every update.
        u, du_dw = cells.coordinate(flat[a : a + chunk])
        v = u.clamp(0, 1)
        outside = u.sub_(v)
        phase = v.mul_(math.pi)
        cos = torch.cos(phase)
        # d/du [1 − |cos πv|] = π sin(πv) sign(cos πv) inside; d/du [2|u − v|] = 2 sign(u − v) outside.
        phase.sin_().mul_(cos.sign()).mul_(math.pi).add_(outside.sign(), alpha=2)
        torch.mul(phase, du_dw, out=grad[a : a + chunk])
        total += cos.abs_().neg_().add_(1).sum() + 2 * outside.abs_().sum()
    return grad, total


class _MRACosSum(torch.autograd.Function):
    """Σ R(w) with the gradient computed in the forward: autograd through :func:`mracos` keeps several N-sized
    intermediates and runs as many backward kernels; this keeps one (dR/dw) and its backward is one multiply. On the
    CPU the forward is the fused C kernel, elsewhere (CUDA) PyTorch ops."""

    CHUNK = 1 << 16

    @staticmethod
    def forward(ctx, w: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        cells = _Int8GridCells(lut, scale, w.device)
        flat = w.detach().reshape(-1).contiguous()
        if kernels.usable(flat):
            grad, total = kernels.mracos(flat, cells.low, cells.inv_width, float(1 / cells.scale))
            total = torch.tensor(total, dtype=torch.float64)
        else:
            grad, total = _gradient_by_torch(flat, cells, _MRACosSum.CHUNK)
        ctx.save_for_backward(grad.view(w.shape))
        ctx.consumed = False
        return total.to(w.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # Scaled in place: a new N-sized tensor per weight per update cost as much as the multiply. The saved
        # gradient is then spent, so a second backward through the same graph (retain_graph=True) is refused.
        if ctx.consumed:
            raise RuntimeError("mracos_sum: backward ran twice through the same graph (retain_graph is not supported)")
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output), None, None


def mracos_sum(w: torch.Tensor, lut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ R(w) for levels on the int8 grid (``lut`` int8 (K,), scalar ``scale``): equals ``mracos(w, levels).sum()``
    up to rounding, with a fast cell lookup and backward (what the S8BQAT loss uses)."""
    return _MRACosSum.apply(w, lut, scale.detach())


def linear_ramp(step: int, final_value: float, ramp_steps: int) -> float:
    """λ at update ``step`` (1-based): rises linearly from final_value / ramp_steps to final_value over
    ``ramp_steps`` updates, then stays; ``ramp_steps = 0`` means no ramp."""
    if ramp_steps <= 0:
        return final_value
    return final_value * min(1.0, step / ramp_steps)
