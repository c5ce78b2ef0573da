"""Audio I/O and manifest validation: every bad line is named by file, line number and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sub8.data import audio
from sub8.data.audio import AudioError, audio_info, load_audio, save_wav
from sub8.data.manifest import ManifestError, Utterance, read_manifest, write_manifest


def sine(seconds: float, sample_rate: int, channels: int = 1) -> np.ndarray:
    """(frames,) or (frames, channels) float32 tones, a different frequency per channel."""
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    tones = np.stack([0.5 * np.sin(2 * np.pi * 220 * (c + 1) * t) for c in range(channels)], axis=1)
    return tones[:, 0].astype(np.float32) if channels == 1 else tones.astype(np.float32)


@pytest.fixture
def make_wav(tmp_path):
    def make(name: str, seconds: float = 1.0, sample_rate: int = 16000, channels: int = 1) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, sine(seconds, sample_rate, channels), sample_rate, subtype="PCM_16")
        return path

    return make


@pytest.fixture(autouse=True)
def fresh_resample_warnings(monkeypatch):
    """Each test sees the once-per-rate resampling warning afresh."""
    monkeypatch.setattr(audio, "_warned_resample", set())


def line(audio_filepath: str = "a.wav", **fields) -> str:
    record = {"audio_filepath": audio_filepath, "duration": 1.0, "text": "one two"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(text + "\n" for text in lines), encoding="utf-8")
    return path


def read_error(path: Path, **kwargs) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    return info.value


def assert_problem(error: ManifestError, path: Path, line_number: int, field: str | None, words: str) -> None:
    """The message names path:LINE and the field, and the structured problem says the same."""
    where = f"{path}:{line_number}: " + (f"field '{field}': " if field else "")
    listed = [text for text in str(error).splitlines() if text.startswith(where)]
    assert listed, f"no line starting {where!r} in:\n{error}"
    assert any(words in text for text in listed), f"{words!r} not in {listed}"
    assert any(p.line == line_number and p.field == field and words in p.message for p in error.problems)


class GoodTokenizer:
    """Stand-in for sub8.data.tokenizer: knows lower-case letters, space and apostrophe."""

    def unknown_units(self, text: str) -> list[str]:
        return sorted({c for c in text if not (c.islower() or c in " '")})


# ---------------------------------------------------------------------------------------------- audio


def test_audio_info_reads_header(make_wav):
    info = audio_info(make_wav("a.wav", seconds=0.5, sample_rate=8000, channels=2))
    assert (info.sample_rate, info.num_frames, info.channels, info.duration) == (8000, 4000, 2, 0.5)


@pytest.mark.parametrize("sample_rate", [8000, 22050])
def test_load_audio_resamples_with_a_warning(make_wav, sample_rate):
    path = make_wav("a.wav", seconds=1.0, sample_rate=sample_rate)
    with pytest.warns(UserWarning, match=f"resampled .*a.wav from {sample_rate} Hz to 16000 Hz"):
        samples = load_audio(path, sample_rate=16000)
    assert samples.dtype == torch.float32 and samples.shape == (16000,)
    # The tone survives resampling: same energy as the original (0.5 amplitude sine -> RMS 0.354).
    assert samples[1000:-1000].pow(2).mean().sqrt().item() == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_load_audio_warns_once_per_rate(make_wav, recwarn):
    load_audio(make_wav("a.wav", sample_rate=8000))
    load_audio(make_wav("b.wav", sample_rate=8000))
    assert len([w for w in recwarn if "resampled" in str(w.message)]) == 1


def test_load_audio_at_native_rate_does_not_warn(make_wav, recwarn):
    samples = load_audio(make_wav("a.wav"))
    assert samples.shape == (16000,) and not recwarn


def test_load_audio_segment(make_wav):
    path = make_wav("a.wav", seconds=2.0)
    whole = torch.from_numpy(sf.read(path, dtype="float32")[0])
    segment = load_audio(path, offset=0.5, duration=0.25)
    assert torch.equal(segment, whole[8000:12000])
    assert torch.equal(load_audio(path, offset=1.5), whole[24000:])


def test_load_audio_mixes_channels_down(make_wav):
    path = make_wav("stereo.wav", seconds=0.5, channels=2)
    stereo = torch.from_numpy(sf.read(path, dtype="float32")[0])
    mono = load_audio(path)
    assert mono.shape == (8000,)
    torch.testing.assert_close(mono, stereo.mean(dim=1))


def test_load_audio_segment_past_end_is_an_error(make_wav):
    path = make_wav("a.wav", seconds=1.0)
    with pytest.raises(AudioError, match=r"a\.wav: segment .*past the end"):
        load_audio(path, offset=0.8, duration=0.5)
    with pytest.raises(AudioError, match=r"a\.wav: segment at offset=1\.500s is past the end"):
        load_audio(path, offset=1.5)


def test_audio_errors_name_file_and_reason(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    empty = tmp_path / "empty.wav"
    empty.touch()
    for path, reason in [(tmp_path / "missing.wav", "file not found"), (corrupt, "unreadable or corrupt"),
                         (empty, "empty file")]:
        with pytest.raises(AudioError, match=reason) as info:
            load_audio(path)
        assert str(path) in str(info.value) and info.value.path == path


def test_save_wav_writes_clipped_16bit_pcm_atomically(tmp_path):
    path = tmp_path / "out" / "a.wav"
    save_wav(path, torch.tensor([0.0, 0.5, 2.0, -3.0]), 16000)
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate) == ("WAV", "PCM_16", 16000)
    np.testing.assert_allclose(sf.read(path, dtype="float32")[0], [0.0, 0.5, 1.0, -1.0], atol=1 / 32768)
    assert os.listdir(path.parent) == ["a.wav"]  # no temporary file left behind


def test_save_wav_rejects_integer_and_multichannel_samples(tmp_path):
    with pytest.raises(ValueError, match="float samples"):
        save_wav(tmp_path / "a.wav", np.zeros(10, dtype=np.int16), 16000)
    with pytest.raises(ValueError, match="1-D mono"):
        save_wav(tmp_path / "a.wav", np.zeros((10, 2), dtype=np.float32), 16000)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- manifest: good input


def test_read_valid_manifest(tmp_path, make_wav):
    make_wav("audio/a.wav", seconds=2.0)
    manifest = write_lines(tmp_path / "m.jsonl", [
        line("audio/a.wav", duration=1.0, speaker="s1", engine="flite"),
        "",  # blank lines are allowed
        line("audio/a.wav", duration=0.5, offset=1.5, utt_id="second", speaker=7),
    ])
    first, second = read_manifest(manifest, tokenizer=GoodTokenizer())
    assert first == Utterance(utt_id="a", audio_filepath=tmp_path / "audio/a.wav", duration=1.0, text="one two",
                              speaker="s1", extra={"engine": "flite"})
    assert (second.utt_id, second.offset, second.speaker, second.extra) == ("second", 1.5, "7", {})


def test_relative_paths_resolve_against_manifest_dir(tmp_path, make_wav, monkeypatch):
    make_wav("data/audio/a.wav")
    manifest = write_lines(tmp_path / "data" / "m.jsonl", [line("audio/a.wav")])
    monkeypatch.chdir(tmp_path)  # a cwd-relative reading would look for ./audio/a.wav and fail
    (utt,) = read_manifest(Path("data/m.jsonl"))
    assert utt.audio_filepath == tmp_path / "data" / "audio" / "a.wav"


def test_round_trip(tmp_path, make_wav):
    wav = make_wav("audio/a.wav", seconds=3.0)
    utterances = [
        Utterance("u1", wav, 1.0, "one two", speaker="s1", extra={"voice": "slt", "snr_db": 12.5, "engine": "f"}),
        Utterance("u2", wav, 1.25, "three", offset=1.5),
    ]
    manifest = tmp_path / "manifests" / "train.jsonl"
    write_manifest(manifest, utterances)
    assert read_manifest(manifest) == utterances
    first = manifest.read_text().splitlines()[0]
    assert first == ('{"audio_filepath":"../audio/a.wav","duration":1.0,"text":"one two","speaker":"s1",'
                     '"utt_id":"u1","engine":"f","snr_db":12.5,"voice":"slt"}')


def test_utterance_rejects_extra_keys_that_shadow_fields(tmp_path):
    with pytest.raises(ValueError, match="clash"):
        Utterance("u", tmp_path / "a.wav", 1.0, "x", extra={"text": "y"})


def test_missing_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest not found: .*nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")


# -------------------------------------------------------------------------------------- manifest: bad input


def test_invalid_json(tmp_path, make_wav):
    make_wav("a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line(), '{"audio_filepath": "a.wav", "duration": 1.0'])
    assert_problem(read_error(manifest), manifest, 2, None, "invalid JSON")


def test_line_not_an_object(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", ['["a.wav", 1.0, "one"]'])
    assert_problem(read_error(manifest), manifest, 1, None, "expected a JSON object, got array")


@pytest.mark.parametrize("field", ["audio_filepath", "duration", "text"])
def test_missing_required_field(tmp_path, make_wav, field):
    make_wav("a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line(**{field: ...})])
    assert_problem(read_error(manifest), manifest, 1, field, "missing")


def test_wrong_type(tmp_path, make_wav):
    make_wav("a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line(duration="abc"), line(utt_id="b", text=5)])
    error = read_error(manifest)
    assert_problem(error, manifest, 1, "duration", "expected a number of seconds, got string 'abc'")
    assert_problem(error, manifest, 2, "text", "expected a string, got number")


@pytest.mark.parametrize("duration, words", [("0", "must be > 0"), ("-1.5", "must be > 0"), ("NaN", "finite")])
def test_non_positive_or_nan_duration(tmp_path, make_wav, duration, words):
    make_wav("a.wav")
    raw = f'{{"audio_filepath": "a.wav", "duration": {duration}, "text": "a"}}'
    manifest = write_lines(tmp_path / "m.jsonl", [raw])
    assert_problem(read_error(manifest), manifest, 1, "duration", words)


def test_negative_offset(tmp_path, make_wav):
    make_wav("a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line(offset=-0.5)])
    assert_problem(read_error(manifest), manifest, 1, "offset", "must be >= 0")


@pytest.mark.parametrize("text", ["", "  \t "])
def test_empty_text(tmp_path, make_wav, text):
    make_wav("a.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line(text=text)])
    assert_problem(read_error(manifest), manifest, 1, "text", "empty")


def test_duplicate_utt_id(tmp_path, make_wav):
    make_wav("a.wav")
    make_wav("b.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line("a.wav", utt_id="x"), line("b.wav", utt_id="x")])
    assert_problem(read_error(manifest), manifest, 2, "utt_id", "duplicate id 'x' (first on line 1)")


def test_duplicate_file_and_offset(tmp_path, make_wav):
    make_wav("a.wav", seconds=2.0)
    manifest = write_lines(tmp_path / "m.jsonl", [line(utt_id="x", offset=0.5), line(utt_id="y", offset=0.5)])
    assert_problem(read_error(manifest), manifest, 2, "audio_filepath", "same file and offset as line 1")


def test_missing_audio_file(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [line("gone.wav")])
    assert_problem(read_error(manifest), manifest, 1, "audio_filepath", f"{tmp_path / 'gone.wav'}: file not found")
    assert read_manifest(manifest, check_audio=False)[0].utt_id == "gone"  # without the check the line is fine


@pytest.mark.parametrize("content, words", [(b"", "empty file"), (None, "unreadable or corrupt audio")])
def test_unreadable_audio(tmp_path, content, words):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(np.random.default_rng(0).bytes(2048) if content is None else content)
    manifest = write_lines(tmp_path / "m.jsonl", [line("bad.wav")])
    assert_problem(read_error(manifest), manifest, 1, "audio_filepath", words)


def test_truncated_audio_is_shorter_than_declared(tmp_path, make_wav):
    wav = make_wav("a.wav", seconds=1.0)
    wav.write_bytes(wav.read_bytes()[:16044])  # header + 0.5 s of 16-bit samples
    manifest = write_lines(tmp_path / "m.jsonl", [line(duration=1.0)])
    assert_problem(read_error(manifest), manifest, 1, "duration", "past the end")


def test_duration_inconsistent_with_file(tmp_path, make_wav):
    make_wav("a.wav", seconds=1.0)
    manifest = write_lines(tmp_path / "m.jsonl", [
        line(utt_id="a", duration=1.005),  # within the rounding tolerance
        line(utt_id="b", duration=0.5, offset=0.6),
    ])
    error = read_error(manifest)
    assert_problem(error, manifest, 2, "duration", "offset 0.6s + duration 0.5s is past the end")
    assert [p.line for p in error.problems] == [2]


def test_other_sample_rate_is_resampled_not_an_error(tmp_path, make_wav):
    make_wav("a.wav", sample_rate=22050)
    make_wav("b.wav", sample_rate=22050)
    make_wav("c.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line("a.wav"), line("b.wav"), line("c.wav")])
    expected = r"2 utterance\(s\) not at 16000 Hz \(2 at 22050 Hz\); they are resampled"
    with pytest.warns(UserWarning, match=expected):
        assert len(read_manifest(manifest)) == 3


def test_units_outside_tokenizer(tmp_path, make_wav):
    make_wav("a.wav")
    make_wav("b.wav")
    manifest = write_lines(tmp_path / "m.jsonl", [line("a.wav", text="one two"), line("b.wav", text="Über 7")])
    error = read_error(manifest, tokenizer=GoodTokenizer())
    assert_problem(error, manifest, 2, "text", "units not in the tokenizer's vocabulary: '7', 'Ü'")
    assert len(read_manifest(manifest)) == 2  # without a tokenizer, any text is fine


def test_every_bad_line_is_reported_and_listing_is_capped(tmp_path, make_wav):
    make_wav("a.wav")
    # 25 distinct segments of one file, each with empty text.
    bad_lines = [line(offset=(i + 1) / 100, duration=0.5, utt_id=f"u{i}", text="") for i in range(25)]
    manifest = write_lines(tmp_path / "m.jsonl", [line(), ""] + bad_lines)
    error = read_error(manifest)
    assert [p.line for p in error.problems] == list(range(3, 28))  # blank line 2 still counts
    message = str(error).splitlines()
    assert message[0] == f"25 problem(s) in manifest {manifest}:"
    assert len(message) == 1 + 20 + 1 and message[-1] == "... and 5 more"


def test_several_problems_on_one_line(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", [line("gone.wav", duration=-1, offset="x", text=" ")])
    error = read_error(manifest)
    assert {p.field for p in error.problems} == {"audio_filepath", "duration", "offset", "text"}


def test_only_blank_lines(tmp_path):
    manifest = write_lines(tmp_path / "m.jsonl", ["", "  "])
    assert "no utterances" in str(read_error(manifest))


def test_audio_error_survives_a_process_boundary():
    # Feature extraction runs in worker processes; their errors come back pickled.
    import pickle

    err = pickle.loads(pickle.dumps(AudioError("/data/a.wav", "corrupt header")))
    assert isinstance(err, AudioError) and err.reason == "corrupt header" and "a.wav" in str(err)
