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
    # Sized so that the four default baselines train in about half an hour on 2 CPU cores (benchmarks/train_step.py),
    # while staying ~1.7x the small model: S8BQAT's claim compares the large model at 4-5 bits with the small at 8.
    return TransducerConfig(encoder="lstm", vocab_size=vocab_size, lstm_layers=4, lstm_hidden=320)


def conformer_small(vocab_size: int) -> TransducerConfig:
    return TransducerConfig(
        encoder="conformer",
        vocab_size=vocab_size,
        conformer_dim=144,
        conformer_layers=4,
        conformer_heads=4,
        conformer_ffn_dim=576,
    )


def conformer_large(vocab_size: int) -> TransducerConfig:
    return TransducerConfig(
        encoder="conformer",
        vocab_size=vocab_size,
        conformer_dim=192,
        conformer_layers=6,
        conformer_heads=4,
        conformer_ffn_dim=768,
    )


PRESETS: dict[str, Callable[[int], TransducerConfig]] = {
    "rnnt_small": rnnt_small,
    "rnnt_large": rnnt_large,
    "conformer_small": conformer_small,
    "conformer_large": conformer_large,
}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
    "ctc_loss_per_token",
    "rnnt_loss_per_token",
    "transducer_loss",
]
