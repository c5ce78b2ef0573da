"""fp32 training step time and frames/s of each baseline on this CPU: the denominator of every QAT-overhead ratio.

    .venv/bin/python benchmarks/train_step.py [--profile default] [--threads N]

Times forward + transducer/CTC loss + backward + AdamW on one batch the size of the profile's frame budget
(3 s utterances, 5 words each), median of 10 steps after 2 warm-up steps (common.time_train_steps).
"""

from __future__ import annotations

import argparse
import os
import torch
from common import baseline_model, synthetic_batch, time_train_step

from sub8 import profiles
from sub8.models import count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    batch = synthetic_batch(prof.batch_frames)
    frames = int(batch.feat_lens.sum())
    print(f"profile {prof.name}: batch of {len(batch)} x 3 s utterances ({frames} frames), {args.threads} thread(s)")
    print(f"{'model':16s} {'params':>9s} {'step ms':>8s} {'frames/s':>9s} {'x realtime':>10s}")
    for name in prof.baselines:
        model = baseline_model(prof, name)
        seconds = time_train_step(model, batch)
        print(f"{name:16s} {count_parameters(model):9d} {seconds * 1000:8.0f} {frames / seconds:9.0f} "
              f"{frames / 100 / seconds:10.1f}")


if __name__ == "__main__":
    main()
