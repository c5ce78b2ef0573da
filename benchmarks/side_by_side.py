"""Training throughput of runs side by side (one thread each, sub8.parallel) ÷ one run on every core, per baseline:
the reason the study runs its baselines and fine-tunes side by side.

    .venv/bin/python benchmarks/side_by_side.py [--profile default] [--steps 20]

For each baseline: the steps per second of one run with all cores' threads (common.time_train_steps on the batch of
benchmarks/train_step.py), then the summed steps per second of one single-threaded run per core launched through
sub8.parallel.run_side_by_side, all starting together and timing the same number of steps. A ratio above 1 means the
side-by-side runs get more done. Both are measured in this one run, alternating per model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import baseline_model, synthetic_batch, time_train_steps, train_step

from sub8 import profiles
from sub8.parallel import parallel_workers, run_side_by_side

START_DELAY_S = 15.0  # spawned workers import torch and build the model before the common start


def timed_run(out_dir: str, profile: str, name: str, steps: int, start_at: float, index: int) -> None:
    """A side-by-side job: build the model and batch, wait for the common start, time ``steps`` training steps."""
    prof = profiles.get(profile)
    model, batch = baseline_model(prof, name), synthetic_batch(prof.batch_frames)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_step(model, optimizer, batch)  # warm-up
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch)
    Path(out_dir, f"{index}.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default", choices=sorted(profiles.PROFILES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side-by-side run")
    args = parser.parse_args()
    prof = profiles.get(args.profile)
    cores, workers = os.cpu_count() or 1, parallel_workers(1)
    print(f"profile {prof.name}: {cores} cores; one run x {cores} threads vs {workers} runs x 1 thread")
    print(f"{'model':16s} {'alone steps/s':>14s} {'side by side steps/s':>21s} {'ratio':>6s}")
    for name in prof.baselines:
        torch.set_num_threads(cores)
        alone = 1 / time_train_steps({name: baseline_model(prof, name)}, synthetic_batch(prof.batch_frames))[name]
        with tempfile.TemporaryDirectory() as out:
            start_at = time.time() + START_DELAY_S
            jobs = [(prof.name, name, args.steps, start_at, i) for i in range(workers)]
            run_side_by_side(timed_run, out, jobs, [f"{name} #{i}" for i in range(workers)], num_threads=1)
            together = sum(args.steps / json.loads(p.read_text())["seconds"] for p in Path(out).glob("*.json"))
        print(f"{name:16s} {alone:14.2f} {together:21.2f} {together / alone:6.2f}")


if __name__ == "__main__":
    main()
