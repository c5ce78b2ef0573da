"""Audio file I/O on top of soundfile (torchaudio.load/save would need torchcodec).

Everything downstream sees one format: a 1-D float32 mono tensor at the study's sample rate. Files in another
rate are resampled on load, and a warning says so; bad files raise :class:`AudioError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as AT

from sub8.io import atomic_path

# Manifest durations are rounded when written by hand or by other tools; a segment that ends this little past
# the end of its file is clipped rather than rejected.
DURATION_TOLERANCE_S = 0.01

# (file rate, target rate) pairs already warned about: resampling is announced once per pair, not per file.
_warned_resample: set[tuple[int, int]] = set()


class AudioError(ValueError):
    """An audio file that is missing, unreadable, empty, or shorter than the segment asked of it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        # Rebuild from (path, reason): the default would pass the formatted message as the only argument, so the
        # error could not cross from a worker process back to the parent.
        return (AudioError, (self.path, self.reason))


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    num_frames: int
    channels: int
    duration: float  # seconds: num_frames / sample_rate


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Read only the header of ``path``; raise :class:`AudioError` if it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    if info.frames <= 0:
        raise AudioError(path, "contains no samples")
    return AudioInfo(
        sample_rate=info.samplerate,
        num_frames=info.frames,
        channels=info.channels,
        duration=info.frames / info.samplerate,
    )


def load_audio(
    path: str | os.PathLike, sample_rate: int = 16000, offset: float = 0.0, duration: float | None = None
) -> torch.Tensor:
    """Read ``duration`` seconds from ``offset`` (the rest of the file if None) of ``path``.

    Returns a (num_samples,) float32 tensor in [-1, 1] at ``sample_rate``: channels are averaged, and a file in
    another rate is resampled (with a warning, once per rate pair). Only the segment is read from disk.
    """
    path = Path(path)
    info = audio_info(path)
    if offset < 0 or (duration is not None and duration <= 0):
        raise AudioError(path, f"invalid segment: offset={offset}, duration={duration}")
    start = round(offset * info.sample_rate)
    if duration is None:
        stop = info.num_frames
    else:
        if offset + duration > info.duration + DURATION_TOLERANCE_S:
            raise AudioError(
                path,
                f"segment offset={offset:.3f}s duration={duration:.3f}s ends past the end of the file "
                f"({info.duration:.3f}s)",
            )
        stop = min(start + round(duration * info.sample_rate), info.num_frames)
    if start >= stop:
        raise AudioError(
            path, f"segment at offset={offset:.3f}s is past the end of the file ({info.duration:.3f}s)"
        )
    try:
        samples = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)[0]
    except (sf.SoundFileError, RuntimeError) as e:
        raise _unreadable(path, e) from None
    if len(samples) < stop - start:  # the header promised more than the file holds
        raise AudioError(path, f"truncated: read {len(samples)} of {stop - start} frames")
    waveform = torch.from_numpy(samples.mean(axis=1) if info.channels > 1 else samples[:, 0])
    if info.sample_rate != sample_rate:
        if (info.sample_rate, sample_rate) not in _warned_resample:
            _warned_resample.add((info.sample_rate, sample_rate))
            warnings.warn(
                f"resampled {path} from {info.sample_rate} Hz to {sample_rate} Hz "
                f"(further files at {info.sample_rate} Hz are resampled without another warning)",
                stacklevel=2,
            )
        waveform = _resampler(info.sample_rate, sample_rate)(waveform)
    return waveform.contiguous()


def save_wav(path: str | os.PathLike, samples: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write (num_samples,) float samples as 16-bit PCM WAV, clipped to [-1, 1], atomically."""
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().numpy()
    samples = np.asarray(samples)
    if samples.ndim != 1:
        raise ValueError(f"save_wav({path}): expected 1-D mono samples, got shape {samples.shape}")
    if not np.issubdtype(samples.dtype, np.floating):
        # Integer PCM would be clipped to {-1, 0, 1}: make the caller scale it explicitly.
        raise ValueError(f"save_wav({path}): expected float samples in [-1, 1], got {samples.dtype}")
    samples = np.clip(samples.astype(np.float32, copy=False), -1.0, 1.0)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), samples, sample_rate, format="WAV", subtype="PCM_16")


@lru_cache(maxsize=16)
def _resampler(orig_freq: int, new_freq: int) -> AT.Resample:
    """A resampler per rate pair: its windowed-sinc kernel is built once (2-4x faster than functional.resample)."""
    return AT.Resample(orig_freq, new_freq)


def _unreadable(path: Path, e: Exception) -> AudioError:
    """The error for a file libsndfile rejects, in libsndfile's words, without the path soundfile prefixes."""
    reason = (getattr(e, "error_string", None) or str(e)).rstrip(".")
    return AudioError(path, f"unreadable or corrupt audio (libsndfile: {reason})")
