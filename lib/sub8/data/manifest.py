"""NeMo-style JSONL manifests: one utterance a line, validated line by line.

A line is a JSON object with ``audio_filepath`` (relative to the manifest's directory, or absolute),
``duration`` (seconds, > 0) and ``text`` (non-empty); optionally ``offset`` (seconds into the file, >= 0),
``speaker`` and ``utt_id``. Any other key (``engine``, ``voice``, ``snr_db``, ...) is kept in
:attr:`Utterance.extra` and written back unchanged.

Reading checks every line before failing, so one run reports every problem of a manifest, each as
``path:LINE: field 'X': what is wrong``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from sub8.data.audio import DURATION_TOLERANCE_S, AudioError, AudioInfo, audio_info
from sub8.io import atomic_write_text

# Key order of a written line: the NeMo fields first, then extra keys sorted, so rewriting a manifest is stable.
STANDARD_KEYS = ("audio_filepath", "duration", "text", "offset", "speaker", "utt_id")
MAX_LISTED_PROBLEMS = 20

ReportProblem = Callable[[str | None, str], None]  # (field or None, message) of the current line


@dataclass(frozen=True)
class Utterance:
    utt_id: str
    audio_filepath: Path  # absolute (a relative path given here is taken relative to the working directory)
    duration: float  # seconds of audio from offset
    text: str
    offset: float = 0.0  # seconds into the audio file where the utterance starts
    speaker: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # any other manifest keys, JSON-serializable

    def __post_init__(self):
        # abspath also normalizes "a/../b", so the same file always compares equal after a read/write round trip.
        object.__setattr__(self, "audio_filepath", Path(os.path.abspath(self.audio_filepath)))
        clashes = sorted(set(self.extra) & set(STANDARD_KEYS))
        if clashes:
            raise ValueError(f"utterance {self.utt_id}: extra keys {clashes} clash with manifest fields")


@dataclass(frozen=True)
class ManifestProblem:
    line: int  # 1-based line number in the manifest; 0 for the manifest as a whole
    field: str | None  # the offending key, None when the line as a whole is bad
    message: str

    def format(self, path: Path) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)
        return f"{where}: field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    """Every problem found in one manifest; ``problems`` holds them as data, ``str(e)`` lists them."""

    def __init__(self, path: Path, problems: list[ManifestProblem]):
        self.path = path
        self.problems = problems
        super().__init__(format_problems(f"manifest {path}", [p.format(path) for p in problems]))


def format_problems(source: str, problems: list[str]) -> str:
    """A message listing ``problems`` found in ``source``, one a line, cut after MAX_LISTED_PROBLEMS."""
    listed = problems[:MAX_LISTED_PROBLEMS]
    if len(problems) > MAX_LISTED_PROBLEMS:
        listed.append(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return f"{len(problems)} problem(s) in {source}:\n" + "\n".join(listed)


class UnitChecker(Protocol):
    """What manifest validation needs of a tokenizer (sub8.data.tokenizer.Tokenizer provides it)."""

    def unknown_units(self, text: str) -> list[str]: ...


def read_manifest(
    path: str | os.PathLike,
    *,
    tokenizer: UnitChecker | None = None,
    check_audio: bool = True,
    sample_rate: int = 16000,
) -> list[Utterance]:
    """Parse and validate the manifest at ``path``; raise one :class:`ManifestError` listing every bad line.

    With ``check_audio`` every audio file's header is read (not its samples): it must exist, be readable and
    hold ``offset + duration`` seconds. Files at a rate other than ``sample_rate`` are fine (they are resampled
    on load); one warning says how many there are. With ``tokenizer``, text with units outside its vocabulary
    is a problem too.
    """
    path = Path(os.path.abspath(path))
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    problems: list[ManifestProblem] = []
    utterances: list[Utterance] = []
    first_line_of_id: dict[str, int] = {}
    first_line_of_segment: dict[tuple[Path, float], int] = {}
    infos: dict[Path, AudioInfo | AudioError] = {}  # segments of one long file share one header read
    other_rates: Counter[int] = Counter()

    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line_problems: list[ManifestProblem] = []

        def bad(field_name: str | None, message: str) -> None:
            line_problems.append(ManifestProblem(number, field_name, message))

        utt = _parse_line(raw, path.parent, bad)
        if utt is not None:
            if utt.utt_id in first_line_of_id:
                bad("utt_id", f"duplicate id {utt.utt_id!r} (first on line {first_line_of_id[utt.utt_id]})")
            else:
                first_line_of_id[utt.utt_id] = number
            segment = (utt.audio_filepath, utt.offset)
            if segment in first_line_of_segment:
                bad("audio_filepath", f"same file and offset as line {first_line_of_segment[segment]}")
            else:
                first_line_of_segment[segment] = number
            if tokenizer is not None:
                unknown = tokenizer.unknown_units(utt.text)
                if unknown:
                    bad("text", f"units not in the tokenizer's vocabulary: {', '.join(map(repr, unknown))}")
            if check_audio:
                info = infos.get(utt.audio_filepath)
                if info is None:
                    info = infos[utt.audio_filepath] = _try_audio_info(utt.audio_filepath)
                if isinstance(info, AudioError):
                    bad("audio_filepath", str(info))
                else:
                    if info.sample_rate != sample_rate:
                        other_rates[info.sample_rate] += 1
                    if utt.offset + utt.duration > info.duration + DURATION_TOLERANCE_S:
                        bad(
                            "duration",
                            f"offset {utt.offset:g}s + duration {utt.duration:g}s is past the end of "
                            f"{utt.audio_filepath} ({info.duration:.3f}s)",
                        )
        if line_problems:
            problems.extend(line_problems)
        elif utt is not None:
            utterances.append(utt)

    if not problems and not utterances:
        problems.append(ManifestProblem(0, None, "no utterances (the file has only blank lines)"))
    if problems:
        raise ManifestError(path, problems)
    if other_rates:
        rates = ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(other_rates.items()))
        warnings.warn(
            f"{path}: {sum(other_rates.values())} utterance(s) not at {sample_rate} Hz ({rates}); "
            f"they are resampled to {sample_rate} Hz on load",
            stacklevel=2,
        )
    return utterances


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance]) -> None:
    """Write ``utterances`` to ``path`` atomically, audio paths relative to its directory; reads back equal."""
    path = Path(os.path.abspath(path))
    lines = [json.dumps(_to_json(u, path.parent), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
             for u in utterances]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _to_json(utt: Utterance, manifest_dir: Path) -> dict[str, Any]:
    record: dict[str, Any] = {
        "audio_filepath": os.path.relpath(utt.audio_filepath, manifest_dir),
        "duration": utt.duration,
        "text": utt.text,
    }
    if utt.offset:
        record["offset"] = utt.offset
    if utt.speaker is not None:
        record["speaker"] = utt.speaker
    record["utt_id"] = utt.utt_id
    record.update(sorted(utt.extra.items()))
    return record


def _parse_line(raw: bytes, manifest_dir: Path, bad: ReportProblem) -> Utterance | None:
    """The utterance on one line, or None when the line is blank or broken (each problem reported via ``bad``)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad(None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
        return None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        bad(None, f"invalid JSON ({e.msg} at column {e.colno})")
        return None
    if not isinstance(record, dict):
        bad(None, f"expected a JSON object, got {_json_type(record)}")
        return None

    audio = record.get("audio_filepath")
    if audio is None:
        bad("audio_filepath", _absent(record, "audio_filepath"))
    elif not isinstance(audio, str) or not audio.strip():
        bad("audio_filepath", f"expected a non-empty path string, got {audio!r}")
        audio = None
    duration = _number(record, "duration", bad, required=True)
    if duration is not None and not duration > 0:
        bad("duration", f"must be > 0 seconds, got {duration}")
    offset = _number(record, "offset", bad, required=False)
    if offset is not None and not offset >= 0:
        bad("offset", f"must be >= 0 seconds, got {offset}")
    text = record.get("text")
    if text is None:
        bad("text", _absent(record, "text"))
    elif not isinstance(text, str):
        bad("text", f"expected a string, got {_json_type(text)}")
    elif not text.strip():
        bad("text", "empty")
    speaker = record.get("speaker")
    if speaker is not None:
        if isinstance(speaker, int) and not isinstance(speaker, bool):
            speaker = str(speaker)  # NeMo manifests often number their speakers
        elif not isinstance(speaker, str):
            bad("speaker", f"expected a string, got {_json_type(speaker)}")
    utt_id = record.get("utt_id")
    if utt_id is not None and (not isinstance(utt_id, str) or not utt_id.strip()):
        bad("utt_id", f"expected a non-empty string, got {utt_id!r}")

    if audio is None or duration is None or not isinstance(text, str):
        return None
    audio_path = Path(audio) if os.path.isabs(audio) else manifest_dir / audio
    offset = offset or 0.0
    return Utterance(
        utt_id=utt_id if isinstance(utt_id, str) else _default_utt_id(audio_path, offset),
        audio_filepath=audio_path,
        duration=duration,
        text=text,
        offset=offset,
        speaker=speaker if isinstance(speaker, str) else None,
        extra={k: v for k, v in record.items() if k not in STANDARD_KEYS},
    )


def _default_utt_id(audio_path: Path, offset: float) -> str:
    return audio_path.stem if offset == 0 else f"{audio_path.stem}@{offset:.3f}"


def _number(record: dict, key: str, bad: ReportProblem, *, required: bool) -> float | None:
    value = record.get(key)
    if value is None:
        if required:
            bad(key, _absent(record, key))
        return None
    # bool is an int in Python but never a duration; a string like "1.5" is a writer's bug worth reporting.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        bad(key, f"expected a number of seconds, got {_json_type(value)} {value!r}")
        return None
    value = float(value)
    if not math.isfinite(value):
        bad(key, f"must be a finite number, got {value}")
        return None
    return value


def _absent(record: dict, key: str) -> str:
    return "missing" if key not in record else "is null"


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _try_audio_info(path: Path) -> AudioInfo | AudioError:
    try:
        return audio_info(path)
    except AudioError as e:
        return e
