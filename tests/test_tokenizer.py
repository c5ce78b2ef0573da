"""Tokenizers: round trips, the blank, unknown units, save/load, sentencepiece training, prepare_tokenizer."""

import json
from pathlib import Path

import pytest

from sub8.data import tokenizer as tokenizer_module
from sub8.data.manifest import Utterance, write_manifest
from sub8.data.tokenizer import (
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    build_tokenizer,
    load_tokenizer,
    prepare_tokenizer,
)
from sub8.profiles import get

DIGIT_TEXTS = ["one two three", "oh four five", "six seven eight nine", "zero zero one", "eight oh two"]
LIBRI_TEXTS = [
    "HE HOPED THERE WOULD BE STEW FOR DINNER",
    "TURNIPS AND CARROTS AND BRUISED POTATOES AND FAT MUTTON PIECES",
    "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM",
    "AFTER EARLY NIGHTFALL THE YELLOW LAMPS WOULD LIGHT UP HERE AND THERE",
    "THE SQUALID QUARTER OF THE BROTHELS",
    "HELLO BERTIE ANY GOOD IN YOUR MIND",
    "NUMBER TEN FRESH NELLY IS WAITING ON YOU GOOD NIGHT HUSBAND",
    "THE MUSIC CAME NEARER AND HE RECALLED THE WORDS THE WORDS OF SHELLEY'S FRAGMENT UPON THE MOON",
] * 4


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    return {
        "char": build_tokenizer("char", DIGIT_TEXTS),
        "word": build_tokenizer("word", DIGIT_TEXTS),
        "sentencepiece": build_tokenizer("sentencepiece", LIBRI_TEXTS, vocab_size=60),
    }


def texts_for(kind: str) -> list[str]:
    return LIBRI_TEXTS if kind == "sentencepiece" else DIGIT_TEXTS


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_round_trip_and_blank_never_emitted(tokenizers, kind):
    tok = tokenizers[kind]
    assert tok.kind == kind and tok.blank == 0
    for text in texts_for(kind):
        ids = tok.encode(text)
        assert ids and all(1 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.unknown_units(text) == []


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_decode_drops_blanks_and_rejects_out_of_range_ids(tokenizers, kind):
    tok = tokenizers[kind]
    text = texts_for(kind)[0]
    padded = [0] + tok.encode(text) + [0, 0]  # a zero-padded row of a batch
    assert tok.decode(padded) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_char_vocabulary_is_sorted_characters_with_space():
    tok = CharTokenizer.build(["ba", "a c"])
    assert tok.units == [" ", "a", "b", "c"] and tok.vocab_size == 5
    assert tok.encode("cab") == [4, 2, 3]
    assert CharTokenizer.build(["a c", "ba"]).units == tok.units  # independent of text order


def test_word_tokenizer_units_are_words():
    tok = WordTokenizer.build(DIGIT_TEXTS)
    assert "seven" in tok.units and " " not in tok.units
    assert len(tok.encode("six seven eight nine")) == 4


@pytest.mark.parametrize(
    "kind, text, unknown",
    [
        ("char", "one tw0 thr33", ["0", "3"]),
        ("word", "one ten two ten", ["ten"]),
        ("sentencepiece", "HELLO WORLD! 42", ["!", "4", "2"]),
    ],
)
def test_unknown_units_listed_once_and_encode_refuses_them(tokenizers, kind, text, unknown):
    tok = tokenizers[kind]
    assert tok.unknown_units(text) == unknown
    with pytest.raises(ValueError, match=repr(unknown[0])):
        tok.encode(text)


def test_sentencepiece_trains_small_vocabulary_deterministically():
    tok = SentencePieceTokenizer.train(LIBRI_TEXTS, vocab_size=60)
    again = SentencePieceTokenizer.train(LIBRI_TEXTS, vocab_size=60)
    assert tok.model_proto == again.model_proto
    assert 30 < tok.vocab_size <= 60  # an upper bound: a small text set gives fewer pieces, not an error
    # Pieces longer than one character exist, so it is not a character tokenizer in disguise.
    assert len(tok.encode(LIBRI_TEXTS[0])) < len(LIBRI_TEXTS[0])
    bpe = SentencePieceTokenizer.train(LIBRI_TEXTS, vocab_size=60, model_type="bpe")
    assert bpe.decode(bpe.encode(LIBRI_TEXTS[1])) == LIBRI_TEXTS[1]


@pytest.mark.parametrize("kind", ["char", "word", "sentencepiece"])
def test_save_load_round_trip(tmp_path, tokenizers, kind):
    tok = tokenizers[kind]
    path = tmp_path / "tok.json"
    tok.save(path)
    assert json.loads(path.read_text())["kind"] == kind
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok) and loaded.vocab_size == tok.vocab_size
    for text in texts_for(kind):
        assert loaded.encode(text) == tok.encode(text)


def test_load_rejects_other_files_naming_them(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"kind": "phoneme", "units": []}')
    with pytest.raises(ValueError, match="bad.json.*not a valid tokenizer"):
        load_tokenizer(bad)
    bad.write_text("not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_build_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown token unit 'phone'"):
        build_tokenizer("phone", DIGIT_TEXTS)
    with pytest.raises(ValueError, match="sentencepiece only"):
        build_tokenizer("char", DIGIT_TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="vocab_size is required"):
        build_tokenizer("sentencepiece", LIBRI_TEXTS)
    with pytest.raises(ValueError, match="no training texts"):
        build_tokenizer("char", [])


def write_text_manifest(path: Path, texts: list[str]) -> None:
    """A manifest of ``texts``; the audio is never read (prepare_tokenizer uses check_audio=False)."""
    utterances = [
        Utterance(utt_id=f"u{i}", audio_filepath=path.parent / f"u{i}.wav", duration=1.0, text=text)
        for i, text in enumerate(texts)
    ]
    write_manifest(path, utterances)


def test_prepare_tokenizer_builds_reuses_and_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    profile = get("smoke", token_unit="word")
    write_text_manifest(profile.manifest("train"), DIGIT_TEXTS)

    tok = prepare_tokenizer(profile)
    assert isinstance(tok, WordTokenizer) and (profile.runs_dir / "tokenizer.json").is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the saved tokenizer is current")

    with monkeypatch.context() as m:
        m.setattr(tokenizer_module, "build_tokenizer", no_build)
        assert prepare_tokenizer(profile).units == tok.units  # reused

    write_text_manifest(profile.manifest("train"), DIGIT_TEXTS + ["nine nine ten"])
    assert "ten" in prepare_tokenizer(profile).units  # the manifest changed: rebuilt
    assert isinstance(prepare_tokenizer(get("smoke", token_unit="char")), CharTokenizer)  # the unit changed


def test_prepare_tokenizer_needs_train_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train manifest not found"):
        prepare_tokenizer(get("smoke"))
