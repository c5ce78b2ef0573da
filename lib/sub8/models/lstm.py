"""Streaming LSTM transcriber: frame stacking for time reduction, then one stacked unidirectional ``nn.LSTM``.

Time reduction stacks ``stack`` consecutive 10 ms feature frames into one input vector (4 → 40 ms frames), so the
LSTM runs 4× fewer steps. An utterance whose length is not a multiple of ``stack`` has its last, partial group
**padded** with zero frames (not dropped): no audio is lost at the end and ``out_lens = ceil(feat_lens / stack)``,
which is never 0 for a non-empty utterance.

The LSTM is one ``nn.LSTM`` module, so training and inference use the fused (MKL-DNN / cuDNN) kernel and a
quantizer finds all recurrent weights in one place. Batches of mixed lengths run on the padded tensor, with no
``pack_padded_sequence``: a unidirectional LSTM's outputs inside an utterance never depend on the padding after
it, and on this 2-core CPU packing was slower even with a third of the padded frames wasted (3×256 LSTM, 32
utterances of 1–3 s, forward + backward, best of 7: padded 0.25 s, packed 0.39 s with 2 threads; 0.36 s and 0.46 s
with 1): the packed path gives up the fused MKL-DNN kernel.

The LSTM output goes through a LayerNorm. Without it this encoder hardly learned: an LSTM's hidden state is small
at initialisation and the joiner and CTC head see almost nothing of the audio, so the predictor's prior wins. On one
fixed batch of 11 default-profile utterances (rnnt_small, AdamW 1e-3, 150 steps) the auxiliary CTC loss went from
2.5 to 2.0 nats/token without the norm and to 0.08 with it; on the whole default corpus a 500-step run without it
ended at 100% dev WER and a 1,500-step run was still on the transducer plateau (3.4 nats/token) at its end. The
Conformer ends in a LayerNorm too.

Look-ahead: an output frame covers input frames ``[stack·k, stack·k + stack − 1]``, so the first of them waits for
``stack − 1`` later frames (30 ms at 4 × 10 ms); nothing else looks ahead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LSTMTranscriber(nn.Module):
    """Frame stacking + stacked unidirectional LSTM.

    Args:
        input_dim: feature dimension F of one input frame (80 log-mel bins).
        stack: number of consecutive input frames merged into one LSTM step (the time-reduction factor).
        num_layers: LSTM layers.
        hidden_dim: LSTM hidden size; also the encoder output dimension.
        dropout: dropout between LSTM layers and on the output.
    """

    def __init__(
        self,
        input_dim: int,
        stack: int,
        num_layers: int,
        hidden_dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.stack = stack
        self.output_dim = hidden_dim
        self.lstm = nn.LSTM(
            input_dim * stack, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    @property
    def time_reduction(self) -> int:
        """Input frames per encoder output frame."""
        return self.stack

    @property
    def lookahead_frames(self) -> int:
        """How many input frames after frame t an encoder output covering frame t may depend on."""
        return self.stack - 1

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            feats: (B, T, F) features, padded after each utterance's length.
            feat_lens: (B,) valid frames per utterance.

        Returns:
            enc: (B, T', hidden_dim) with T' = ceil(T / stack).
            out_lens: (B,) = ceil(feat_lens / stack).
        """
        batch, num_frames, dim = feats.shape
        num_out = -(-num_frames // self.stack)
        # Zero the padding so the last partial group of every utterance is padded the same way whatever the batch.
        valid = torch.arange(num_frames, device=feats.device) < feat_lens[:, None]
        x = feats.masked_fill(~valid[..., None], 0.0)
        x = F.pad(x, (0, 0, 0, num_out * self.stack - num_frames)).reshape(batch, num_out, self.stack * dim)
        enc, _ = self.lstm(x)
        return self.dropout(self.norm(enc)), (feat_lens + self.stack - 1) // self.stack
