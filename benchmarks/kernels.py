"""The CPU kernels of MRACos and GQ against the PyTorch versions of the same formulas (what runs on a GPU, and on the
CPU where the C module is not built): ns per weight, forward and backward together, and the ratio, in one run.

    .venv/bin/python benchmarks/kernels.py [--threads N] [--weights N]

One tensor of ``--weights`` trained-like (Gaussian) weights, the size of rnnt_large's four LSTM matrices of a layer
(1.6M). MRACos at 4 bits on Lloyd-Max levels; GQ at 8 and 4 bits in its soft phase at α̂ = 1 (a window of four
levels), at α̂ = 30 (the two-level closed form, from ~60% of the anneal on) and in its hard phase. The two versions
take turns in the same rounds (median of 9 each), so a slow spell of the machine slows both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from sub8.quant import LloydMaxQuantizer, kernels
from sub8.quant.gq import GQQuantizer
from sub8.quant.mracos import mracos_sum


def mracos_step(w: torch.Tensor) -> Callable[[], None]:
    lut, scale = LloydMaxQuantizer(4).int8_grid(w)

    def step() -> None:
        x = w.clone().requires_grad_()
        mracos_sum(x, lut, scale).backward()

    return step


def gq_step(w: torch.Tensor, bits: int, alpha_hat: float, hard: bool) -> Callable[[], None]:
    quantizer = GQQuantizer.fit(w, bits)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        x = w.clone().requires_grad_()
        out = quantizer.soft_quantize(x, alpha_hat, hard)
        torch.autograd.grad(out, (x, quantizer.log_scale, quantizer.u), upstream)

    return step


def ns_per_weight(steps: dict[str, Callable[[], None]], use_kernel: bool, n: int, times: dict) -> None:
    usable = kernels.usable
    if not use_kernel:
        kernels.usable = lambda *tensors: False
    try:
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name, use_kernel].append((time.perf_counter() - t0) / n * 1e9)
    finally:
        kernels.usable = usable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--weights", type=int, default=4 * 1280 * 320)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.usable(torch.empty(0)):
        raise SystemExit("sub8.quant._kernels is not built: run `pip install -e .` (make setup) first")
    w = torch.randn(args.weights, generator=torch.Generator().manual_seed(0)) * 0.05
    steps = {
        "mracos 4b": mracos_step(w),
        "gq 8b soft a=1": gq_step(w, 8, 1.0, False),
        "gq 8b soft a=30": gq_step(w, 8, 30.0, False),
        "gq 8b hard": gq_step(w, 8, 128.0, True),
        "gq 4b soft a=1": gq_step(w, 4, 1.0, False),
        "gq 4b hard": gq_step(w, 4, 128.0, True),
    }
    times = {(name, k): [] for name in steps for k in (True, False)}
    for use_kernel in (True, False):  # warm-up
        ns_per_weight(steps, use_kernel, args.weights, {key: [] for key in times})
    for _ in range(9):
        for use_kernel in (True, False):
            ns_per_weight(steps, use_kernel, args.weights, times)
    print(f"{args.weights:,} weights, {args.threads} thread(s); ns per weight, forward and backward")
    print(f"{'':16s} {'kernel':>8s} {'pytorch':>8s} {'ratio':>6s}")
    for name in steps:
        kernel, pytorch = (statistics.median(times[name, k]) for k in (True, False))
        print(f"{name:16s} {kernel:8.1f} {pytorch:8.1f} {pytorch / kernel:6.1f}")


if __name__ == "__main__":
    main()
