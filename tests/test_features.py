"""Log-mel features, the per-split cache and its fingerprint, float16 storage, global CMVN."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi

from sub8.data import features as features_module
from sub8.data.audio import load_audio
from sub8.data.features import (
    Cmvn,
    FeatureSet,
    compute_split_features,
    load_cmvn,
    log_mel,
    prepare_features,
)
from sub8.data.manifest import Utterance, write_manifest
from sub8.profiles import FeatureConfig, get

CFG = FeatureConfig()


def make_wav(path: Path, seconds: float, seed: int, sample_rate: int = 16000) -> Path:
    """A tone with noise: distinct per seed, so features differ between utterances."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(len(t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


def make_split(manifest: Path, n: int, first_seed: int = 0) -> list[Utterance]:
    utterances = [
        Utterance(
            utt_id=f"utt{first_seed + i}",
            audio_filepath=make_wav(manifest.parent / "audio" / f"utt{first_seed + i}.wav", 0.3 + 0.1 * i,
                                    seed=first_seed + i),
            duration=0.3 + 0.1 * i,
            text="one two",
            speaker=f"spk{i % 2}",
            extra={"engine": "espeak", "voice": "en", "snr_db": 20.0},
        )
        for i in range(n)
    ]
    write_manifest(manifest, utterances)
    return utterances


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """The smoke profile rooted in tmp_path, with small train/dev manifests; one process for speed."""
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    profile = get("smoke", num_workers=1)
    make_split(profile.manifest("train"), 6)
    make_split(profile.manifest("dev"), 3, first_seed=10)
    return profile


def test_log_mel_equals_kaldi_fbank_on_int16_scale(tmp_path):
    samples = load_audio(make_wav(tmp_path / "tone.wav", 1.0, seed=3))
    feats = log_mel(samples, CFG)
    assert feats.shape == (1 + (16000 - 400) // 160, 80) and feats.dtype == torch.float32
    direct = kaldi.fbank(samples[None] * 32768, num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0)
    torch.testing.assert_close(feats, direct, rtol=0, atol=0)
    torch.testing.assert_close(log_mel(samples, CFG), feats, rtol=0, atol=0)  # deterministic: no dither


def test_float16_storage_error_bound(tmp_path):
    samples = load_audio(make_wav(tmp_path / "tone.wav", 1.0, seed=4))
    feats = log_mel(samples, CFG)
    error = (feats.half().float() - feats).abs()
    assert (error <= feats.abs() * 2.0**-11 + 1e-7).all()  # round to nearest, 11 significant bits
    assert error.max() < 0.01  # log-mel values stay below 32 in magnitude


def test_compute_split_features_matches_direct_extraction(tmp_path):
    manifest = tmp_path / "split.jsonl"
    utterances = make_split(manifest, 4)
    fs = compute_split_features(manifest, CFG, num_workers=1)
    assert len(fs) == 4 and fs.feats.dtype == torch.float16 and fs.offsets[0] == 0
    assert fs.utt_ids == [u.utt_id for u in utterances] and fs.texts == ["one two"] * 4
    assert fs.meta[1] == {"speaker": "spk1", "engine": "espeak", "voice": "en", "snr_db": 20.0}
    for i, utt in enumerate(utterances):
        direct = log_mel(load_audio(utt.audio_filepath), CFG)
        assert fs.num_frames(i) == len(direct) == fs.lengths[i]
        torch.testing.assert_close(fs.feature(i), direct.half().float(), rtol=0, atol=0)


def test_worker_processes_give_identical_features(tmp_path):
    manifest = tmp_path / "split.jsonl"
    make_split(manifest, 5)
    serial = compute_split_features(manifest, CFG, num_workers=1)
    parallel = compute_split_features(manifest, CFG, num_workers=2)
    assert torch.equal(serial.feats, parallel.feats) and torch.equal(serial.offsets, parallel.offsets)


def test_missing_audio_error_names_utterance_and_file(tmp_path):
    manifest = tmp_path / "split.jsonl"
    utterances = make_split(manifest, 2)
    utterances[1].audio_filepath.unlink()
    with pytest.raises(RuntimeError, match=r"utterance 'utt1'.*utt1\.wav.*file not found"):
        compute_split_features(manifest, CFG, num_workers=1)


def test_too_short_utterance_is_named(tmp_path):
    manifest = tmp_path / "split.jsonl"
    write_manifest(manifest, [Utterance("blip", make_wav(tmp_path / "blip.wav", 0.01, seed=1), 0.01, "one")])
    with pytest.raises(RuntimeError, match="'blip'.*shorter than one 25.0 ms frame"):
        compute_split_features(manifest, CFG)


def test_segments_use_offset_and_duration(tmp_path):
    path = make_wav(tmp_path / "long.wav", 2.0, seed=5)
    manifest = tmp_path / "seg.jsonl"
    write_manifest(manifest, [Utterance("seg", path, duration=0.5, text="one", offset=1.0)])
    fs = compute_split_features(manifest, CFG)
    direct = log_mel(load_audio(path)[16000:24000], CFG)
    torch.testing.assert_close(fs.feature(0), direct.half().float(), rtol=0, atol=0)


def test_prepare_features_caches_and_cmvn_normalizes_train(profile):
    sets = prepare_features(profile)
    assert set(sets) == {"train", "dev"}  # no test manifest: no test split
    cmvn = load_cmvn(profile)
    normalized = cmvn.apply(sets["train"].feats)
    torch.testing.assert_close(normalized.mean(0), torch.zeros(80), rtol=0, atol=1e-4)
    torch.testing.assert_close(normalized.std(0, correction=0), torch.ones(80), rtol=0, atol=1e-4)
    for name in ("train.pt", "dev.pt", "cmvn.pt"):  # plain data only
        state = torch.load(profile.features_dir / name, weights_only=True)
        assert isinstance(state["fingerprint"], str)


def test_cache_reused_then_invalidated_by_manifest_change(profile, monkeypatch):
    first = prepare_features(profile)
    calls = []

    def must_not_compute(manifest, *args, **kwargs):
        calls.append(Path(manifest).name)
        raise AssertionError(f"recomputed {manifest} although its cache is current")

    monkeypatch.setattr(features_module, "compute_split_features", must_not_compute)
    again = prepare_features(profile)
    assert torch.equal(again["train"].feats, first["train"].feats) and again["dev"].utt_ids == first["dev"].utt_ids

    make_split(profile.manifest("dev"), 4, first_seed=20)  # a changed manifest: its cache is stale
    with pytest.raises(AssertionError, match="dev.jsonl"):
        prepare_features(profile)
    assert calls == ["dev.jsonl"]  # train was still reused


def test_stale_cache_recomputed_and_said_so(profile, capsys):
    before = prepare_features(profile)["dev"]
    make_split(profile.manifest("dev"), 2, first_seed=30)
    after = prepare_features(profile)["dev"]
    assert "dev.pt: cache is stale" in capsys.readouterr().out
    assert after.utt_ids == ["utt30", "utt31"] and after.utt_ids != before.utt_ids
    cmvn_before = load_cmvn(profile)
    make_split(profile.manifest("train"), 3, first_seed=40)  # new train data: new CMVN
    prepare_features(profile)
    assert not torch.equal(load_cmvn(profile).mean, cmvn_before.mean)


def test_force_recomputes(profile, capsys):
    prepare_features(profile)
    capsys.readouterr()
    prepare_features(profile, force=True)
    assert capsys.readouterr().out.count("force=True") == 2


def test_feature_config_change_invalidates_cache(profile):
    prepare_features(profile)
    profile40 = get("smoke", num_workers=1, features=FeatureConfig(num_mel_bins=40))
    assert prepare_features(profile40)["train"].feats.shape[1] == 40


def test_no_manifests_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no manifests"):
        prepare_features(get("smoke"))
    with pytest.raises(FileNotFoundError, match="CMVN"):
        load_cmvn(get("smoke"))


def test_cmvn_statistics_in_float64_chunks():
    feats = (torch.randn(1000, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 3.0, 0.0]) + 20).half()
    fs = FeatureSet(feats, torch.tensor([0, 400, 1000]), ["a", "b"], ["x", "y"], [{}, {}])
    cmvn = Cmvn.from_features(fs, chunk_frames=128)  # several chunks
    exact = feats.double()
    torch.testing.assert_close(cmvn.mean, exact.mean(0).float())
    torch.testing.assert_close(cmvn.std[:3], exact.std(0, correction=0)[:3].float())
    assert cmvn.std[3] == features_module.MIN_STD  # a constant dimension is not divided by zero


def test_feature_set_rejects_inconsistent_offsets():
    with pytest.raises(ValueError, match="offsets"):
        FeatureSet(torch.zeros(10, 80, dtype=torch.float16), torch.tensor([0, 4, 9]), ["a", "b"], ["x", "y"], [{}, {}])
