"""Token units for the transducer: characters, whole words, or sentencepiece pieces.

Every tokenizer reserves id 0 for the transducer blank: ``encode`` never produces it, ``decode`` drops it (so a
zero-padded row decodes to its text). Units are learned from the training texts; text with a unit outside the
vocabulary is refused by ``encode`` and listed by ``unknown_units`` (which manifest validation calls), never
silently mapped to an <unk>. A tokenizer is one JSON file with a ``"kind"`` field; a sentencepiece model is
stored inside it as base64, so nothing else has to travel with it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterable

import sentencepiece as spm

from sub8.data.manifest import read_manifest
from sub8.io import atomic_write_text
from sub8.profiles import Profile

BLANK = 0


class Tokenizer(ABC):
    """Base class: a vocabulary whose id 0 is the blank; ``vocab_size`` counts the blank."""

    kind: ClassVar[str]
    blank: ClassVar[int] = BLANK

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids in 1..vocab_size-1; ValueError naming the units the vocabulary lacks."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; blanks (0) are dropped, ValueError on an id outside the vocabulary."""

    @abstractmethod
    def unknown_units(self, text: str) -> list[str]:
        """Units of ``text`` outside the vocabulary, each once, in order of appearance (empty: encodable)."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable state, ``"kind"`` included; ``load_tokenizer`` inverts it."""

    @classmethod
    @abstractmethod
    def from_dict(cls, state: dict[str, Any]) -> Tokenizer: ...

    def save(self, path: str | os.PathLike, *, fingerprint: str | None = None) -> None:
        """Write the tokenizer as JSON, atomically. ``fingerprint`` records what it was built from."""
        state = self.to_dict()
        if fingerprint is not None:
            state["fingerprint"] = fingerprint
        atomic_write_text(path, json.dumps(state, ensure_ascii=False, indent=1) + "\n")

    def _check_encodable(self, text: str) -> None:
        unknown = self.unknown_units(text)
        if unknown:
            raise ValueError(
                f"{self.kind} tokenizer: {text!r} has units not in the vocabulary: {', '.join(map(repr, unknown))}"
            )

    def _check_ids(self, ids: list[int]) -> list[int]:
        """``ids`` without blanks; ValueError on an id outside the vocabulary."""
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.kind} tokenizer: ids {bad[:10]} outside the vocabulary 0..{self.vocab_size - 1}")
        return [i for i in ids if i != BLANK]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class _UnitTokenizer(Tokenizer):
    """A fixed list of units; unit k has id k+1. Subclasses say how a text splits into units and joins back."""

    def __init__(self, units: Iterable[str]):
        self.units = list(units)
        if not self.units:
            raise ValueError(f"{self.kind} tokenizer: empty vocabulary")
        if len(set(self.units)) != len(self.units):
            raise ValueError(f"{self.kind} tokenizer: duplicate units in the vocabulary")
        self._ids = {unit: i + 1 for i, unit in enumerate(self.units)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> _UnitTokenizer:
        """The units of ``texts``, sorted, so the same texts in any order give the same ids."""
        return cls(sorted({unit for text in texts for unit in cls.split(text)}))

    @staticmethod
    @abstractmethod
    def split(text: str) -> list[str]: ...

    @staticmethod
    @abstractmethod
    def join(units: list[str]) -> str: ...

    @property
    def vocab_size(self) -> int:
        return len(self.units) + 1

    def encode(self, text: str) -> list[int]:
        self._check_encodable(text)
        return [self._ids[unit] for unit in self.split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.join([self.units[i - 1] for i in self._check_ids(list(ids))])

    def unknown_units(self, text: str) -> list[str]:
        return list(dict.fromkeys(unit for unit in self.split(text) if unit not in self._ids))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "units": self.units}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> _UnitTokenizer:
        return cls(state["units"])


class CharTokenizer(_UnitTokenizer):
    """One unit per character, the space included."""

    kind = "char"

    @staticmethod
    def split(text: str) -> list[str]:
        return list(text)

    @staticmethod
    def join(units: list[str]) -> str:
        return "".join(units)


class WordTokenizer(_UnitTokenizer):
    """One unit per whitespace-separated word; decoding joins with single spaces (texts are normalized so)."""

    kind = "word"

    @staticmethod
    def split(text: str) -> list[str]:
        return text.split()

    @staticmethod
    def join(units: list[str]) -> str:
        return " ".join(units)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (unigram or BPE) whose id 0 is its pad piece, used as the blank.

    Trained with the identity normalization and full character coverage, so decode(encode(t)) == t for a text of
    training characters with single spaces, and a character outside training is an unknown unit (the model's
    <unk>, id 1, is never emitted: ``encode`` refuses such text instead).
    """

    kind = "sentencepiece"
    _SPECIAL = {"pad_id": BLANK, "pad_piece": "<blank>", "unk_id": 1, "bos_id": -1, "eos_id": -1}

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.pad_id() != BLANK:
            raise ValueError(f"sentencepiece model: pad id is {self._sp.pad_id()}, the blank must be {BLANK}")
        # Every training character is a piece of its own (character_coverage=1.0); "▁" stands for the space.
        self._chars = {
            char
            for i in range(self._sp.get_piece_size())
            if not (self._sp.is_control(i) or self._sp.is_unknown(i))
            for char in self._sp.id_to_piece(i).replace("▁", " ")
        }

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "unigram") -> SentencePieceTokenizer:
        """Train in-process on ``texts``. ``vocab_size`` (blank and <unk> included) is an upper bound: a small
        text set yields fewer pieces rather than an error."""
        texts = list(texts)
        if not texts:
            raise ValueError("sentencepiece tokenizer: no training texts")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            normalization_rule_name="identity",
            hard_vocab_limit=False,
            num_threads=1,  # one thread: the same texts give the same model bytes
            minloglevel=2,
            **cls._SPECIAL,
        )
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        self._check_encodable(text)
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._check_ids(list(ids)))

    def unknown_units(self, text: str) -> list[str]:
        return list(dict.fromkeys(c for c in text if not c.isspace() and c not in self._chars))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode("ascii")}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SentencePieceTokenizer:
        return cls(base64.b64decode(state["model"]))


TOKENIZERS: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, WordTokenizer, SentencePieceTokenizer)
}


def build_tokenizer(unit: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of ``unit`` ("char", "word" or "sentencepiece") learned from ``texts``.

    ``vocab_size`` is required for sentencepiece and refused for the others (their vocabulary is the set of
    units the texts contain).
    """
    texts = list(texts)
    if not texts:
        raise ValueError(f"build_tokenizer({unit!r}): no training texts")
    if unit == SentencePieceTokenizer.kind:
        if vocab_size is None:
            raise ValueError("build_tokenizer('sentencepiece'): vocab_size is required")
        return SentencePieceTokenizer.train(texts, vocab_size)
    if unit not in TOKENIZERS:
        raise ValueError(f"unknown token unit {unit!r}; choose one of {sorted(TOKENIZERS)}")
    if vocab_size is not None:
        raise ValueError(f"build_tokenizer({unit!r}): vocab_size applies to sentencepiece only")
    return TOKENIZERS[unit].build(texts)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer written by :meth:`Tokenizer.save`; ValueError naming the file if it is not one."""
    path = Path(path)
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        cls = TOKENIZERS[state["kind"]]
        return cls.from_dict(state)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer not found: {path}") from None
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # json errors, a missing or unknown "kind", a corrupt model: all mean "not a tokenizer file".
        raise ValueError(f"{path}: not a valid tokenizer file ({type(e).__name__}: {e})") from e


def prepare_tokenizer(profile: Profile, force: bool = False) -> Tokenizer:
    """The profile's tokenizer at ``runs/<profile>/tokenizer.json``, built from the train manifest's texts.

    Reused when present and built from the same train manifest and settings (its fingerprint matches), unless
    ``force``; rebuilt otherwise, and said so.
    """
    manifest = profile.manifest("train")
    path = profile.runs_dir / "tokenizer.json"
    vocab_size = profile.sentencepiece_vocab if profile.token_unit == SentencePieceTokenizer.kind else None
    fingerprint = _fingerprint(manifest, profile.token_unit, vocab_size)
    if path.is_file() and not force:
        try:
            stored = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except ValueError:  # not JSON: rebuilt like a stale one
            stored = None
        if stored == fingerprint:
            return load_tokenizer(path)
        print(f"tokenizer {path}: built from other texts or settings, or unreadable: rebuilding it")
    texts = [u.text for u in read_manifest(manifest, check_audio=False)]
    tokenizer = build_tokenizer(profile.token_unit, texts, vocab_size)
    tokenizer.save(path, fingerprint=fingerprint)
    return tokenizer


def _fingerprint(manifest: Path, unit: str, vocab_size: int | None) -> str:
    """sha256 of the train manifest's bytes and the tokenizer settings."""
    if not manifest.is_file():
        raise FileNotFoundError(f"train manifest not found: {manifest} (build the corpus first)")
    digest = hashlib.sha256(manifest.read_bytes())
    digest.update(json.dumps({"unit": unit, "vocab_size": vocab_size}, sort_keys=True).encode())
    return digest.hexdigest()
