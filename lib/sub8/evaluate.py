"""Decoding and scoring: WER and CER (jiwer) overall, per group and per utterance, and the paired bootstrap.

WER and CER are in percent throughout. Corpus WER pools errors over utterances (sum of errors / sum of reference
words), as jiwer does; per-utterance error counts are taken from the same jiwer alignment, so they add up to the
corpus figure exactly. Two systems decoded on the same utterances are compared with :func:`paired_bootstrap`,
which every later table uses for its "not significantly worse" intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import jiwer
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from sub8.data.batching import make_batches
from sub8.data.features import Cmvn, FeatureSet
from sub8.data.tokenizer import Tokenizer


UTTERANCE_COLUMNS = ("utt_id", "ref", "hyp", "word_errors", "ref_words", "char_errors", "ref_chars")
GROUP_COLUMNS = ("grouping", "group", "utterances", "words", "wer", "cer")
GROUP_COMPARISON_COLUMNS = ("group", "utterances", "words", "wer_a", "wer_b", "diff_lo", "diff_hi")


def decode(
    model: nn.Module,
    fs: FeatureSet,
    cmvn: Cmvn,
    tokenizer: Tokenizer,
    batch_frames: int = 20000,
    device: str | torch.device | None = None,
) -> list[str]:
    """Greedy hypotheses for every utterance of ``fs``, in ``fs`` order.

    Utterances are batched shortest first under the ``batch_frames`` budget (little padding), with no
    SpecAugment. ``device``: where to run (the model is moved there); None keeps the model where it is. The
    model's train/eval mode is restored afterwards.
    """
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    lengths = fs.lengths
    # The references are not needed (nor tokenized): batches of features only, padded with 0 (the CMVN mean) as
    # in training.
    batches = make_batches(lengths.tolist(), batch_frames, seed=0, epoch=0, shuffle=False, shortest_first=True)
    hyps = [""] * len(fs)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for indices in batches:
            feats = pad_sequence([cmvn.apply(fs.feature(i)) for i in indices], batch_first=True).to(device)
            for i, ids in zip(indices, model.greedy_decode(feats, lengths[indices].to(device))):
                hyps[i] = tokenizer.decode(ids)
    model.train(was_training)
    return hyps


@dataclass
class EvalResult:
    wer: float  # percent, pooled over utterances
    cer: float  # percent, spaces count as characters (jiwer's convention)
    per_utterance: pd.DataFrame  # utt_id, ref, hyp, word_errors, ref_words, char_errors, ref_chars, <groupings>
    per_group: pd.DataFrame  # grouping, group, utterances, words, wer, cer (empty without groupings)

    def examples(self, n: int = 6, seed: int = 0) -> pd.DataFrame:
        """``n`` hypotheses next to their references: the worst half by utterance WER, the rest drawn at random
        (seeded) from the others. Columns: kind, utt_id, ref, hyp, word_errors, ref_words."""
        df = self.per_utterance.assign(utt_wer=self.per_utterance.word_errors / self.per_utterance.ref_words)
        worst = df.sort_values(["utt_wer", "word_errors", "utt_id"], ascending=[False, False, True]).head(n // 2)
        rest = df.drop(worst.index)
        rng = np.random.default_rng(seed)
        picked = rest.iloc[np.sort(rng.choice(len(rest), size=min(n - len(worst), len(rest)), replace=False))]
        columns = ["utt_id", "ref", "hyp", "word_errors", "ref_words"]
        return pd.concat([worst[columns].assign(kind="worst"), picked[columns].assign(kind="random")])[
            ["kind", *columns]
        ].reset_index(drop=True)


def score(
    refs: Sequence[str],
    hyps: Sequence[str],
    utt_ids: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> EvalResult:
    """WER/CER of ``hyps`` against ``refs`` (same order). ``groups`` maps a grouping's name (e.g. "engine") to
    one label per utterance; each grouping gets its rows in ``per_group`` and a column in ``per_utterance``."""
    refs, hyps = list(refs), list(hyps)
    utt_ids = [str(i) for i in range(len(refs))] if utt_ids is None else list(utt_ids)
    groups = dict(groups or {})
    lengths = {"refs": len(refs), "hyps": len(hyps), "utt_ids": len(utt_ids)} | {
        f"groups[{name!r}]": len(labels) for name, labels in groups.items()
    }
    clashes = set(groups) & set(UTTERANCE_COLUMNS)
    if clashes:
        raise ValueError(f"score: grouping names {sorted(clashes)} clash with the per-utterance columns")
    if len(set(lengths.values())) != 1 or not refs:
        raise ValueError(f"score: need equally long, non-empty inputs, got lengths {lengths}")
    empty = [u for u, r in zip(utt_ids, refs) if not r.strip()]
    if empty:
        raise ValueError(f"score: empty reference text for utterance(s) {empty[:10]} (WER is undefined)")

    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    per_utterance = pd.DataFrame(
        {
            "utt_id": utt_ids,
            "ref": refs,
            "hyp": hyps,
            "word_errors": _errors_per_sentence(words),
            "ref_words": [len(r) for r in words.references],
            "char_errors": _errors_per_sentence(chars),
            "ref_chars": [len(r) for r in chars.references],
            **{name: list(labels) for name, labels in groups.items()},
        }
    )
    tables = [_group_table(per_utterance, name) for name in groups]
    per_group = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(GROUP_COLUMNS))
    wer, cer = _rates(per_utterance)
    return EvalResult(wer, cer, per_utterance, per_group)


def _errors_per_sentence(output: jiwer.WordOutput | jiwer.CharacterOutput) -> list[int]:
    """Substitutions + deletions + insertions of each sentence, from jiwer's alignment (an 'equal' chunk costs 0;
    a substitution spans equally many reference and hypothesis units, a deletion only reference units, an
    insertion only hypothesis units)."""
    return [
        sum(max(c.ref_end_idx - c.ref_start_idx, c.hyp_end_idx - c.hyp_start_idx) for c in chunks if c.type != "equal")
        for chunks in output.alignments
    ]


def _rates(df: pd.DataFrame) -> tuple[float, float]:
    """Pooled (WER, CER) in percent of the utterances in ``df``."""
    return 100.0 * df.word_errors.sum() / df.ref_words.sum(), 100.0 * df.char_errors.sum() / df.ref_chars.sum()


def _group_table(per_utterance: pd.DataFrame, grouping: str) -> pd.DataFrame:
    rows = []
    for label, df in per_utterance.groupby(grouping, sort=True):
        wer, cer = _rates(df)
        rows.append({"grouping": grouping, "group": label, "utterances": len(df), "words": int(df.ref_words.sum()),
                     "wer": wer, "cer": cer})
    return pd.DataFrame(rows, columns=list(GROUP_COLUMNS))


class BootstrapResult(NamedTuple):
    delta: float  # WER_a - WER_b, absolute percentage points
    lo: float  # the (alpha/2, 1 - alpha/2) percentile interval of delta over resamples
    hi: float


def paired_bootstrap(
    word_errors_a: Sequence[int] | np.ndarray,
    word_errors_b: Sequence[int] | np.ndarray,
    ref_words: Sequence[int] | np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> BootstrapResult:
    """Paired bootstrap over utterances of the WER difference of systems a and b on the same test set.

    Each resample draws N utterances with replacement; both systems are scored on that same draw, so what the
    two share (hard utterances) cancels. Vectorised: the resamples are an (n_resamples, N) matrix of draw counts
    (multinomial), and the pooled error and word totals of every resample are one matrix product. Memory is
    O(n_resamples * N) (24 MB for 1000 x 3000).
    """
    columns = [np.asarray(x, dtype=np.float64) for x in (word_errors_a, word_errors_b, ref_words)]
    shapes = [c.shape for c in columns]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] == 0:
        raise ValueError(f"paired_bootstrap: need three equally long, non-empty 1-D sequences, got shapes {shapes}")
    per_utt = np.stack(columns, axis=1)  # (N, 3): errors of a, errors of b, reference words
    if per_utt[:, 2].sum() <= 0:
        raise ValueError("paired_bootstrap: the references hold no words")
    if n_resamples < 1 or not 0 < alpha < 1:
        raise ValueError(f"paired_bootstrap: need n_resamples >= 1 and 0 < alpha < 1, got {n_resamples}, {alpha}")

    n = len(per_utt)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_resamples)  # (R, N)
    errors_a, errors_b, total_words = (counts @ per_utt).T  # each (R,)
    deltas = 100.0 * (errors_a - errors_b) / np.maximum(total_words, 1.0)  # a draw of only empty refs: delta 0
    totals = per_utt.sum(axis=0)
    delta = 100.0 * (totals[0] - totals[1]) / totals[2]
    lo, hi = np.percentile(deltas, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return BootstrapResult(float(delta), float(lo), float(hi))


def compare(
    a: EvalResult, b: EvalResult, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> BootstrapResult:
    """:func:`paired_bootstrap` of two results on the same utterances (checked: same utt_ids and references)."""
    ua, ub = a.per_utterance, b.per_utterance
    if list(ua.utt_id) != list(ub.utt_id) or list(ua.ref) != list(ub.ref):
        raise ValueError("compare: the two results are not on the same utterances in the same order")
    return paired_bootstrap(ua.word_errors, ub.word_errors, ua.ref_words, n_resamples, seed, alpha)


def compare_by_group(
    a: EvalResult, b: EvalResult, grouping: str | None, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> pd.DataFrame:
    """:func:`compare` on every utterance (group ``"all"``), then within each group of ``grouping`` (e.g. "engine";
    None: the first row only): where a difference between two systems comes from. One row per group
    (``GROUP_COMPARISON_COLUMNS``): its utterances and reference words, both WERs and the 95% interval of
    WER(a) − WER(b) from a paired bootstrap over that group's utterances only. A grouping the utterances do not
    carry is an error."""
    whole = compare(a, b, n_resamples, seed, alpha)
    ua, ub = a.per_utterance, b.per_utterance
    rows = [("all", len(ua), int(ua.ref_words.sum()), a.wer, b.wer, whole.lo, whole.hi)]
    if grouping is None:
        return pd.DataFrame(rows, columns=list(GROUP_COMPARISON_COLUMNS))
    if grouping not in ua.columns:
        raise ValueError(f"compare_by_group: the utterances carry no {grouping!r} (groupings: "
                         f"{[c for c in ua.columns if c not in UTTERANCE_COLUMNS]})")
    for label, index in ua.groupby(grouping, sort=True).groups.items():
        ga, gb = ua.loc[index], ub.loc[index]
        delta = paired_bootstrap(ga.word_errors, gb.word_errors, ga.ref_words, n_resamples, seed, alpha)
        rows.append((label, len(ga), int(ga.ref_words.sum()), _rates(ga)[0], _rates(gb)[0], delta.lo, delta.hi))
    return pd.DataFrame(rows, columns=list(GROUP_COMPARISON_COLUMNS))


def score_feature_set(fs: FeatureSet, hyps: Sequence[str], group_by: Sequence[str] = ("engine", "voice")) -> EvalResult:
    """:func:`score` hypotheses of ``fs``'s utterances (in ``fs`` order), grouped by the metadata keys in
    ``group_by`` that ``fs`` carries (a key no utterance has is skipped, e.g. "engine" on LibriSpeech; a key only
    some have is an error)."""
    groups = {}
    for key in group_by:
        have = [key in m for m in fs.meta]
        if any(have) and not all(have):
            missing = [u for u, h in zip(fs.utt_ids, have) if not h]
            raise ValueError(f"evaluate: {len(missing)} utterance(s) lack metadata {key!r}, e.g. {missing[:5]}")
        if all(have):
            groups[key] = [str(m[key]) for m in fs.meta]
    return score(fs.texts, hyps, fs.utt_ids, groups)


def evaluate(
    model: nn.Module,
    fs: FeatureSet,
    cmvn: Cmvn,
    tokenizer: Tokenizer,
    batch_frames: int = 20000,
    device: str | torch.device | None = None,
    group_by: Sequence[str] = ("engine", "voice"),
) -> EvalResult:
    """:func:`decode` then :func:`score_feature_set`."""
    hyps = decode(model, fs, cmvn, tokenizer, batch_frames, device)
    return score_feature_set(fs, hyps, group_by)
