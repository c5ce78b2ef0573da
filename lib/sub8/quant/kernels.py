"""The fused CPU kernels of the MRACos regularizer and of GQ (``sub8.quant._kernels``, compiled from
``_kernels.c`` by ``pip install -e .``), spread over PyTorch's intra-op threads.

Work goes out in blocks of :data:`BLOCK` weights, contiguous runs of blocks to each of ``torch.get_num_threads()``
threads (the C code releases the GIL). Every partial sum is taken per block and the blocks' sums are added in block
order, so a result does not depend on the number of threads: a run at 1 thread and one at 16 give the same bits.

Tensors are passed as addresses: every tensor here is contiguous float32 on the CPU (:func:`usable` checks what a
caller hands in), and each stays referenced by the caller while a kernel runs.

Where the extension is not built (the package copied without ``pip install``), :func:`usable` warns once and says
no, and the callers run their PyTorch versions, which also serve every other device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

try:
    from sub8.quant import _kernels
except ImportError:
    _kernels = None

BLOCK = 1 << 16
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: on the CPU, float32, and the extension built."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if _kernels is None:
        warnings.warn(
            "sub8.quant._kernels is not built (pip install -e . builds it): MRACos and GQ run their PyTorch "
            "versions, several times slower on the CPU",
            stacklevel=3,
        )
        return False
    return True


def _over_blocks(n: int, run: Callable[[int, int], None]) -> None:
    """``run(start, stop)`` over [0, n) in contiguous runs of whole blocks, one run per thread (the first in this
    one)."""
    global _pool, _pool_threads
    blocks = -(-n // BLOCK)
    threads = max(1, min(torch.get_num_threads(), blocks))  # one (empty) run for n = 0
    bounds = [min(n, (blocks * i // threads) * BLOCK) for i in range(threads + 1)]
    ranges = list(zip(bounds, bounds[1:]))
    if len(ranges) > 1 and _pool_threads < len(ranges) - 1:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool_threads = len(ranges) - 1
        _pool = ThreadPoolExecutor(_pool_threads, thread_name_prefix="sub8-kernels")
    others = [_pool.submit(run, a, b) for a, b in ranges[1:]]
    run(*ranges[0])
    for future in others:
        future.result()


def _at(t: torch.Tensor, offset: int) -> int:
    return t.data_ptr() + offset * t.element_size()


def mracos(
    w: torch.Tensor, low: torch.Tensor, inv_width: torch.Tensor, inv_scale: float
) -> tuple[torch.Tensor, float]:
    """dR/dw and Σ R of 1-D ``w`` (sub8.quant.mracos) on the int8 grid of step 1 / ``inv_scale``, cells from the
    256-entry grid tables ``low`` and ``inv_width``; Σ R is NaN if any weight is not finite."""
    grad = torch.empty_like(w)
    block_sums = torch.empty(-(-w.numel() // BLOCK), dtype=torch.float64)
    non_finite = [0] * block_sums.numel()

    def run(a: int, b: int) -> None:
        non_finite[a // BLOCK] = _kernels.mracos(
            _at(w, a), _at(grad, a), b - a, low.data_ptr(), inv_width.data_ptr(), inv_scale,
            _at(block_sums, a // BLOCK), BLOCK,
        )  # fmt: skip

    _over_blocks(w.numel(), run)
    return grad, float("nan") if any(non_finite) else sum(block_sums.tolist())


def gq_forward(tables: tuple, x: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GQ's soft (or, with ``hard``, hard) weights of 1-D ``x`` and each weight's cell (uint8). ``tables``: the
    C source's GQTables arguments (sub8.quant.gq._kernel_tables). A non-finite weight stays non-finite."""
    out = torch.empty_like(x)
    cells = torch.empty(x.shape, dtype=torch.uint8)

    def run(a: int, b: int) -> None:
        _kernels.gq_forward(*tables, _at(x, a), b - a, hard, _at(out, a), _at(cells, a))

    _over_blocks(x.numel(), run)
    return out, cells


def gq_backward(
    tables: tuple, x: torch.Tensor, grad_out: torch.Tensor, cells: torch.Tensor, per_cell: torch.Tensor,
    grad_w: torch.Tensor | None,
) -> float:
    """GQ's backward over 1-D ``x``: fills ``grad_w`` (unless None), adds the level gradients per (window
    position, cell) to ``per_cell`` (float32, (width, K − 1)); returns ∂L/∂β."""
    blocks = -(-x.numel() // BLOCK)
    partials = torch.empty((blocks, per_cell.numel()), dtype=torch.float64)
    beta_partials = torch.empty(blocks, dtype=torch.float64)

    def run(a: int, b: int) -> None:
        _kernels.gq_backward(
            *tables, _at(x, a), _at(grad_out, a), _at(cells, a), b - a, 0 if grad_w is None else _at(grad_w, a),
            BLOCK, _at(partials, (a // BLOCK) * per_cell.numel()), _at(beta_partials, a // BLOCK),
        )  # fmt: skip

    _over_blocks(x.numel(), run)
    _kernels.fold(partials.data_ptr(), blocks, per_cell.numel(), per_cell.data_ptr())
    return sum(beta_partials.tolist())
