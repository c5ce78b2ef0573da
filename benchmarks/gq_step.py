"""GQ training step ÷ fp32 training step, and GQ peak training memory ÷ fp32's, per baseline (targets: <= 1.5 at
8 bits, memory <= 1.3).

    .venv/bin/python benchmarks/gq_step.py [--profile default] [--threads N] [--bits 8 4]

Time: the batch and timer of benchmarks/train_step.py (median of 8 steps after 2 warm-up), every quantizable weight
at the given bits per tensor, in both GQ phases: "soft" (the forward runs w̃, before α reaches its hard threshold)
and "hard" (straight-through, after). The optimizer updates the weights and GQ's s and u; the projection of u
after each update (sort and clamp, K values a tensor) is timed separately and added.

Memory: measured honestly per configuration in a fresh process (so no earlier allocation is counted): on CUDA the
allocator's peak (torch.cuda.max_memory_allocated) over 3 training steps, model and optimizer state included; on
the CPU the process's peak resident set size (ru_maxrss) minus the resident size just before the model is built,
i.e. weights, gradients, AdamW state, activations, GQ's s/u/cells and scratch, plus allocator slack. Reported as
MB and as the ratio to the fp32 run measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch
from common import synthetic_batch, time_train_step
from torch import nn

from sub8 import profiles
from sub8.models import PRESETS, build_model
from sub8.quant import QuantPlan
from sub8.quant.gq import GQ

ANNEAL_STEPS = 100  # the hard phase is timed at this update, the soft phase at update 1


def fresh_model(profile: profiles.Profile, name: str, device: torch.device) -> nn.Module:
    recipe = profile.baselines[name]
    torch.manual_seed(0)
    return build_model(replace(PRESETS[recipe.preset](12), **recipe.model_overrides)).to(device)


def with_gq(model: nn.Module, bits: int, step: int) -> tuple[nn.Module, GQ]:
    """``model`` parametrized by GQ at update ``step``; GQ's s and u are now among ``model.parameters()``, so the
    timer's AdamW updates them as sub8.train.train does."""
    hooks = GQ(QuantPlan.uniform(bits), anneal_steps=ANNEAL_STEPS)
    hooks.on_train_start(model, None)
    hooks.set_step(step)
    return model, hooks


def projection_seconds(hooks: GQ) -> float:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for quantizer in hooks.tensors.values():
            quantizer.project_(None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(profile_name: str, model_name: str, bits: int, threads: int) -> None:
    """Runs in its own process: prints the peak training memory in bytes (module docstring) as JSON."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prof = profiles.get(profile_name)
    batch = synthetic_batch(prof.batch_frames).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = rss_bytes()
    model = fresh_model(prof, model_name, device)
    hooks = None
    if bits:
        model, hooks = with_gq(model, bits, step=1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(3):
        loss, _ = model.loss(batch.feats, batch.feat_lens, batch.tokens, batch.token_lens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hooks is not None:
            hooks.after_step(1, model, optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start  # ru_maxrss is in KiB on Linux
    print(json.dumps({"peak_bytes": peak, "device": device.type}))


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
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--memory-child", nargs=3, metavar=("PROFILE", "MODEL", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        profile_name, model_name, bits = args.memory_child
        memory_child(profile_name, model_name, int(bits), args.threads)
        return

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prof = profiles.get(args.profile)
    batch = synthetic_batch(prof.batch_frames).to(device)
    memory_how = "CUDA allocator peak" if device.type == "cuda" else "peak RSS growth"
    print(f"profile {prof.name}, {args.threads} thread(s), {device.type}; time: GQ step / fp32 step (soft and hard "
          f"phase); memory: {memory_how}, GQ / fp32")
    header = f"{'model':16s} {'fp32 ms':>8s} {'fp32 MB':>8s}"
    for bits in args.bits:
        header += f" {f'{bits}b soft':>8s} {f'{bits}b hard':>8s} {f'{bits}b mem':>8s}"
    print(header)
    for name in prof.baselines:
        fp32 = time_train_step(fresh_model(prof, name, device), batch)
        fp32_memory = peak_memory(prof.name, name, 0, args.threads)
        row = f"{name:16s} {fp32 * 1000:8.0f} {fp32_memory / 2**20:8.0f}"
        for bits in args.bits:
            ratios = []
            for step in (1, ANNEAL_STEPS):
                model, hooks = with_gq(fresh_model(prof, name, device), bits, step)
                seconds = time_train_step(model, batch) + projection_seconds(hooks)
                ratios.append(seconds / fp32)
            memory = peak_memory(prof.name, name, bits, args.threads)
            row += f" {ratios[0]:8.3f} {ratios[1]:8.3f} {memory / fp32_memory:8.3f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
