"""Named configurations of the whole study: ``smoke`` (CI), ``default`` (the committed results), ``librispeech``.

A profile is plain data. Every stage reads its sizes and paths from here, so one name selects a whole run:
``make study PROFILE=smoke``, ``papermill ... -p profile smoke``, ``sub8.profiles.get("smoke")``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from sub8.paths import project_root


@dataclass(frozen=True)
class CorpusConfig:
    """The synthetic corpus: how many utterances of which task, drawn from which seed."""

    task: str = "digits"  # "digits" (connected digit strings) or "commands" (small-vocabulary grammar)
    n_train: int = 8000
    n_dev: int = 500
    n_test: int = 3000
    seed: int = 0
    sample_rate: int = 16000


@dataclass(frozen=True)
class FeatureConfig:
    """Kaldi-compatible log-mel filterbank (torchaudio.compliance.kaldi.fbank)."""

    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0


@dataclass(frozen=True)
class ModelRecipe:
    """How one fp32 baseline is made: an architecture preset (sub8.models.PRESETS), changes to it, a schedule."""

    preset: str
    train: dict  # sub8.train.TrainConfig fields (plain data: profiles import nothing heavy)
    model_overrides: dict = field(default_factory=dict)  # TransducerConfig fields that differ from the preset
    shortest_first_epochs: int = 1  # curriculum: the first epoch(s) go from short to long utterances


@dataclass(frozen=True)
class Profile:
    name: str
    corpus: CorpusConfig | None  # None: the data comes from an importer (librispeech)
    # Word units for the synthetic tasks: a digit string is ~4 words but ~20 characters, and the transducer's joint
    # tensor (B, T', U+1, V) grows with U; measured here, a word-unit RNN-T step is 1.7x faster than a char one.
    token_unit: str = "word"  # "char", "word" or "sentencepiece"
    sentencepiece_vocab: int = 256
    features: FeatureConfig = field(default_factory=FeatureConfig)
    batch_frames: int = 12000  # frame budget per training batch (10 ms frames, padding included)
    eval_batch_frames: int = 40000  # frame budget per decoding batch
    num_workers: int = 2  # processes for synthesis and feature extraction
    librispeech_root: str | None = None  # only for the librispeech profile; default: $LIBRISPEECH_ROOT
    librispeech_splits: tuple[tuple[str, str], ...] = ()  # (our split, LibriSpeech subset)
    baselines: dict[str, ModelRecipe] = field(default_factory=dict)  # the fp32 baselines, by name
    # The schedule of every fine-tune from a baseline (QAT of each method, and the fp32 control that gets the same
    # steps): sub8.train.TrainConfig fields. The same for every method, so differences are the methods'.
    finetune: dict = field(default_factory=dict)

    # Where things go. Committed: data_manifests/<name> (recipes, checksums) and results/<name>.
    # Generated and git-ignored: runs/<name> (audio, manifests, feature caches, checkpoints).
    @property
    def recipe_dir(self) -> Path:
        return project_root() / "data_manifests" / self.name

    @property
    def runs_dir(self) -> Path:
        return project_root() / "runs" / self.name

    @property
    def data_dir(self) -> Path:
        """Audio and the NeMo-style manifests ``<split>.jsonl`` that point at it."""
        return self.runs_dir / "data"

    @property
    def features_dir(self) -> Path:
        return self.runs_dir / "features"

    @property
    def results_dir(self) -> Path:
        return project_root() / "results" / self.name

    def manifest(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"


SPLITS = ("train", "dev", "test")
BASELINES = ("rnnt_small", "rnnt_large", "conformer_small", "conformer_large")


def _baselines(
    train: dict, per_model: dict[str, dict] | None = None, model_overrides: dict[str, dict] | None = None
) -> dict[str, ModelRecipe]:
    """The four baselines (each its preset) with a shared schedule ``train``; ``per_model[name]`` changes fields of
    one model's schedule, ``model_overrides[name]`` its architecture."""
    per_model, overrides = per_model or {}, model_overrides or {}
    return {
        name: ModelRecipe(name, {**train, **per_model.get(name, {})}, dict(overrides.get(name, {})))
        for name in BASELINES
    }


# Smoke-profile models: a few thousand parameters, "large" still larger than "small".
_TINY = dict(lstm_layers=2, lstm_hidden=32, conformer_dim=32, conformer_layers=1, conformer_heads=2,
             conformer_ffn_dim=64, pred_embed_dim=16, pred_hidden=32, joiner_dim=32)
_TINY_LARGE = dict(_TINY, lstm_hidden=48, conformer_dim=48, conformer_layers=2, conformer_ffn_dim=96)


PROFILES: dict[str, Profile] = {
    # Whole study in minutes on 2 CPU cores; only proves that everything runs.
    "smoke": Profile(
        name="smoke",
        corpus=CorpusConfig(n_train=240, n_dev=40, n_test=60, seed=1),
        batch_frames=6000,
        # Tiny models and a few steps: the smoke run proves the code paths, not the numbers.
        baselines=_baselines(
            dict(max_steps=12, lr=3e-3, warmup_steps=4, log_every=4, ckpt_every=6, num_threads=1),
            model_overrides={"rnnt_small": _TINY, "conformer_small": _TINY, "rnnt_large": _TINY_LARGE, "conformer_large": _TINY_LARGE},
        ),
        finetune=dict(max_steps=4, lr=1e-3, warmup_steps=1, log_every=2, ckpt_every=4, num_threads=1),
    ),
    # The committed results: ~8,000 training utterances (~4 h of audio) and a 3,000-utterance test split with
    # voices never heard in training, so WER differences of a few tenths of a point are measurable.
    "default": Profile(
        name="default",
        corpus=CorpusConfig(n_train=8000, n_dev=500, n_test=3000, seed=0),
        batch_frames=6000,
        # The Conformers diverged at lr 2e-3 (loss back on the blank plateau for good at the end of the first,
        # shortest-first epoch, ~step 300) and only left the plateau after ~450 steps at 1e-3 with a 300-step
        # warm-up, so they get that schedule; random order from the start (no curriculum) was slower. At 1,500
        # updates they had not converged (an fp32 fine-tune of 200 more updates gained 0.5-0.9 WER points), hence
        # 2,000, paid for by their narrower subsampling; their CTC weight of 1.0 takes them off the plateau ~300
        # updates sooner (both in sub8.models, above conformer_small).
        # One thread a run, runs side by side (sub8.parallel): on 2 cores two single-threaded runs do 1.25-1.3x the
        # work of one run on both, and a run's numbers do not depend on what else runs beside it.
        baselines=_baselines(
            dict(lr=2e-3, warmup_steps=100, eval_every=250, ckpt_every=250, max_steps=2000, num_threads=1),
            per_model={name: dict(lr=1e-3, warmup_steps=300) for name in ("conformer_small", "conformer_large")},
        ),
        finetune=dict(max_steps=200, lr=3e-4, warmup_steps=20, final_lr_ratio=0.1, ckpt_every=100, num_threads=1),
    ),
    # A real LibriSpeech copy (set LIBRISPEECH_ROOT to the directory holding train-clean-100/, dev-clean/, ...).
    "librispeech": Profile(
        name="librispeech",
        corpus=None,
        token_unit="sentencepiece",
        sentencepiece_vocab=256,
        batch_frames=40000,
        num_workers=os.cpu_count() or 2,
        librispeech_splits=(("train", "train-clean-100"), ("dev", "dev-clean"), ("test", "test-clean")),
    ),
}


def get(name: str, **overrides) -> Profile:
    """The profile called ``name``, with any field replaced by ``overrides`` (e.g. ``batch_frames=8000``)."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}") from None
    if profile.librispeech_splits and profile.librispeech_root is None and os.environ.get("LIBRISPEECH_ROOT"):
        # Read when asked for, not at import, so a notebook or test can set the variable first.
        profile = replace(profile, librispeech_root=os.environ["LIBRISPEECH_ROOT"])
    return replace(profile, **overrides) if overrides else profile
