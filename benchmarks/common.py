"""Shared pieces of the benchmarks: the baselines' architectures, a realistic training batch and a step timer.

Benchmarks print numbers measured in one run on this machine; they are never asserted in tests.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from sub8.data.batching import Batch
from sub8.models import PRESETS, Transducer, build_model
from sub8.profiles import Profile

VOCAB_SIZE = 12  # the digit task's word units (blank included), as the default profile's tokenizer has


def baseline_model(profile: Profile, name: str, device: torch.device | str = "cpu") -> Transducer:
    """A freshly initialised (seed 0) model with the architecture of ``profile``'s baseline ``name``."""
    recipe = profile.baselines[name]
    torch.manual_seed(0)
    return build_model(replace(PRESETS[recipe.preset](VOCAB_SIZE), **recipe.model_overrides)).to(device)


def synthetic_batch(batch_frames: int, seconds: float = 3.0, words: int = 5, vocab_size: int = VOCAB_SIZE,
                    seed: int = 0) -> Batch:
    """A batch shaped like the default profile's: as many ``seconds``-long utterances as fit ``batch_frames``
    10 ms frames, ``words`` target units each, CMVN-like random features."""
    gen = torch.Generator().manual_seed(seed)
    frames = round(seconds * 100)
    n = max(1, batch_frames // frames)
    return Batch(
        feats=torch.randn(n, frames, 80, generator=gen),
        feat_lens=torch.full((n,), frames, dtype=torch.long),
        tokens=torch.randint(1, vocab_size, (n, words), generator=gen),
        token_lens=torch.full((n,), words, dtype=torch.long),
        utt_ids=[str(i) for i in range(n)],
    )


def time_train_step(model: torch.nn.Module, batch: Batch, steps: int = 8, warmup: int = 2) -> float:
    """Median seconds of one training step (forward, loss, backward, AdamW update) on ``batch``."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = model.loss(batch.feats, batch.feat_lens, batch.tokens, batch.token_lens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
