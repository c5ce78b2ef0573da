"""Shared pieces of the benchmarks: the baselines' architectures, a realistic training batch and a step timer.

Benchmarks print numbers measured in one run on this machine; they are never asserted in tests.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch.nn.utils import parametrize

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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    """One training update on ``batch``: forward, transducer loss, backward, optimizer step; the forward with
    parametrizations cached, as sub8.train runs it."""
    with parametrize.cached():
        loss, _ = model.loss(batch.feats, batch.feat_lens, batch.tokens, batch.token_lens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def time_train_steps(
    models: Mapping[str, torch.nn.Module], batch: Batch, rounds: int = 5, steps: int = 2, warmup: int = 2
) -> dict[str, float]:
    """Median seconds of one training step (forward, loss, backward, AdamW update) on ``batch`` for each model.

    The models take turns: after ``warmup`` steps each, every one of ``rounds`` rounds runs ``steps`` steps of
    every model. A slow spell of the machine (this VM's speed wanders by 10-30% over tens of seconds) then slows
    every model alike, where timing one model after another put it into whichever ratio ran at the time."""
    runs = {}
    for name, model in models.items():
        model.train()
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in models}

    def step(name: str) -> float:
        t0 = time.perf_counter()
        train_step(*runs[name], batch)
        return time.perf_counter() - t0

    for name in models:
        for _ in range(warmup):
            step(name)
    for _ in range(rounds):
        for name in models:
            times[name] += [step(name) for _ in range(steps)]
    return {name: statistics.median(t) for name, t in times.items()}


def time_train_step(model: torch.nn.Module, batch: Batch) -> float:
    """Median seconds of one training step of a single model (:func:`time_train_steps`)."""
    return time_train_steps({"model": model}, batch)["model"]
