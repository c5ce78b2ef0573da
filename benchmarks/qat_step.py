"""QAT training step ÷ fp32 training step for every method on each baseline, and GQ's peak training memory ÷ fp32's,
all measured in one run (targets: uniform and S8BQAT <= 1.15; GQ <= 1.5 at 8 bits, memory <= 1.3; native <= 2.0
on the Conformers).

    .venv/bin/python benchmarks/qat_step.py [--profile default] [--threads N] [--bits 4] [--gq-bits 8 4]
        [--native w8a8,w4a8,w4a4,mixed] [--no-memory]

Time: the batch of benchmarks/train_step.py, every quantizable weight at the given bits; the fp32 model and every QAT
configuration of one baseline take turns in the same timed rounds (common.time_train_steps: median of 10 steps each),
so a slow spell of the machine cannot land in one ratio only.

- uniform: per-channel fake quantization (parametrized, straight-through).
- s8bqat: the float forward plus the MRACos term in the loss; the hard compressor runs once every T updates, so its
  time is measured separately and added as 1/T of it per step.
- gq: per tensor, in both phases: "soft" (the forward runs w̃, before α reaches its hard threshold) and "hard"
  (straight-through, after). The optimizer updates the weights and GQ's s and u; the projection of u after each
  update (sort and clamp, K values a tensor) is timed separately and added.
- native: integer matmuls of quantized weights and activations (the first warm-up step calibrates the ranges);
  Conformers run every plan, the RNN-Ts w8a8 and w4a8 with their LSTMs unrolled (the fused kernel cannot quantize the
  recurrent input; sub8.quant.native).

Memory (GQ): per configuration in a fresh process, so no earlier allocation is counted: on CUDA the allocator's peak
(torch.cuda.max_memory_allocated) over 3 training steps, model and optimizer state included; on the CPU the
process's peak resident set size (VmHWM, reset just before the model is built) minus the resident size then, i.e. weights,
gradients, AdamW state, activations, GQ's s/u/cells and scratch, plus allocator slack; as the ratio to the fp32 run
measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from common import baseline_model, synthetic_batch, time_train_steps, train_step
from torch import nn

from sub8 import profiles
from sub8.data.batching import Batch
from sub8.quant import GQ, S8BQAT, NativeQAT, QuantPlan, UniformQAT, native_plan
from sub8.quant.native import NATIVE_PLANS

GQ_ANNEAL_STEPS = 100  # GQ's hard phase is timed at this update, its soft phase at update 1
RNNT_NATIVE_PLANS = ("w8a8", "w4a8")  # the study compares the RNN-T at these only


class Regularized(nn.Module):
    """``model`` whose ``loss`` includes the hook's extra loss (what sub8.train.train adds), for time_train_steps."""

    def __init__(self, model: nn.Module, hooks: S8BQAT, step: int) -> None:
        super().__init__()
        self.model, self.hooks, self.step = model, hooks, step

    def loss(self, *batch):
        loss, parts = self.model.loss(*batch)
        return loss + self.hooks.extra_loss(self.step, self.model), parts


def median_seconds(fn: Callable[[], None], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


Timed = tuple[nn.Module, float]  # (what time_train_steps runs, seconds added per step for work outside the step)


def uniform_qat(model: nn.Module, bits: int) -> Timed:
    UniformQAT(QuantPlan.uniform(bits)).on_train_start(model, None)
    return model, 0.0


def s8bqat(model: nn.Module, bits: int, compress_every: int) -> Timed:
    hooks = S8BQAT(QuantPlan.uniform(bits), ramp_steps=0)
    hooks.on_train_start(model, None)
    return Regularized(model, hooks, step=1), median_seconds(lambda: hooks.hard_compress(model), repeats=3) / compress_every


def with_gq(model: nn.Module, bits: int, step: int) -> GQ:
    """Parametrize ``model`` by GQ at update ``step``; GQ's s and u are then among ``model.parameters()``, so the
    timer's AdamW updates them as sub8.train.train does."""
    hooks = GQ(QuantPlan.uniform(bits), anneal_steps=GQ_ANNEAL_STEPS)
    hooks.on_train_start(model, None)
    hooks.set_step(step)
    return hooks


def gq(model: nn.Module, bits: int, step: int) -> Timed:
    hooks = with_gq(model, bits, step)
    return model, median_seconds(lambda: [q.project_(None) for q in hooks.tensors.values()])


def native(model: nn.Module, plan: str) -> Timed:
    NativeQAT(native_plan(plan, model.config.encoder)).on_train_start(model, None)
    return model, 0.0


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status (``VmRSS``: resident now; ``VmHWM``: peak resident), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current resident size (Linux: "5" to clear_refs), so the peak counts only
    what follows: without it the peak of importing torch hid the training peak (every ratio read 1.000)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def memory_child(profile_name: str, model_name: str, bits: int, threads: int) -> None:
    """Runs in its own process: prints the peak training memory in bytes (module docstring) as JSON; bits 0 = fp32."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prof = profiles.get(profile_name)
    batch = synthetic_batch(prof.batch_frames).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        start = status_bytes("VmRSS")
    model = baseline_model(prof, model_name, device)
    hooks = with_gq(model, bits, step=1) if bits else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        train_step(model, optimizer, batch)
        if hooks is not None:
            hooks.after_step(1, model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = status_bytes("VmHWM") - start
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(profile_name: str, model_name: str, bits: int, threads: int) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", profile_name, model_name, str(bits), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bits", type=int, default=4, help="bits of uniform QAT and S8BQAT")
    parser.add_argument("--compress-every", type=int, default=100)
    parser.add_argument("--gq-bits", type=int, nargs="*", default=[8, 4], help="none: skip GQ")
    parser.add_argument("--native", default=",".join(NATIVE_PLANS), help="comma-separated named native plans")
    parser.add_argument("--no-memory", action="store_true", help="skip GQ's peak-memory measurement")
    parser.add_argument("--memory-child", nargs=3, metavar=("PROFILE", "MODEL", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        profile_name, model_name, bits = args.memory_child
        memory_child(profile_name, model_name, int(bits), args.threads)
        return
    native_plans = args.native.split(",") if args.native else []
    unknown = sorted(set(native_plans) - set(NATIVE_PLANS))
    if unknown:
        parser.error(f"unknown native plan(s) {unknown}; choose from {NATIVE_PLANS}")

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prof = profiles.get(args.profile)
    batch = synthetic_batch(prof.batch_frames).to(device)
    print(f"profile {prof.name}, {args.threads} thread(s), {device.type}; QAT step / fp32 step "
          f"(uniform and s8bqat at {args.bits} bits, compressor every {args.compress_every} updates)"
          + ("" if args.no_memory else "; GQ memory: peak / fp32 peak"))
    columns = ["uniform", "s8bqat"]
    columns += [f"gq{b} {phase}" for b in args.gq_bits for phase in ("soft", "hard")]
    columns += [] if args.no_memory else [f"gq{b} mem" for b in args.gq_bits]
    columns += [f"nat {p}" for p in native_plans]
    print(f"{'model':16s} {'fp32 ms':>8s} " + " ".join(f"{c:>10s}" for c in columns))

    for name in prof.baselines:
        def fresh() -> nn.Module:
            return baseline_model(prof, name, device)

        timed: dict[str, Timed] = {
            "fp32": (fresh(), 0.0),
            "uniform": uniform_qat(fresh(), args.bits),
            "s8bqat": s8bqat(fresh(), args.bits, args.compress_every),
        }
        for bits in args.gq_bits:
            timed[f"gq{bits} soft"] = gq(fresh(), bits, step=1)
            timed[f"gq{bits} hard"] = gq(fresh(), bits, step=GQ_ANNEAL_STEPS)
        encoder = fresh().config.encoder
        for plan in native_plans:
            if encoder == "lstm" and plan not in RNNT_NATIVE_PLANS:
                continue
            timed[f"nat {plan}"] = native(fresh(), plan)
        seconds = time_train_steps({label: model for label, (model, _) in timed.items()}, batch)
        fp32 = seconds["fp32"]
        ratios = {label: (seconds[label] + extra) / fp32 for label, (_, extra) in timed.items()}
        del timed
        if not args.no_memory:
            fp32_memory = peak_memory(prof.name, name, 0, args.threads)
            for bits in args.gq_bits:
                ratios[f"gq{bits} mem"] = peak_memory(prof.name, name, bits, args.threads) / fp32_memory
        cells = [f"{ratios[c]:10.3f}" if c in ratios else f"{'-':>10s}" for c in columns]
        print(f"{name:16s} {fp32 * 1000:8.0f} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
