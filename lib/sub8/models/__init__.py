"""Streaming transducers (design.md §4): RNN-T with an LSTM encoder and a Conformer transducer, two sizes each.

``PRESETS[name](vocab_size)`` gives the configuration of a named size; ``build_model(config)`` the model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from sub8.models.transducer import (
    BLANK,
    Joiner,
    Predictor,
    Transducer,
    TransducerConfig,
    TransducerOutput,
    build_model,
    ctc_loss_per_token,
    rnnt_loss_per_token,
    transducer_loss,
)


def rnnt_small(vocab_size: int) -> TransducerConfig:
    return TransducerConfig(encoder="lstm", vocab_size=vocab_size, lstm_layers=3, lstm_hidden=256)


def rnnt_large(vocab_size: int) -> TransducerConfig:
    # 1.4x the small model's parameters, so that at 5 bits it stores fewer bytes than the small one at 8 (S8BQAT's
    # claim). Wider, not deeper: a 4x320 encoder left the transducer plateau later and, at the same 2 CPU-core
    # budget, ended worse than the 3x256 small model (11.0% vs 7.2% test WER).
    return TransducerConfig(encoder="lstm", vocab_size=vocab_size, lstm_layers=3, lstm_hidden=320)


# What the Conformers change from the transducer defaults, and why:
# - the auxiliary CTC loss at weight 1.0, not 0.3: the Conformer transducer sat on the blank plateau for ~600 updates
#   (conformer_large, default profile: dev WER 100% at update 500, 46% at 750), where CTC at weight 1.0 on the
#   encoder pulled it off after ~300 (35% at 500, 18% at 750; 0.6: 100% and 69%). The CTC head is training-only.
# - 32 subsampling channels, not 64: with 64 the backward of the second 3x3 convolution (64 -> 64 channels at
#   20 ms x 40 mel bins) took a third of a training step on the CPU; with 32 a step is 23% (large: 16%) shorter.
CONFORMER_CTC_WEIGHT = 1.0
CONFORMER_SUBSAMPLING_CHANNELS = 32


def conformer_small(vocab_size: int) -> TransducerConfig:
    return TransducerConfig(
        encoder="conformer",
        vocab_size=vocab_size,
        conformer_dim=144,
        conformer_layers=4,
        conformer_heads=4,
        conformer_ffn_dim=576,
        conformer_subsampling_channels=CONFORMER_SUBSAMPLING_CHANNELS,
        ctc_weight=CONFORMER_CTC_WEIGHT,
    )


def conformer_large(vocab_size: int) -> TransducerConfig:
    # 1.6x the small model; 4 layers, not 6, to keep its CPU training time within the study's budget.
    return TransducerConfig(
        encoder="conformer",
        vocab_size=vocab_size,
        conformer_dim=192,
        conformer_layers=4,
        conformer_heads=4,
        conformer_ffn_dim=768,
        conformer_subsampling_channels=CONFORMER_SUBSAMPLING_CHANNELS,
        ctc_weight=CONFORMER_CTC_WEIGHT,
    )


PRESETS: dict[str, Callable[[int], TransducerConfig]] = {
    "rnnt_small": rnnt_small,
    "rnnt_large": rnnt_large,
    "conformer_small": conformer_small,
    "conformer_large": conformer_large,
}


def deployed_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of what inference runs: every parameter except those of the model's ``training_only``
    modules (the transducer's auxiliary CTC head), which the device never stores."""
    skip = tuple(f"{name}." for name in getattr(model, "training_only", ()))
    return [(name, p) for name, p in model.named_parameters() if not name.startswith(skip)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters the deployed model holds (training-only modules excluded)."""
    return sum(p.numel() for _, p in deployed_parameters(model))


__all__ = [
    "BLANK",
    "PRESETS",
    "Joiner",
    "Predictor",
    "Transducer",
    "TransducerConfig",
    "TransducerOutput",
    "build_model",
    "count_parameters",
    "deployed_parameters",
    "ctc_loss_per_token",
    "rnnt_loss_per_token",
    "transducer_loss",
]
