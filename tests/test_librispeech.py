"""LibriSpeech import on a tiny tree in the real layout: <root>/<subset>/SPK/CHAP/SPK-CHAP-UTT.flac + .trans.txt"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sub8 import profiles
from sub8.data.librispeech import LibriSpeechError, import_librispeech, prepare_librispeech
from sub8.data.manifest import read_manifest

# speaker -> chapter -> transcript (as LibriSpeech writes it: upper case); 2 speakers, 3 chapters, 5 utterances.
TINY_CORPUS = {
    "84": {"121123": ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES"], "121550": ["THE STAIRCASE CREAKED"]},
    "174": {"50561": ["FOREVER IF GO", "YOU'LL SEE"]},
}


def build_subset(root: Path, subset: str) -> dict[str, float]:
    """Write TINY_CORPUS under root/subset as 16 kHz FLAC; return {utt_id: duration in seconds}."""
    rng = np.random.default_rng(0)
    durations = {}
    for speaker, chapters in TINY_CORPUS.items():
        for chapter, sentences in chapters.items():
            chapter_dir = root / subset / speaker / chapter
            chapter_dir.mkdir(parents=True)
            lines = []
            for index, sentence in enumerate(sentences):
                utt_id = f"{speaker}-{chapter}-{index:04d}"
                num_samples = int(rng.integers(3200, 8000))
                sf.write(chapter_dir / f"{utt_id}.flac", 0.1 * rng.standard_normal(num_samples), 16000)
                durations[utt_id] = num_samples / 16000
                lines.append(f"{utt_id} {sentence}\n")
            (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return durations


@pytest.fixture
def tree(tmp_path) -> tuple[Path, dict[str, float]]:
    root = tmp_path / "LibriSpeech"
    return root, build_subset(root, "dev-clean")


def chapter_dir(root: Path, speaker: str = "84", chapter: str = "121123") -> Path:
    return root / "dev-clean" / speaker / chapter


def import_error(root: Path, manifest: Path) -> LibriSpeechError:
    with pytest.raises(LibriSpeechError) as info:
        import_librispeech(root, "dev-clean", manifest)
    assert not manifest.exists()  # nothing written when the tree is inconsistent
    return info.value


def test_import_writes_manifest(tree, tmp_path):
    root, durations = tree
    manifest = tmp_path / "manifests" / "dev.jsonl"
    utterances = import_librispeech(root, "dev-clean", manifest)
    assert [u.utt_id for u in utterances] == [
        "174-50561-0000", "174-50561-0001", "84-121123-0000", "84-121123-0001", "84-121550-0000"
    ]
    first = utterances[2]
    assert first.text == "go do you hear" and first.speaker == "84" and first.extra == {"chapter": "121123"}
    assert first.audio_filepath == chapter_dir(root) / "84-121123-0000.flac"
    assert {u.utt_id: u.duration for u in utterances} == durations
    assert utterances[1].text == "you'll see"
    assert read_manifest(manifest) == utterances
    assert '"audio_filepath":"../LibriSpeech/dev-clean/84/121123/84-121123-0000.flac"' in manifest.read_text()


def test_missing_root_or_subset(tree, tmp_path):
    root, _ = tree
    with pytest.raises(FileNotFoundError, match="LibriSpeech root not found: .*nowhere"):
        import_librispeech(tmp_path / "nowhere", "dev-clean", tmp_path / "m.jsonl")
    expected = r"'test-clean' not found: .*test-clean does not exist .*holds \['dev-clean'\]"
    with pytest.raises(FileNotFoundError, match=expected):
        import_librispeech(root, "test-clean", tmp_path / "m.jsonl")


def test_transcript_line_without_flac(tree, tmp_path):
    root, _ = tree
    (chapter_dir(root) / "84-121123-0001.flac").unlink()
    error = import_error(root, tmp_path / "m.jsonl")
    transcript = chapter_dir(root) / "84-121123.trans.txt"
    assert error.problems == [f"{transcript}:2: no audio file 84-121123-0001.flac in {chapter_dir(root)}"]
    assert f"{transcript}:2: no audio file" in str(error)


def test_flac_without_transcript_line(tree, tmp_path):
    root, _ = tree
    extra = chapter_dir(root) / "84-121123-0002.flac"
    sf.write(extra, np.zeros(1600), 16000)
    error = import_error(root, tmp_path / "m.jsonl")
    transcript = chapter_dir(root) / "84-121123.trans.txt"
    assert error.problems == [f"{extra}: no line for 84-121123-0002 in {transcript}"]


def test_chapter_without_transcript(tree, tmp_path):
    root, _ = tree
    (chapter_dir(root, "174", "50561") / "174-50561.trans.txt").unlink()
    error = import_error(root, tmp_path / "m.jsonl")
    chapter = chapter_dir(root, "174", "50561")
    assert error.problems == [f"{chapter}: 2 .flac file(s) but no transcript 174-50561.trans.txt"]


@pytest.mark.parametrize("bad_line", ["84-121123-0001", "84-999-0001 WRONG CHAPTER", "GO DO YOU HEAR"])
def test_malformed_transcript_line(tree, tmp_path, bad_line):
    root, _ = tree
    transcript = chapter_dir(root) / "84-121123.trans.txt"
    transcript.write_text(transcript.read_text().splitlines()[0] + "\n" + bad_line + "\n")
    error = import_error(root, tmp_path / "m.jsonl")
    assert error.problems[0].startswith(f"{transcript}:2: malformed line {bad_line!r}")


def test_corrupt_flac(tree, tmp_path):
    root, _ = tree
    flac = chapter_dir(root) / "84-121123-0000.flac"
    flac.write_bytes(np.random.default_rng(1).bytes(1000))
    error = import_error(root, tmp_path / "m.jsonl")
    (problem,) = error.problems
    assert problem.startswith(f"{flac}: unreadable or corrupt audio")


@pytest.fixture
def librispeech_profile(tmp_path, monkeypatch):
    """The librispeech profile pointed at a tiny tree, with runs/ under tmp_path."""
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    root = tmp_path / "LibriSpeech"
    for _, subset in profiles.get("librispeech").librispeech_splits:
        build_subset(root, subset)
    return dataclasses.replace(profiles.get("librispeech"), librispeech_root=str(root))


def test_prepare_librispeech_writes_each_split(librispeech_profile, tmp_path):
    manifests = prepare_librispeech(librispeech_profile)
    assert manifests == {split: tmp_path / "runs" / "librispeech" / "data" / f"{split}.jsonl"
                         for split in ("train", "dev", "test")}
    train = read_manifest(manifests["train"])
    assert len(train) == 5 and "train-clean-100" in str(train[0].audio_filepath)


def test_prepare_librispeech_keeps_existing_unless_forced(librispeech_profile):
    manifest = prepare_librispeech(librispeech_profile)["dev"]
    manifest.write_text("kept\n")
    prepare_librispeech(librispeech_profile)
    assert manifest.read_text() == "kept\n"
    prepare_librispeech(librispeech_profile, force=True)
    assert len(read_manifest(manifest)) == 5


def test_prepare_librispeech_without_root_says_what_to_set():
    profile = dataclasses.replace(profiles.get("librispeech"), librispeech_root=None)
    with pytest.raises(ValueError, match="set LIBRISPEECH_ROOT to the directory holding train-clean-100/"):
        prepare_librispeech(profile)
