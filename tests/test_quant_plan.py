"""QuantPlan: which weights at how many bits, and clear errors."""

from __future__ import annotations

import pytest
from torch import nn

from sub8.models import TransducerConfig, build_model
from sub8.quant import QuantPlan, quantizable_parameters


@pytest.fixture(scope="module")
def rnnt():
    return build_model(TransducerConfig(encoder="lstm", vocab_size=5, input_dim=8, lstm_layers=2, lstm_hidden=8,
                                        pred_embed_dim=4, pred_hidden=8, joiner_dim=8, dropout=0.0))


def test_quantizable_parameters_are_weight_matrices_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Conv1d(4, 4, 3), nn.LSTM(4, 5, 2), nn.Embedding(6, 4))
    assert quantizable_parameters(model) == [
        "0.weight", "2.weight", "3.weight_ih_l0", "3.weight_hh_l0", "3.weight_ih_l1", "3.weight_hh_l1", "4.weight",
    ]


def test_plan_resolves_globs_and_module_names_last_rule_wins(rnnt):
    resolved = dict(QuantPlan([("*", 4), ("joiner", 8), ("transcriber.lstm.weight_hh_l*", 3)]).resolve(rnnt))
    assert resolved["transcriber.lstm.weight_ih_l0"] == 4
    assert resolved["transcriber.lstm.weight_hh_l1"] == 3
    assert resolved["joiner.output.weight"] == 8 and resolved["predictor.embedding.weight"] == 4
    assert not any(name.endswith("bias") or ".norm." in name for name in resolved)
    assert list(resolved) == quantizable_parameters(rnnt)


@pytest.mark.parametrize("bits", [0, 9, 2.5, "4"])
def test_plan_rejects_bad_bits_naming_the_pattern(bits):
    with pytest.raises(ValueError, match=r"'joiner'.*bit width"):
        QuantPlan({"joiner": bits})


def test_empty_plan_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        QuantPlan([])


def test_plan_naming_a_missing_layer_names_nearby_layers(rnnt):
    with pytest.raises(ValueError, match=r"'joinr\.output'.*closest names.*joiner\.output"):
        QuantPlan({"joinr.output": 4}).resolve(rnnt)


def test_plan_matching_only_norms_and_biases_says_so(rnnt):
    with pytest.raises(ValueError, match="not quantized.*transcriber.norm.weight"):
        QuantPlan({"transcriber.norm": 4}).resolve(rnnt)
