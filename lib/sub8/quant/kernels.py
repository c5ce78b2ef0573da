"""The fused CPU kernels of the MRACos regularizer and of GQ (``sub8.quant._kernels``, compiled from
``_kernels.c`` by ``pip install -e .``).

They run on PyTorch's own OpenMP threads, ``torch.get_num_threads()`` of them: the extension links
``libgomp.so.1``, which resolves to the copy PyTorch has loaded (this module imports torch first), so both share one
thread pool. A pool of Python threads was tried first and dropped: at 2 threads on this 2-vCPU machine it made GQ's
hard-phase step 1.44× the fp32 step instead of 1.30× with no threads at all (rnnt_small; rnnt_large 1.50 against
1.35), as PyTorch's OpenMP threads spin-wait on the cores right after each op; on the shared pool it is 1.33 and
1.31 (``benchmarks/qat_step.py --threads 2``). Work goes out in blocks of :data:`BLOCK` weights and every sum is
taken per block, in doubles, then over the blocks in order: the same bits at any thread count.

Tensors are passed as addresses: every tensor here is contiguous float32 on the CPU (:func:`usable` checks what a
caller hands in), and each stays referenced by the caller while a kernel runs.

Where the extension is not built (the package copied without ``pip install``), :func:`usable` warns once and says
no, and the callers run their PyTorch versions, which also serve every other device.
"""

from __future__ import annotations

import warnings

import torch

try:
    from sub8.quant import _kernels
except ImportError:
    _kernels = None

BLOCK = 1 << 16  # a multiple of both kernels' tiles (1024 and 256 weights)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: on the CPU, float32, and the extension built."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return False
    if _kernels is None:
        warnings.warn(
            "sub8.quant._kernels is not built (pip install -e . builds it): MRACos and GQ run their PyTorch "
            "versions, 2-3x slower on the CPU (benchmarks/kernels.py)",
            stacklevel=3,
        )
        return False
    return True


def mracos(
    w: torch.Tensor, low: torch.Tensor, inv_width: torch.Tensor, inv_scale: float
) -> tuple[torch.Tensor, float]:
    """dR/dw and Σ R of 1-D ``w`` (sub8.quant.mracos) on the int8 grid of step 1 / ``inv_scale``, cells from the
    256-entry grid tables ``low`` and ``inv_width``; Σ R is NaN if any weight is not finite."""
    grad = torch.empty_like(w)
    total, non_finite = _kernels.mracos(
        w.data_ptr(), grad.data_ptr(), w.numel(), low.data_ptr(), inv_width.data_ptr(), inv_scale, BLOCK
    )
    return grad, float("nan") if non_finite else total


def gq_forward(tables: tuple, x: torch.Tensor, hard: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GQ's soft (or, with ``hard``, hard) weights of 1-D ``x`` and each weight's cell (uint8). ``tables``: the
    C source's GQTables arguments (sub8.quant.gq._kernel_tables). A non-finite weight stays non-finite."""
    out = torch.empty_like(x)
    cells = torch.empty(x.shape, dtype=torch.uint8)
    _kernels.gq_forward(*tables, x.data_ptr(), x.numel(), hard, out.data_ptr(), cells.data_ptr(), BLOCK)
    return out, cells


def gq_backward(
    tables: tuple, x: torch.Tensor, grad_out: torch.Tensor, cells: torch.Tensor, per_cell: torch.Tensor,
    grad_w: torch.Tensor | None,
) -> float:
    """GQ's backward over 1-D ``x``: fills ``grad_w`` (unless None), adds the level gradients per (window
    position, cell) to ``per_cell`` (float32, (width, K − 1)); returns ∂L/∂β."""
    return _kernels.gq_backward(
        *tables, x.data_ptr(), grad_out.data_ptr(), cells.data_ptr(), x.numel(),
        0 if grad_w is None else grad_w.data_ptr(), BLOCK, per_cell.data_ptr(),
    )  # fmt: skip
