"""Scoring (per-utterance counts add up to jiwer's corpus WER/CER), groups, examples, the paired bootstrap, and
decoding order with a stand-in model."""

from __future__ import annotations

import random

import jiwer
import numpy as np
import pytest
import torch
from torch import nn

from sub8.data.features import Cmvn, FeatureSet
from sub8.data.tokenizer import build_tokenizer
from sub8.evaluate import (GROUP_COMPARISON_COLUMNS, compare, compare_by_group, decode, evaluate, paired_bootstrap,
                           score)

WORDS = "zero one two three four five six seven eight nine".split()


def noisy_pairs(n: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """References and hypotheses with random substitutions, deletions and insertions (some hypotheses empty)."""
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(n):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(1, 7))]
        hyp = []
        for word in ref:
            roll = rng.random()
            if roll < 0.1:
                continue  # deletion
            hyp.append(rng.choice(WORDS) if roll < 0.25 else word)
            if rng.random() < 0.08:
                hyp.append(rng.choice(WORDS))  # insertion
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp) if rng.random() > 0.05 else "")
    return refs, hyps


def test_per_utterance_errors_add_up_to_jiwer_corpus_rates():
    refs, hyps = noisy_pairs()
    result = score(refs, hyps)
    table = result.per_utterance
    assert result.wer == pytest.approx(100 * jiwer.wer(refs, hyps))
    assert result.cer == pytest.approx(100 * jiwer.cer(refs, hyps))
    assert 100 * table.word_errors.sum() / table.ref_words.sum() == pytest.approx(result.wer)
    assert 100 * table.char_errors.sum() / table.ref_chars.sum() == pytest.approx(result.cer)
    for row in table.itertuples():
        single = jiwer.process_words(row.ref, row.hyp)
        assert row.word_errors == single.substitutions + single.deletions + single.insertions
        assert row.ref_words == len(row.ref.split())
        assert row.ref_chars == len(row.ref)
    assert 0 < result.wer < 100 and (table.hyp == "").any()


def test_group_table_pools_errors_within_each_group():
    result = score(["a b", "c d e f", "g h"], ["a b", "c x e", ""], utt_ids=["u1", "u2", "u3"],
                   groups={"engine": ["flite", "espeak", "espeak"], "voice": ["v1", "v1", "v2"]})
    table = result.per_group.set_index(["grouping", "group"])
    assert table.loc[("engine", "flite")].tolist() == [1, 2, 0.0, 0.0]
    assert table.loc[("engine", "espeak"), ["utterances", "words"]].tolist() == [2, 6]
    assert table.loc[("engine", "espeak"), "wer"] == pytest.approx(100 * 4 / 6)  # 1 sub + 1 del, 2 del
    assert table.loc[("voice", "v2"), "wer"] == 100.0
    assert list(result.per_utterance.engine) == ["flite", "espeak", "espeak"]
    assert score(["a"], ["a"]).per_group.empty


def test_compare_by_group_bootstraps_within_each_group_after_the_whole_split():
    refs = ["a b", "c d", "e f", "g h"] * 10
    groups = {"engine": ["espeak", "flite"] * 20}
    a = score(refs, ["a b", "c x", "e f", "x h"] * 10, groups=groups)  # errs only on flite
    b = score(refs, refs, groups=groups)
    table = compare_by_group(a, b, "engine")
    assert list(table.columns) == list(GROUP_COMPARISON_COLUMNS)
    assert table.group.tolist() == ["all", "espeak", "flite"] and table.utterances.tolist() == [40, 20, 20]
    assert table.words.tolist() == [80, 40, 40]
    whole = compare(a, b)
    assert table.iloc[0][["wer_a", "wer_b", "diff_lo", "diff_hi"]].tolist() == [a.wer, b.wer, whole.lo, whole.hi]
    espeak, flite = table.iloc[1], table.iloc[2]
    assert espeak.wer_a == espeak.diff_lo == espeak.diff_hi == 0.0  # identical there: no interval at all
    assert flite.wer_a == 50.0 and flite.diff_lo == flite.diff_hi == 50.0  # every resample errs on half its words
    assert compare_by_group(a, b, None).group.tolist() == ["all"]  # a corpus without such metadata
    with pytest.raises(ValueError, match="carry no 'voice'"):
        compare_by_group(a, b, "voice")


def test_examples_show_the_worst_and_a_seeded_random_few():
    refs, hyps = noisy_pairs()
    result = score(refs, hyps)
    examples = result.examples(n=6, seed=1)
    assert list(examples.kind) == ["worst"] * 3 + ["random"] * 3
    utt_wer = result.per_utterance.word_errors / result.per_utterance.ref_words
    assert (examples.word_errors / examples.ref_words)[:3].min() == pytest.approx(utt_wer.max())
    assert examples.utt_id.is_unique
    assert examples.equals(result.examples(n=6, seed=1))
    assert not examples.equals(result.examples(n=6, seed=2))


def test_bad_score_input_is_a_clear_error():
    with pytest.raises(ValueError, match="equally long"):
        score(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"empty reference text for utterance\(s\) \['u2'\]"):
        score(["a", " "], ["a", "b"], utt_ids=["u1", "u2"])
    with pytest.raises(ValueError, match="clash"):
        score(["a"], ["a"], groups={"hyp": ["x"]})


def test_bootstrap_of_identical_systems_is_exactly_zero():
    refs, hyps = noisy_pairs()
    table = score(refs, hyps).per_utterance
    assert paired_bootstrap(table.word_errors, table.word_errors, table.ref_words) == (0.0, 0.0, 0.0)


def test_bootstrap_interval_excludes_zero_for_a_clearly_worse_system():
    refs, hyps = noisy_pairs(n=200)
    a = score(refs, hyps)
    worse_hyps = [h if i % 3 else "" for i, h in enumerate(hyps)]  # a third of the hypotheses dropped
    b = score(refs, worse_hyps)
    delta, lo, hi = compare(b, a)
    assert delta == pytest.approx(b.wer - a.wer)
    assert 0 < lo < delta < hi
    flipped = compare(a, b)
    assert flipped.delta == pytest.approx(-delta) and flipped.hi < 0


def test_bootstrap_is_deterministic_for_a_seed():
    refs, hyps = noisy_pairs(n=100)
    a = score(refs, hyps).per_utterance
    b = score(refs, [h.replace("one", "two") for h in hyps]).per_utterance
    args = (a.word_errors, b.word_errors, a.ref_words)
    assert paired_bootstrap(*args, seed=3) == paired_bootstrap(*args, seed=3)
    assert paired_bootstrap(*args, seed=3)[1:] != paired_bootstrap(*args, seed=4)[1:]
    narrow = paired_bootstrap(*args, alpha=0.5)
    wide = paired_bootstrap(*args, alpha=0.01)
    assert wide.lo < narrow.lo <= narrow.hi < wide.hi


def test_bad_bootstrap_input_is_a_clear_error():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1, 2], [1], [3, 3])
    with pytest.raises(ValueError, match="no words"):
        paired_bootstrap([0], [0], [0])
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap([1], [1], [2], alpha=1.5)
    a, b = score(["a b", "c"], ["a", "c"], utt_ids=["x", "y"]), score(["a b", "c"], ["a", "c"], utt_ids=["x", "z"])
    with pytest.raises(ValueError, match="not on the same utterances"):
        compare(a, b)


TEXTS = ["one two", "three", "four five six", "seven", "eight nine", "zero one", "two"]


def make_feature_set() -> FeatureSet:
    """Random features with a distinct length per utterance (the stand-in model recognises them by length)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([31, 17, 45, 22, 38, 26, 13])
    return FeatureSet(
        feats=torch.randn(int(lengths.sum()), 80, generator=g).half(),
        offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        utt_ids=[f"u{i}" for i in range(len(TEXTS))],
        texts=list(TEXTS),
        meta=[{"speaker": None, "engine": "espeak" if i % 2 else "flite", "voice": f"v{i % 3}"}
              for i in range(len(TEXTS))],
    )


class LengthOracle(nn.Module):
    """Stand-in with the transducer's ``greedy_decode``: answers each utterance's text, found by its length."""

    def __init__(self, fs: FeatureSet, tokenizer):
        super().__init__()
        self.answers = {fs.num_frames(i): tokenizer.encode(fs.texts[i]) for i in range(len(fs))}
        self.weight = nn.Parameter(torch.zeros(1))
        self.batch_sizes = []

    def greedy_decode(self, feats, feat_lens):
        assert not self.training and torch.is_inference_mode_enabled()
        self.batch_sizes.append(len(feat_lens))
        return [self.answers[int(n)] for n in feat_lens]


def test_decode_returns_hypotheses_in_feature_set_order():
    fs = make_feature_set()
    tokenizer = build_tokenizer("char", TEXTS)
    model = LengthOracle(fs, tokenizer)
    hyps = decode(model, fs, Cmvn.from_features(fs), tokenizer, batch_frames=90, device="cpu")
    assert hyps == TEXTS
    assert len(model.batch_sizes) > 1 and sum(model.batch_sizes) == len(TEXTS)
    assert model.training  # the mode it came in with


def test_evaluate_groups_by_the_metadata_it_finds():
    fs = make_feature_set()
    tokenizer = build_tokenizer("char", TEXTS)
    model = LengthOracle(fs, tokenizer)
    result = evaluate(model, fs, Cmvn.from_features(fs), tokenizer, batch_frames=90)
    assert result.wer == 0.0 and result.cer == 0.0
    assert set(result.per_group.grouping) == {"engine", "voice"}
    assert result.per_group.utterances.sum() == 2 * len(TEXTS)
    assert result.per_utterance.utt_id.tolist() == fs.utt_ids
    # LibriSpeech metadata has neither key: no groups; a key only some utterances have is an error.
    fs.meta = [{"speaker": "s"} for _ in fs.meta]
    assert evaluate(model, fs, Cmvn.from_features(fs), tokenizer).per_group.empty
    fs.meta[0]["engine"] = "flite"
    with pytest.raises(ValueError, match=r"6 utterance\(s\) lack metadata 'engine'"):
        evaluate(model, fs, Cmvn.from_features(fs), tokenizer)


def test_bootstrap_matches_a_plain_loop_over_resamples():
    """The vectorised counts-matrix form equals resampling utterance indices one resample at a time."""
    refs, hyps = noisy_pairs(n=40)
    a = score(refs, hyps).per_utterance
    b = score(refs, [h.replace("two", "three") for h in hyps]).per_utterance
    ea, eb, words = (np.asarray(x, dtype=float) for x in (a.word_errors, b.word_errors, a.ref_words))
    counts = np.random.default_rng(7).multinomial(len(ea), np.full(len(ea), 1 / len(ea)), size=200)
    deltas = [100 * (c @ ea - c @ eb) / (c @ words) for c in counts]
    expected = np.percentile(deltas, [2.5, 97.5])
    _, lo, hi = paired_bootstrap(ea, eb, words, n_resamples=200, seed=7)
    assert (lo, hi) == pytest.approx(tuple(expected))
