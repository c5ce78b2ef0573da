"""One call that makes a profile's data ready: corpus (synthesized or imported), tokenizer, features, CMVN.

Every stage of the study starts with :func:`prepare_data`; each step inside skips work whose output exists, so
after ``00_data`` it only loads caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sub8.data.features import Cmvn, FeatureSet, load_cmvn, prepare_features
from sub8.data.librispeech import prepare_librispeech
from sub8.data.manifest import read_manifest
from sub8.data.synth import build_corpus
from sub8.data.tokenizer import Tokenizer, prepare_tokenizer
from sub8.profiles import SPLITS, Profile


@dataclass
class PreparedData:
    profile: Profile
    manifests: dict[str, Path]
    tokenizer: Tokenizer
    features: dict[str, FeatureSet]
    cmvn: Cmvn


def prepare_data(profile: Profile, force: bool = False) -> PreparedData:
    if profile.corpus is not None:
        manifests = build_corpus(profile, force=force)
    else:
        manifests = prepare_librispeech(profile, force=force)
    tokenizer = prepare_tokenizer(profile, force=force)
    features = prepare_features(profile, force=force)
    return PreparedData(profile, manifests, tokenizer, features, load_cmvn(profile))


def utterance_table(profile: Profile) -> pd.DataFrame:
    """One row per utterance of every split: split, utt_id, speaker, engine, voice, duration, words, text."""
    rows = []
    for split in SPLITS:
        path = profile.manifest(split)
        if not path.is_file():
            continue
        for u in read_manifest(path, check_audio=False):
            rows.append(
                {
                    "split": split,
                    "utt_id": u.utt_id,
                    "speaker": u.speaker,
                    "engine": u.extra.get("engine", "librispeech"),
                    "voice": u.extra.get("voice", u.speaker),
                    "duration": u.duration,
                    "words": len(u.text.split()),
                    "text": u.text,
                }
            )
    return pd.DataFrame(rows)


def corpus_table(utterances: pd.DataFrame) -> pd.DataFrame:
    """Counts per split, engine and voice: utterances, hours, mean duration, words."""
    grouped = utterances.groupby(["split", "engine", "voice"], sort=False)
    table = grouped.agg(
        utterances=("utt_id", "size"),
        hours=("duration", lambda d: d.sum() / 3600),
        mean_duration_s=("duration", "mean"),
        words=("words", "sum"),
    ).reset_index()
    order = {s: i for i, s in enumerate(SPLITS)}
    return table.sort_values(["split", "engine", "voice"], key=lambda c: c.map(order) if c.name == "split" else c)
