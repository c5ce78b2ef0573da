"""Native integer QAT training step ÷ fp32 training step, per plan, on each baseline (target: <= 2.0 on the default
Conformers).

    .venv/bin/python benchmarks/native_qat_step.py [--profile default] [--threads N] [--plans w4a8,mixed]

Same batch and timer as benchmarks/train_step.py and benchmarks/qat_step.py (median of 8 steps after 2 warm-up, the
first of which calibrates the activation ranges), all in one run. Conformers run every plan (w8a8, w4a8, w4a4,
mixed); the RNN-Ts w8a8 and w4a8, with their LSTMs unrolled (sub8.quant.native: the fused kernel cannot quantize
the recurrent input).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch
from common import synthetic_batch, time_train_step
from torch import nn

from sub8 import profiles
from sub8.models import PRESETS, build_model
from sub8.quant.native import NATIVE_PLANS, NativeQAT, native_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--plans", default=",".join(NATIVE_PLANS), help="comma-separated subset of the named plans")
    args = parser.parse_args()
    plans = args.plans.split(",")
    unknown = sorted(set(plans) - set(NATIVE_PLANS))
    if unknown:
        parser.error(f"unknown plan(s) {unknown}; choose from {NATIVE_PLANS}")
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    batch = synthetic_batch(prof.batch_frames)
    print(f"profile {prof.name}, {args.threads} thread(s), batch of {batch.feats.shape[0]} × {batch.feats.shape[1]} "
          f"frames; native step ÷ fp32 step")
    print(f"{'model':16s} {'fp32 ms':>8s} " + " ".join(f"{p:>7s}" for p in plans))
    for name, recipe in prof.baselines.items():
        config = replace(PRESETS[recipe.preset](12), **recipe.model_overrides)

        def fresh() -> nn.Module:
            torch.manual_seed(0)
            return build_model(config)

        fp32 = time_train_step(fresh(), batch)
        ratios = []
        for plan_name in plans:
            if config.encoder == "lstm" and plan_name not in ("w8a8", "w4a8"):
                ratios.append(f"{'-':>7s}")  # the study compares the RNN-T at w8a8 and w4a8 only
                continue
            model = fresh()
            NativeQAT(native_plan(plan_name, config.encoder)).on_train_start(model, None)
            ratios.append(f"{time_train_step(model, batch) / fp32:7.3f}")
        print(f"{name:16s} {fp32 * 1000:8.0f} " + " ".join(ratios))


if __name__ == "__main__":
    main()
