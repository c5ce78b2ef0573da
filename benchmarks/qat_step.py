"""QAT training step ÷ fp32 training step for uniform QAT and S8BQAT on each baseline (target: <= 1.15).

    .venv/bin/python benchmarks/qat_step.py [--profile default] [--threads N] [--bits 4]

Same batch and timer as benchmarks/train_step.py (median of 8 steps after 2 warm-up), all in one run.
Uniform: per-channel fake quantization of every quantizable weight (parametrized, straight-through).
S8BQAT: float forward plus the MRACos term in the loss; the hard compressor runs once every T updates, so its time
is measured separately and added as 1/T of it per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch
from common import synthetic_batch, time_train_step
from torch import nn

from sub8 import profiles
from sub8.models import PRESETS, build_model
from sub8.quant import S8BQAT, QuantPlan, UniformQAT


class Regularized(nn.Module):
    """``model`` whose ``loss`` includes the hook's extra loss (what sub8.train.train adds), for time_train_step."""

    def __init__(self, model: nn.Module, hooks: S8BQAT, step: int) -> None:
        super().__init__()
        self.model, self.hooks, self.step = model, hooks, step

    def loss(self, *batch):
        loss, parts = self.model.loss(*batch)
        return loss + self.hooks.extra_loss(self.step, self.model), parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--compress-every", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    batch = synthetic_batch(prof.batch_frames)
    plan = QuantPlan.uniform(args.bits)
    print(f"profile {prof.name}, {args.bits} bits, {args.threads} thread(s), "
          f"compressor every {args.compress_every} steps")
    print(f"{'model':16s} {'fp32 ms':>8s} {'uniform':>8s} {'s8bqat':>8s}")
    for name, recipe in prof.baselines.items():
        def fresh() -> nn.Module:
            torch.manual_seed(0)
            return build_model(replace(PRESETS[recipe.preset](12), **recipe.model_overrides))

        fp32 = time_train_step(fresh(), batch)
        model = fresh()
        UniformQAT(plan).on_train_start(model, None)
        uniform = time_train_step(model, batch)
        model = fresh()
        hooks = S8BQAT(plan, ramp_steps=0)
        hooks.on_train_start(model, None)
        s8bqat = time_train_step(Regularized(model, hooks, step=1), batch)
        compress = []
        for _ in range(3):
            t0 = time.perf_counter()
            hooks.hard_compress(model)
            compress.append(time.perf_counter() - t0)
        s8bqat += statistics.median(compress) / args.compress_every
        print(f"{name:16s} {fp32 * 1000:8.0f} {uniform / fp32:8.3f} {s8bqat / fp32:8.3f}")


if __name__ == "__main__":
    main()
