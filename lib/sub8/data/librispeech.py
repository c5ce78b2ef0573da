"""Import a local LibriSpeech copy into the study's manifests.

LibriSpeech's layout: ``<root>/<subset>/SPK/CHAP/SPK-CHAP-UTT.flac``, and per chapter one transcript
``SPK-CHAP.trans.txt`` whose lines read ``SPK-CHAP-UTT UPPER CASE WORDS``. Only file headers are read, so importing
train-clean-100 (28,539 files) takes seconds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sub8.data.audio import AudioError, audio_info
from sub8.data.manifest import Utterance, format_problems, write_manifest
from sub8.profiles import Profile


class LibriSpeechError(ValueError):
    """Every inconsistency found in one subset; ``problems`` lists them as ``file[:LINE]: what is wrong``."""

    def __init__(self, subset_dir: Path, problems: list[str]):
        self.subset_dir = subset_dir
        self.problems = problems
        super().__init__(format_problems(f"LibriSpeech subset {subset_dir}", problems))


def import_librispeech(root: str | os.PathLike, subset: str, manifest_path: str | os.PathLike) -> list[Utterance]:
    """Write the manifest of ``<root>/<subset>`` to ``manifest_path`` and return its utterances.

    Text is lower-cased; ``speaker`` is SPK, ``utt_id`` is SPK-CHAP-UTT, ``extra["chapter"]`` is CHAP, and
    ``duration`` comes from the FLAC header. Raises :class:`LibriSpeechError` listing every transcript line
    without audio, audio without a transcript line, malformed transcript line and unreadable file.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"LibriSpeech root not found: {root}")
    subset_dir = root / subset
    if not subset_dir.is_dir():
        present = [d.name for d in _subdirs(root)]
        raise FileNotFoundError(
            f"LibriSpeech subset {subset!r} not found: {subset_dir} does not exist "
            f"({root} holds {present or 'no directories'}; the root is the directory holding train-clean-100/, "
            f"dev-clean/, ...)"
        )
    problems: list[str] = []
    utterances: list[Utterance] = []
    for speaker_dir in _subdirs(subset_dir):
        for chapter_dir in _subdirs(speaker_dir):
            utterances += _import_chapter(speaker_dir.name, chapter_dir, problems)
    if not problems and not utterances:
        problems.append(f"{subset_dir}: no utterances found (expected SPK/CHAP/SPK-CHAP-UTT.flac)")
    if problems:
        raise LibriSpeechError(subset_dir, problems)
    write_manifest(manifest_path, utterances)
    return utterances


def prepare_librispeech(profile: Profile, force: bool = False) -> dict[str, Path]:
    """Write ``profile.manifest(split)`` for each (split, subset) of ``profile.librispeech_splits``.

    An existing manifest is kept unless ``force``. Returns {split: manifest path}.
    """
    subsets = [subset for _, subset in profile.librispeech_splits]
    if not subsets:
        raise ValueError(f"profile {profile.name!r} names no LibriSpeech subsets (librispeech_splits is empty)")
    if profile.librispeech_root is None:
        raise ValueError(
            f"profile {profile.name!r} needs a local LibriSpeech copy: set LIBRISPEECH_ROOT to the directory "
            f"holding {', '.join(s + '/' for s in subsets)} (e.g. `export LIBRISPEECH_ROOT=/data/LibriSpeech`) "
            f"before starting Python"
        )
    manifests: dict[str, Path] = {}
    for split, subset in profile.librispeech_splits:
        path = profile.manifest(split)
        if force or not path.is_file():
            import_librispeech(profile.librispeech_root, subset, path)
        manifests[split] = path
    return manifests


def _import_chapter(speaker: str, chapter_dir: Path, problems: list[str]) -> list[Utterance]:
    """The utterances of one chapter directory, in transcript order; inconsistencies go to ``problems``."""
    chapter = chapter_dir.name
    flacs = {e.name[: -len(".flac")]: Path(e.path) for e in os.scandir(chapter_dir) if e.name.endswith(".flac")}
    transcript = chapter_dir / f"{speaker}-{chapter}.trans.txt"
    if not transcript.is_file():
        if flacs:
            problems.append(f"{chapter_dir}: {len(flacs)} .flac file(s) but no transcript {transcript.name}")
        return []
    id_pattern = re.compile(rf"{re.escape(speaker)}-{re.escape(chapter)}-\d+")
    utterances: list[Utterance] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(transcript.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        utt_id, _, text = line.strip().partition(" ")
        where = f"{transcript}:{number}"
        if not id_pattern.fullmatch(utt_id) or not text.strip():
            problems.append(f"{where}: malformed line {line!r} (expected '{speaker}-{chapter}-NNNN WORDS ...')")
            continue
        if utt_id in seen:
            problems.append(f"{where}: duplicate id {utt_id} (first on line {seen[utt_id]})")
            continue
        seen[utt_id] = number
        flac = flacs.get(utt_id)
        if flac is None:
            problems.append(f"{where}: no audio file {utt_id}.flac in {chapter_dir}")
            continue
        try:
            info = audio_info(flac)
        except AudioError as e:
            problems.append(str(e))
            continue
        utterances.append(
            Utterance(
                utt_id=utt_id,
                audio_filepath=flac,
                duration=info.duration,
                text=text.strip().lower(),
                speaker=speaker,
                extra={"chapter": chapter},
            )
        )
    for stem in sorted(flacs.keys() - seen.keys()):
        problems.append(f"{flacs[stem]}: no line for {stem} in {transcript}")
    return utterances


def _subdirs(directory: Path) -> list[Path]:
    """Subdirectories of ``directory`` sorted by name, so manifests list utterances in a reproducible order."""
    return sorted(Path(e.path) for e in os.scandir(directory) if e.is_dir())
