"""The synthetic corpus: texts, held-out voices, recipes, deterministic synthesis, checksums, engine errors."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from sub8 import profiles
from sub8.data import synth, texts
from sub8.data.audio import audio_info, save_wav
from sub8.data.manifest import read_manifest
from sub8.profiles import SPLITS, CorpusConfig

# One utterance per engine and held-out status, covering every noise kind and both native rates of festival.
ENGINE_VOICES = [
    ("espeak", "en-us+m1"),
    ("espeak", "en-029+klatt5"),
    ("flite", "slt"),
    ("flite", "rms"),
    ("festival", "cmu_us_slt_arctic_hts"),
    ("festival", "ked_diphone"),
]


def make_utt(i: int, engine: str, voice: str, **overrides) -> dict:
    utt = {
        "id": f"train-{i:05d}", "split": "train", "text": "four oh seven one", "engine": engine, "voice": voice,
        "rate": 1.1, "pitch": 0.9 if synth._has_pitch_control(engine, voice) else None, "speed": 0.93,
        "pad_start": 0.1, "pad_end": 0.2, "noise": synth.NOISE_KINDS[i % len(synth.NOISE_KINDS)],
        "snr_db": None if i % len(synth.NOISE_KINDS) == 0 else 10.0, "peak_dbfs": -3.0, "seed": 1234 + i,
    }
    return utt | overrides


@pytest.fixture(scope="module")
def engine_utts() -> list[dict]:
    return [make_utt(i, engine, voice) for i, (engine, voice) in enumerate(ENGINE_VOICES)]


@pytest.fixture(scope="module")
def synthesized(engine_utts, tmp_path_factory) -> Path:
    audio_dir = tmp_path_factory.mktemp("audio")
    synth.synthesize(engine_utts, audio_dir, num_workers=1, progress=False)
    return audio_dir


@pytest.fixture
def tiny_profile(tmp_path, monkeypatch):
    """The smoke profile shrunk to 6 utterances, with every path under tmp_path."""
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    return profiles.get("smoke", corpus=CorpusConfig(n_train=3, n_dev=1, n_test=2, seed=5), num_workers=1)


def canonical(task: str, text: str) -> str:
    return text.replace("oh", "zero") if task == "digits" else text


# --- texts -----------------------------------------------------------------------------------------------------


def test_digit_texts_are_one_to_seven_spoken_digits():
    rng = np.random.default_rng(0)
    drawn = [texts.draw_text("digits", split, rng) for split in SPLITS for _ in range(200)]
    words = [w for t in drawn for w in t.split(" ")]
    assert all(texts.TEXT_PATTERN.fullmatch(t) and 1 <= len(t.split(" ")) <= 7 for t in drawn)
    assert set(words) == set(texts.vocabulary("digits"))  # "oh" and "zero" both occur
    assert {len(t.split(" ")) for t in drawn} == set(range(1, 8))


def test_command_grammar_has_a_few_dozen_words():
    commands = texts.all_commands()
    assert len(commands) == len(set(commands))
    assert all(texts.TEXT_PATTERN.fullmatch(c) for c in commands)
    assert 24 <= len(texts.vocabulary("commands")) <= 100
    assert "set a timer for five minutes" in commands and "turn on the kitchen lights" in commands


@pytest.mark.parametrize("task", texts.TASKS)
def test_splits_are_disjoint_in_text(task):
    recipe = synth.make_recipe(CorpusConfig(task=task, n_train=300, n_dev=60, n_test=120, seed=2))
    by_split = {s: {canonical(task, u["text"]) for u in recipe if u["split"] == s} for s in SPLITS}
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["dev"]
    assert not by_split["dev"] & by_split["test"]
    assert all(texts.split_of(task, u["text"]) == u["split"] for u in recipe)


def test_split_of_ignores_how_zero_is_spoken():
    assert texts.split_of("digits", "four oh seven") == texts.split_of("digits", "four zero seven")
    with pytest.raises(ValueError, match="unknown word 'ten'"):
        texts.split_of("digits", "ten")


# --- voices and recipes ----------------------------------------------------------------------------------------


def test_dev_and_test_voices_are_never_heard_in_training():
    pools = {s: {(e, v) for e, voices in synth.voice_pool(s).items() for v in voices} for s in SPLITS}
    assert not pools["train"] & pools["test"]
    assert not pools["train"] & pools["dev"]
    assert not pools["dev"] & pools["test"]
    assert {("flite", "rms"), ("festival", "ked_diphone"), ("espeak", "en-gb-scotland+m1")} <= pools["test"]
    assert {("flite", "slt"), ("festival", "cmu_us_slt_arctic_hts")} <= pools["train"]
    recipe = synth.make_recipe(CorpusConfig(n_train=200, n_dev=50, n_test=200, seed=4))
    assert all((u["engine"], u["voice"]) in pools[u["split"]] for u in recipe)
    assert {u["engine"] for u in recipe if u["split"] == "test"} == {"espeak", "flite", "festival"}


def test_configured_voices_exist_in_the_engines():
    # espeak-ng and flite fall back to a default voice on an unknown name instead of failing: check the names.
    espeak_langs = subprocess.run(["espeak-ng", "--voices=en"], capture_output=True, text=True).stdout.split()
    data_dir = re.search(r"Data at: (\S+)", subprocess.run(["espeak-ng", "--version"], capture_output=True,
                                                          text=True).stdout).group(1)
    flite_voices = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split()
    for split in SPLITS:
        assert set(synth.ESPEAK_ACCENTS[split]) <= set(espeak_langs)
        assert all((Path(data_dir) / "voices" / "!v" / v).is_file() for v in synth.ESPEAK_VARIANTS[split])
        assert set(synth.FLITE_VOICES[split]) <= set(flite_voices)


def test_recipe_is_deterministic_per_seed_and_split():
    config = CorpusConfig(n_train=50, n_dev=10, n_test=20, seed=7)
    recipe = synth.make_recipe(config)
    assert recipe == synth.make_recipe(config)
    assert recipe != synth.make_recipe(CorpusConfig(n_train=50, n_dev=10, n_test=20, seed=8))
    resized = synth.make_recipe(CorpusConfig(n_train=50, n_dev=10, n_test=5, seed=7))
    assert [u for u in resized if u["split"] == "train"] == [u for u in recipe if u["split"] == "train"]
    assert len({u["id"] for u in recipe}) == len(recipe) == 80


def test_recipe_file_round_trips_and_names_a_bad_line(tmp_path):
    recipe = synth.make_recipe(CorpusConfig(n_train=4, n_dev=1, n_test=2))
    path = tmp_path / "recipe.jsonl"
    synth.write_recipe(path, recipe)
    assert synth.read_recipe(path) == recipe
    lines = path.read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"engine": "espeak", "voice": "en-us+nobody"})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"recipe.jsonl:2: unknown espeak voice 'en-us\+nobody'"):
        synth.read_recipe(path)


# --- synthesis -------------------------------------------------------------------------------------------------


def test_every_engine_writes_16k_mono_of_plausible_duration(engine_utts, synthesized):
    for utt in engine_utts:
        info = audio_info(synth.wav_path(synthesized, utt))
        padding = utt["pad_start"] + utt["pad_end"]
        assert (info.sample_rate, info.channels) == (16000, 1), utt["voice"]
        assert padding + 0.5 < info.duration < padding + 4.0, (utt["voice"], info.duration)


def test_same_recipe_gives_bit_identical_audio_serial_or_parallel(engine_utts, synthesized, tmp_path):
    synth.synthesize(engine_utts, tmp_path, num_workers=2, progress=False)
    for utt in engine_utts:
        assert synth.wav_path(tmp_path, utt).read_bytes() == synth.wav_path(synthesized, utt).read_bytes()


def test_noise_is_mixed_at_the_recipe_snr():
    t = np.arange(16000) / 16000
    speech = np.sin(2 * np.pi * 220 * t) * np.hanning(len(t))
    clean, noisy = (
        synth._perturb(speech, 16000, make_utt(0, "espeak", "en-us+m1", speed=1.0, noise=kind, snr_db=snr), 16000)
        for kind, snr in [("none", None), ("white", 10.0)]
    )
    # peak_dbfs -3, give or take the noise floor (white noise at -70 dBFS RMS: well under 6 sigma)
    assert np.max(np.abs(noisy)) == pytest.approx(10 ** (-3.0 / 20), abs=6 * 10 ** (synth.NOISE_FLOOR_DBFS / 20))
    scale = np.dot(noisy, clean) / np.dot(clean, clean)  # noisy = scale * clean + noise
    noise = noisy - scale * clean
    speech_part = slice(round(0.1 * 16000), round(0.1 * 16000) + len(speech))  # pad_start 0.1 s
    snr = 10 * np.log10(np.mean((scale * clean[speech_part]) ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(10.0, abs=0.5)


def test_no_digital_silence_only_the_noise_floor():
    # Exact zeros become log(eps) in every mel bin and wreck global CMVN; the padding carries the floor instead.
    speech = np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)
    signal = synth._perturb(speech, 16000, make_utt(0, "espeak", "en-us+m1", speed=1.0, noise="none"), 16000)
    padding = signal[: round(0.1 * 16000)]  # pad_start 0.1 s: nothing but the floor
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean(padding**2)))
    assert np.count_nonzero(signal == 0) == 0
    assert rms_dbfs == pytest.approx(synth.NOISE_FLOOR_DBFS, abs=0.5)


def test_colored_noise_tilts_toward_low_frequencies():
    def low_to_high_power(kind):
        spectrum = np.abs(np.fft.rfft(synth._colored_noise(kind, 30001, np.random.default_rng(0)))) ** 2
        return spectrum[1:1000].mean() / spectrum[-1000:].mean()

    white, pink, brown = (low_to_high_power(kind) for kind in ("white", "pink", "brown"))
    assert white < 2 < pink < brown


# --- build_corpus ----------------------------------------------------------------------------------------------


def test_build_corpus_writes_recipe_manifests_checksums_then_skips(tiny_profile, monkeypatch):
    manifests = synth.build_corpus(tiny_profile, progress=False)
    recipe = synth.read_recipe(tiny_profile.recipe_dir / "recipe.jsonl")
    assert recipe == synth.make_recipe(tiny_profile.corpus)
    for split, n in [("train", 3), ("dev", 1), ("test", 2)]:
        utts = read_manifest(manifests[split])
        assert [u.utt_id for u in utts] == [u["id"] for u in recipe if u["split"] == split] and len(utts) == n
        assert all(u.speaker == f"{u.extra['engine']}:{u.extra['voice']}" for u in utts)
    checksums = (tiny_profile.recipe_dir / "sha256.txt").read_text().splitlines()
    ids = [Path(line.split("  ")[1]).stem for line in checksums]
    assert ids == sorted(u["id"] for u in recipe)

    def must_not_run(*args, **kwargs):
        raise AssertionError("synthesized again although all audio exists")

    monkeypatch.setattr(synth, "synthesize", must_not_run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checksums match: no warning
        assert synth.build_corpus(tiny_profile, progress=False) == manifests


def test_build_corpus_warns_when_audio_differs_from_checksums(tiny_profile):
    synth.build_corpus(tiny_profile, progress=False)
    altered = synth.wav_path(tiny_profile.data_dir / "audio", {"split": "test", "id": "test-00001"})
    save_wav(altered, np.zeros(1600), 16000)
    with pytest.warns(UserWarning, match=r"1 of 6 synthesized files differ .*first: test-00001"):
        synth.build_corpus(tiny_profile, progress=False)


def test_build_corpus_rejects_a_recipe_of_other_sizes(tiny_profile):
    other_sizes = synth.make_recipe(CorpusConfig(n_train=2, n_dev=1, n_test=2))
    synth.write_recipe(tiny_profile.recipe_dir / "recipe.jsonl", other_sizes)
    with pytest.raises(ValueError, match="asks for"):
        synth.build_corpus(tiny_profile, progress=False)


# --- engine errors ---------------------------------------------------------------------------------------------


def test_missing_engine_binary_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(synth.SynthesisError, match="not found on PATH: espeak-ng"):
        synth.synthesize([make_utt(0, "espeak", "en-us+m1")], tmp_path, progress=False)


def test_failing_engine_names_utterance_voice_and_stderr(tmp_path, monkeypatch):
    fake = tmp_path / "espeak-ng"
    fake.write_text("#!/bin/sh\necho 'voice data corrupt' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(synth.SynthesisError, match=r"train-00000: espeak voice en-us\+m1: exit status 3: voice data"):
        synth.synthesize([make_utt(0, "espeak", "en-us+m1")], tmp_path, progress=False)


def test_failing_festival_batch_names_utterance_and_stderr(tmp_path):
    with pytest.raises(synth.SynthesisError, match="train-00000: festival voice no_such_voice: .*unbound variable"):
        synth.synthesize([make_utt(0, "festival", "no_such_voice")], tmp_path, progress=False)
