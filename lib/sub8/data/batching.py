"""Batches bucketed by length under a frame budget, exact mid-epoch resume, data-parallel shards, SpecAugment.

A batch is a run of utterances of similar length, so padding stays small: the utterances are sorted by length
(ties broken by a seeded shuffle, so batch membership varies between epochs) and cut into consecutive runs
whose padded size ``len(batch) * longest`` stays within ``batch_frames``. The order of the batches is then
shuffled, or kept ascending for shortest-first (curriculum) epochs. Everything is a pure function of
(seed, epoch), so a loader resumed from ``{"epoch", "position"}`` yields exactly the batches that were left.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from sub8.data.features import Cmvn, FeatureSet
from sub8.data.tokenizer import Tokenizer


@dataclass
class Batch:
    feats: torch.Tensor  # (B, T, F) float32, CMVN-normalized, zero (= the train mean) past feat_lens
    feat_lens: torch.Tensor  # (B,) int64
    tokens: torch.Tensor  # (B, U) int64, padded with 0 (the blank id) past token_lens
    token_lens: torch.Tensor  # (B,) int64
    utt_ids: list[str]

    def __len__(self) -> int:
        return len(self.utt_ids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            feats=self.feats.to(device, non_blocking=non_blocking),
            feat_lens=self.feat_lens.to(device, non_blocking=non_blocking),
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            token_lens=self.token_lens.to(device, non_blocking=non_blocking),
            utt_ids=self.utt_ids,
        )


def make_batches(
    num_frames: list[int], batch_frames: int, *, seed: int, epoch: int, shuffle: bool, shortest_first: bool
) -> list[list[int]]:
    """Indices of ``num_frames`` grouped into batches; every index appears in exactly one batch.

    Batches satisfy ``len(batch) * max(num_frames[i] for i in batch) <= batch_frames``, except that an utterance
    longer than the budget forms a batch of its own (with a warning). With ``shuffle``, ties in length are broken
    and the batch order is shuffled by an RNG seeded with (seed, epoch); ``shortest_first`` keeps the batches in
    ascending length instead (curriculum). Without either, the order is ascending and ties keep index order.
    """
    if batch_frames <= 0:
        raise ValueError(f"batch_frames must be positive, got {batch_frames}")
    lengths = np.asarray(num_frames, dtype=np.int64)
    rng = np.random.default_rng((seed, epoch))
    # A stable sort of a permutation breaks ties in length at random; the length sequence, and hence where
    # batches are cut and how many there are, is the same in every epoch.
    tie_break = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    order = tie_break[np.argsort(lengths[tie_break], kind="stable")]

    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0  # ascending order: the newest utterance is the batch's longest
    for index in order.tolist():
        length = int(lengths[index])
        if current and (len(current) + 1) * max(longest, length) > batch_frames:
            batches.append(current)
            current = []
        current.append(index)
        longest = length
    if current:
        batches.append(current)

    too_long = int((lengths > batch_frames).sum())
    if too_long:
        warnings.warn(
            f"{too_long} utterance(s) longer than batch_frames={batch_frames} frames (longest {lengths.max()}); "
            "each forms a batch of its own",
            stacklevel=2,
        )
    if shuffle and not shortest_first:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchLoader:
    """Iterable over the :class:`Batch` es of the current epoch, resumable mid-epoch.

    Iterating yields the batches of ``epoch`` from ``position`` on; after the last one the loader moves to the
    next epoch by itself, so a training loop is ``while loader.epoch < num_epochs: for batch in loader: ...``,
    and a loader restored with :meth:`load_state_dict` continues exactly where the saved one stood (a state
    saved while the last batch of an epoch is being used resumes into the next epoch). ``set_epoch(e)`` jumps
    to the start of epoch e.

    Epochs before ``shortest_first_epochs`` present their batches shortest first. With ``num_shards > 1`` (data
    parallel) shard r takes batches r, r+num_shards, ... of the same global batch list; the remainder is dropped
    so every rank runs the same number of steps.
    """

    def __init__(
        self,
        fs: FeatureSet,
        tokenizer: Tokenizer,
        cmvn: Cmvn,
        batch_frames: int,
        seed: int,
        shuffle: bool = True,
        shortest_first_epochs: int = 0,
        num_shards: int = 1,
        shard: int = 0,
    ):
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} outside 0..{num_shards - 1}")
        self.fs = fs
        self.cmvn = cmvn
        self.batch_frames = batch_frames
        self.seed = seed
        self.shuffle = shuffle
        self.shortest_first_epochs = shortest_first_epochs
        self.num_shards = num_shards
        self.shard = shard
        self.tokens = _tokenize(fs, tokenizer)
        self._lengths = fs.lengths  # (N,) int64
        self._num_frames = self._lengths.tolist()
        self._num_batches = len(self.batches(0))  # where batches are cut does not depend on the epoch
        if self._num_batches == 0:
            raise ValueError(f"{len(fs)} utterances give fewer batches than the {num_shards} shards")
        self.epoch = 0
        self.position = 0  # batches of this epoch already handed out

    def batches(self, epoch: int) -> list[list[int]]:
        """This shard's batches (lists of utterance indices) of ``epoch``, in order."""
        batches = make_batches(
            self._num_frames,
            self.batch_frames,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            shortest_first=epoch < self.shortest_first_epochs,
        )
        per_shard = len(batches) // self.num_shards
        return batches[self.shard :: self.num_shards][:per_shard]

    def __len__(self) -> int:
        """Batches per epoch (the same in every epoch)."""
        return self._num_batches

    def __iter__(self) -> Iterator[Batch]:
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            indices = batches[self.position]
            self.position += 1
            yield self.collate(indices)
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def collate(self, indices: list[int]) -> Batch:
        """The padded, CMVN-normalized batch of utterances ``indices``."""
        feat_lens = self._lengths[indices]  # (B,)
        valid = torch.arange(int(feat_lens.max()))[None, :] < feat_lens[:, None]  # (B, T)
        # All frames of the batch in one gather from the split's tensor, normalized in one go.
        frames = (self.fs.offsets[indices][:, None] + torch.arange(valid.shape[1])[None, :])[valid]
        feats = torch.zeros(*valid.shape, self.fs.feats.shape[1])
        feats[valid] = self.cmvn.apply(self.fs.feats[frames])
        tokens = [self.tokens[i] for i in indices]
        return Batch(
            feats=feats,
            feat_lens=feat_lens,
            tokens=pad_sequence(tokens, batch_first=True, padding_value=0),
            token_lens=torch.tensor([len(t) for t in tokens], dtype=torch.int64),
            utt_ids=[self.fs.utt_ids[i] for i in indices],
        )


def _tokenize(fs: FeatureSet, tokenizer: Tokenizer) -> list[torch.Tensor]:
    """Token ids of every text, once; ValueError naming the utterances whose text the tokenizer cannot encode."""
    bad = []
    for utt_id, text in zip(fs.utt_ids, fs.texts):
        unknown = tokenizer.unknown_units(text)
        if unknown:
            bad.append(f"utterance {utt_id!r}: {text!r} has units {', '.join(map(repr, unknown))}")
    if bad:
        listed = "\n".join(bad[:20]) + (f"\n... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise ValueError(f"{len(bad)} text(s) the {tokenizer.kind} tokenizer cannot encode:\n{listed}")
    return [torch.tensor(tokenizer.encode(text), dtype=torch.int64) for text in fs.texts]


class SpecAugment(nn.Module):
    """Frequency and time masking (Park et al., 2019) of a padded (B, T, F) batch, in training mode only.

    Each utterance gets ``freq_masks`` bands of 0..``max_freq_width`` bins and ``time_masks`` spans of
    0..``max_time_ratio`` of its own length. Only valid frames are masked, so padding stays as it was; masked
    values are 0, the CMVN mean. Draws come from torch's global RNG on the batch's device, so a trainer that
    saves and restores the RNG state reproduces the masks.
    """

    def __init__(
        self, freq_masks: int = 2, max_freq_width: int = 27, time_masks: int = 2, max_time_ratio: float = 0.05
    ):
        super().__init__()
        self.freq_masks = freq_masks
        self.max_freq_width = max_freq_width
        self.time_masks = time_masks
        self.max_time_ratio = max_time_ratio

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> torch.Tensor:
        """(B, T, F) features, (B,) lengths -> (B, T, F) masked features (the input itself in eval mode)."""
        if not self.training:
            return feats
        _, frames, bins = feats.shape
        feat_lens = feat_lens.to(feats.device)
        freq = self._spans(torch.full_like(feat_lens, bins), torch.full_like(feat_lens, self.max_freq_width),
                           self.freq_masks, bins)  # (B, F)
        max_time = (feat_lens * self.max_time_ratio).long()
        time = self._spans(feat_lens, max_time, self.time_masks, frames)  # (B, T)
        valid = torch.arange(frames, device=feats.device)[None, :] < feat_lens[:, None]  # (B, T)
        return feats.masked_fill((freq[:, None, :] | time[:, :, None]) & valid[:, :, None], 0.0)

    @staticmethod
    def _spans(extent: torch.Tensor, max_width: torch.Tensor, count: int, size: int) -> torch.Tensor:
        """(B, size) bool: ``count`` spans per row of width U{0..max_width} (capped at the row's ``extent``)
        starting uniformly so that they end within ``extent``."""
        max_width = torch.minimum(max_width, extent)[:, None]  # (B, 1)
        width = (torch.rand(len(extent), count, device=extent.device) * (max_width + 1)).long()  # (B, count)
        start = (torch.rand(len(extent), count, device=extent.device) * (extent[:, None] - width + 1)).long()
        position = torch.arange(size, device=extent.device)[None, None, :]  # (1, 1, size)
        inside = (position >= start[:, :, None]) & (position < (start + width)[:, :, None])  # (B, count, size)
        return inside.any(dim=1)
