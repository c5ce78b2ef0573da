"""Log-mel features, computed once per split and cached; global CMVN from the train split.

Features are Kaldi-compatible 80-dim log-mel filterbanks (``torchaudio.compliance.kaldi.fbank``, Kaldi's
defaults: povey window, pre-emphasis 0.97, DC removal, power spectrum) with dither off, so the same audio always
gives the same features. Kaldi reads 16-bit PCM as integer-valued floats, so the [-1, 1] samples are scaled by
2^15 first: the log energies then match Kaldi's, and digital silence sits at the energy floor as in Kaldi.

A split is one :class:`FeatureSet`: every utterance's frames in one contiguous float16 tensor plus offsets.
float16 halves memory and disk (~230 MB for 4 h of audio instead of ~460 MB); its relative rounding error is at
most 2^-11 (log-mel values lie in about [-16, 30], so at most 0.008 absolute, against a per-dimension spread of
several units), far below what the model can resolve. The cache ``<features_dir>/<split>.pt`` holds only plain
tensors, lists, dicts and strings (loadable with ``weights_only=True``) and a fingerprint of the manifest bytes and
the feature settings: it is reused while the fingerprint matches and recomputed, with a message, when it does not.
The fingerprint does not read the audio: audio behind an unchanged manifest is assumed unchanged (the corpus is
regenerated bit-identically from its recipe, and a checksum list proves it).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torchaudio.compliance.kaldi as kaldi
from tqdm.auto import tqdm

from sub8.data.audio import load_audio
from sub8.data.manifest import Utterance, read_manifest
from sub8.io import atomic_torch_save, load_checkpoint
from sub8.profiles import SPLITS, FeatureConfig, Profile

# Bump when the extraction or the cache layout changes, so old caches are recomputed rather than misread.
CACHE_VERSION = 1
INT16_SCALE = 2.0**15  # Kaldi's sample scale: features of [-1, 1] audio computed as if read from 16-bit PCM
# A dimension that hardly varies is not blown up by CMVN: float16 storage alone adds noise of ~0.01 at these
# magnitudes, so a smaller spread is noise.
MIN_STD = 1e-2
CMVN_FILE = "cmvn.pt"


def log_mel(samples: torch.Tensor, cfg: FeatureConfig, sample_rate: int = 16000) -> torch.Tensor:
    """(num_samples,) float audio in [-1, 1] -> (T, num_mel_bins) float32 log-mel features."""
    return kaldi.fbank(
        samples.unsqueeze(0) * INT16_SCALE,
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length_ms,
        frame_shift=cfg.frame_shift_ms,
        dither=0.0,
        sample_frequency=sample_rate,
    )


@dataclass
class FeatureSet:
    """All utterances of one split. Utterance i has frames ``feats[offsets[i]:offsets[i+1]]``."""

    feats: torch.Tensor  # (sum_T, F) float16
    offsets: torch.Tensor  # (N+1,) int64, offsets[0] == 0, offsets[-1] == sum_T
    utt_ids: list[str]
    texts: list[str]
    meta: list[dict[str, Any]]  # per utterance: speaker and the manifest's extra scalar fields (engine, voice, ...)

    def __post_init__(self):
        n = len(self.utt_ids)
        if not (len(self.texts) == len(self.meta) == n and self.offsets.shape == (n + 1,)):
            raise ValueError(
                f"FeatureSet: {n} utt_ids, {len(self.texts)} texts, {len(self.meta)} meta, "
                f"offsets of shape {tuple(self.offsets.shape)} (expected ({n + 1},))"
            )
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.feats):
            raise ValueError(f"FeatureSet: offsets span {self.offsets[0]}..{self.offsets[-1]}, feats {len(self.feats)}")

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """(N,) int64 frames per utterance."""
        return self.offsets.diff()

    def num_frames(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def feature(self, i: int) -> torch.Tensor:
        """(T, F) float32 features of utterance i (not normalized)."""
        return self.feats[self.offsets[i] : self.offsets[i + 1]].float()

    def to_state(self) -> dict[str, Any]:
        return {"feats": self.feats, "offsets": self.offsets, "utt_ids": self.utt_ids, "texts": self.texts,
                "meta": self.meta}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> FeatureSet:
        return cls(state["feats"], state["offsets"], state["utt_ids"], state["texts"], state["meta"])


@dataclass
class Cmvn:
    """Global per-dimension mean and standard deviation of the train features."""

    mean: torch.Tensor  # (F,) float32
    std: torch.Tensor  # (F,) float32, >= MIN_STD

    @classmethod
    def from_features(cls, fs: FeatureSet, chunk_frames: int = 1 << 18) -> Cmvn:
        """Statistics over every frame of ``fs``, accumulated in float64 chunk by chunk (a float64 copy of a
        whole split would take 4x its float16 memory)."""
        total = torch.zeros(fs.feats.shape[1], dtype=torch.float64)
        total_sq = torch.zeros_like(total)
        for start in range(0, len(fs.feats), chunk_frames):
            chunk = fs.feats[start : start + chunk_frames].double()
            total += chunk.sum(0)
            total_sq += chunk.square().sum(0)
        n = len(fs.feats)
        mean = total / n
        var = (total_sq / n - mean.square()).clamp_min(0.0)
        return cls(mean.float(), var.sqrt().clamp_min(MIN_STD).float())

    def apply(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., F) features -> (..., F) float32, zero mean and unit variance per dimension over train."""
        return (feats.float() - self.mean.to(feats.device)) / self.std.to(feats.device)

    def to_state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}


def compute_split_features(
    manifest_path: str | os.PathLike, cfg: FeatureConfig, num_workers: int = 1, sample_rate: int = 16000
) -> FeatureSet:
    """Features of every utterance of a manifest, in manifest order, on ``num_workers`` processes."""
    manifest_path = Path(manifest_path)
    utterances = read_manifest(manifest_path, check_audio=False)
    jobs = [(u.utt_id, str(u.audio_filepath), u.offset, u.duration) for u in utterances]
    # Several chunks per worker balance the load; at most 64 utterances a chunk keep the progress bar moving.
    chunk_size = max(1, min(64, math.ceil(len(jobs) / (4 * max(num_workers, 1)))))
    chunks = [(jobs[i : i + chunk_size], cfg, sample_rate) for i in range(0, len(jobs), chunk_size)]
    arrays: list[np.ndarray] = []
    with tqdm(total=len(jobs), desc=f"fbank {manifest_path.name}", unit="utt") as progress:
        for chunk_arrays in _map_chunks(chunks, num_workers):
            arrays.extend(chunk_arrays)
            progress.update(len(chunk_arrays))
    lengths = torch.tensor([len(a) for a in arrays], dtype=torch.int64)
    return FeatureSet(
        feats=torch.from_numpy(np.concatenate(arrays)),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        utt_ids=[u.utt_id for u in utterances],
        texts=[u.text for u in utterances],
        meta=[_metadata(u) for u in utterances],
    )


def _map_chunks(chunks: list, num_workers: int) -> Iterator[list[np.ndarray]]:
    """``_extract_chunk`` over ``chunks``, in order; in this process when one worker suffices."""
    # One torch thread per extracting process: one utterance's fbank is too small to split across threads
    # (measured on the shared 2-core machine: 2 intra-op threads made it 20x slower than 1).
    num_workers = min(num_workers, len(chunks))
    if num_workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(_extract_chunk, chunks)
        finally:
            torch.set_num_threads(threads)
        return
    with multiprocessing.get_context().Pool(num_workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield from pool.imap(_extract_chunk, chunks)


def _extract_chunk(chunk: tuple[list[tuple[str, str, float, float]], FeatureConfig, int]) -> list[np.ndarray]:
    """Worker: (T, F) float16 arrays of a chunk's utterances (numpy: pickles compactly back to the parent)."""
    jobs, cfg, sample_rate = chunk
    arrays = []
    for utt_id, path, offset, duration in jobs:
        try:
            samples = load_audio(path, sample_rate=sample_rate, offset=offset, duration=duration)
        except Exception as e:  # re-raised as a plain error: it must cross the process boundary intact
            raise RuntimeError(f"utterance {utt_id!r}: {e}") from None
        if len(samples) < sample_rate * cfg.frame_length_ms / 1000:  # kaldi.fbank would only assert
            raise RuntimeError(f"utterance {utt_id!r} ({path}): shorter than one {cfg.frame_length_ms} ms frame")
        arrays.append(log_mel(samples, cfg, sample_rate).half().numpy())
    return arrays


def _metadata(utt: Utterance) -> dict[str, Any]:
    """Speaker and the manifest's extra scalar fields (plain types only: the cache loads with weights_only)."""
    meta: dict[str, Any] = {"speaker": utt.speaker}
    meta.update({k: v for k, v in utt.extra.items() if v is None or isinstance(v, (str, int, float, bool))})
    return meta


def prepare_features(profile: Profile, force: bool = False) -> dict[str, FeatureSet]:
    """FeatureSets of every split whose manifest exists, from cache when valid; CMVN from train saved too."""
    sample_rate = profile.corpus.sample_rate if profile.corpus is not None else 16000
    features: dict[str, FeatureSet] = {}
    fingerprints: dict[str, str] = {}
    for split in SPLITS:
        manifest = profile.manifest(split)
        if not manifest.is_file():
            continue
        fingerprints[split] = _fingerprint(manifest, profile.features, sample_rate)
        features[split] = _cached_split(
            profile.features_dir / f"{split}.pt", manifest, fingerprints[split], profile, sample_rate, force
        )
    if not features:
        raise FileNotFoundError(f"no manifests in {profile.data_dir} (build the corpus first)")
    if "train" in features:
        _prepare_cmvn(profile.features_dir / CMVN_FILE, features["train"], fingerprints["train"], force)
    return features


def load_cmvn(profile: Profile) -> Cmvn:
    """The profile's train CMVN, written by :func:`prepare_features`."""
    path = profile.features_dir / CMVN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"CMVN statistics not found: {path} (run prepare_features first)")
    state = load_checkpoint(path)
    return Cmvn(state["mean"], state["std"])


def _cached_split(
    path: Path, manifest: Path, fingerprint: str, profile: Profile, sample_rate: int, force: bool
) -> FeatureSet:
    state, reason = _load_cache(path, fingerprint, force)
    if state is not None:
        return FeatureSet.from_state(state)
    print(f"features {path.name}: {reason}; computing from {manifest}")
    fs = compute_split_features(manifest, profile.features, profile.num_workers, sample_rate)
    atomic_torch_save({"fingerprint": fingerprint, **fs.to_state()}, path)
    return fs


def _prepare_cmvn(path: Path, train: FeatureSet, fingerprint: str, force: bool) -> None:
    state, _ = _load_cache(path, fingerprint, force)
    if state is None:
        atomic_torch_save({"fingerprint": fingerprint, **Cmvn.from_features(train).to_state()}, path)


def _load_cache(path: Path, fingerprint: str, force: bool) -> tuple[dict[str, Any] | None, str]:
    """(the cached state, "") when ``path`` holds a cache made with ``fingerprint``, else (None, why not)."""
    if force:
        return None, "recomputing (force=True)"
    if not path.is_file():
        return None, "no cache"
    try:
        state = load_checkpoint(path)
    except RuntimeError as e:
        return None, f"unreadable cache ({e})"
    if state.get("fingerprint") != fingerprint:
        return None, "cache is stale (manifest or feature settings changed)"
    return state, ""


def _fingerprint(manifest: Path, cfg: FeatureConfig, sample_rate: int) -> str:
    """sha256 of the manifest's bytes, the feature settings and the cache version."""
    digest = hashlib.sha256(manifest.read_bytes())
    settings = {"features": asdict(cfg), "sample_rate": sample_rate, "version": CACHE_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()
