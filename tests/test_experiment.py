"""sub8.experiment: models by name, and the cache of test hypotheses every later comparison bootstraps against."""

from __future__ import annotations

import pytest
from test_evaluate import LengthOracle, make_feature_set

from sub8 import profiles
from sub8.data.features import Cmvn
from sub8.data.prepare import PreparedData
from sub8.data.tokenizer import build_tokenizer
from sub8.experiment import evaluate_model, model_dir


@pytest.fixture
def data(tmp_path, monkeypatch) -> PreparedData:
    monkeypatch.setenv("SUB8_ROOT", str(tmp_path))
    fs = make_feature_set()
    tokenizer = build_tokenizer("word", fs.texts)
    return PreparedData(profiles.get("smoke"), {}, tokenizer, {"test": fs}, Cmvn.from_features(fs))


def test_hypotheses_are_cached_and_rescored(data):
    model = LengthOracle(data.features["test"], data.tokenizer).eval()
    first = evaluate_model(data, "m", model)
    decoded = len(model.batch_sizes)
    again = evaluate_model(data, "m", model)
    assert (model_dir(data.profile, "m") / "eval_test.csv").is_file()
    assert len(model.batch_sizes) == decoded, "the second call decoded again instead of using the cache"
    assert again.wer == first.wer == 0.0
    assert list(again.per_utterance.utt_id) == list(first.per_utterance.utt_id)
    assert set(again.per_group.grouping) == {"engine", "voice"}


def test_a_cache_of_other_utterances_is_not_used(data):
    model = LengthOracle(data.features["test"], data.tokenizer).eval()
    path = model_dir(data.profile, "m") / "eval_test.csv"
    path.parent.mkdir(parents=True)
    path.write_text("utt_id,hyp\nother,one\n")
    assert evaluate_model(data, "m", model).wer == 0.0
    assert model.batch_sizes, "a stale cache was trusted"
