"""Time to derive Lloyd-Max levels for every quantized tensor of the large models at 1-8 bits (target: <= 5 s).

    .venv/bin/python benchmarks/lloyd_max.py [--profile default] [--threads N] [--max-moves M]

Uses the trained ``final.pt`` of each large baseline when it exists (``sub8.experiment.load_model``), else a
randomly initialised model of the same preset. Each tensor is sorted once (``SortedWeights``) and shared by its
eight bit widths. ``--max-moves 0`` times plain Lloyd (two starts, no merge-and-split refinement).
"""

from __future__ import annotations

import argparse
import os
import time
import torch
from common import baseline_model

from sub8 import profiles
from sub8.experiment import load_model, model_dir
from sub8.quant import QuantPlan
from sub8.quant.lloyd_max import SortedWeights, lloyd_max

BITS = range(1, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-moves", type=int, default=16, help="refinement budget of sub8.quant.lloyd_max")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    total = 0.0
    for name, recipe in prof.baselines.items():
        if not recipe.preset.endswith("_large"):
            continue
        trained = (model_dir(prof, name) / "final.pt").exists()
        model = load_model(prof, name) if trained else baseline_model(prof, name)
        tensors = [model.get_parameter(n) for n, _ in QuantPlan.uniform(8).resolve(model)]
        per_bits = dict.fromkeys(BITS, 0.0)
        t0 = time.perf_counter()
        for weight in tensors:
            sorted_weights = SortedWeights.of(weight)
            for bits in BITS:
                t = time.perf_counter()
                lloyd_max(sorted_weights, 2**bits, max_moves=args.max_moves)
                per_bits[bits] += time.perf_counter() - t
        seconds = time.perf_counter() - t0
        total += seconds
        weights = sum(w.numel() for w in tensors)
        detail = " ".join(f"{b}b:{s:.2f}" for b, s in per_bits.items())
        print(f"{name:16s} {'trained' if trained else 'random init'}: {len(tensors)} tensors, {weights} weights, "
              f"{seconds:.2f} s ({detail})")
    print(f"total: {total:.2f} s for bits 1-8 ({args.threads} thread(s), max_moves={args.max_moves})")


if __name__ == "__main__":
    main()
