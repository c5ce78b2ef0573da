"""Transducer (RNN-T) in three parts, as ``torchaudio.models.RNNT``: transcriber (LSTM or Conformer, both
streaming), predictor (embedding + LSTM) and joiner; the transducer loss with an optional auxiliary CTC loss; and
batched greedy decoding.

Shapes: B batch, T input frames (10 ms), T' encoder frames (40 ms), U target tokens, V vocabulary (blank = 0
included), D encoder width, H predictor width, J joiner width.

The projections into the joint space live in the joiner (``enc_proj``, ``pred_proj``). Neither the transcriber nor
the predictor ends in its own output linear: two linears back to back compose into one linear, so such a layer would
only add parameters — and parameters are what this study counts.

Loss normalisation: both the transducer and the CTC loss are summed over the batch and divided by the number of
target tokens in it, i.e. the negative log-likelihood per target token (nats/token). Batches are built under a
frame budget, so a batch of short utterances holds more of them: normalising per token gives every token the same
weight whatever batch it lands in, and the scale depends neither on the batch size nor on utterance length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchaudio.functional
from torch import nn

from sub8.models.conformer import ConformerTranscriber
from sub8.models.lstm import LSTMTranscriber

BLANK = 0
ENCODERS = ("lstm", "conformer")

LSTMState = tuple[torch.Tensor, torch.Tensor]  # (h, c), each (num_layers, B, H)


@dataclass
class TransducerConfig:
    """Everything needed to rebuild a model; stored in checkpoints as ``to_dict()`` (plain types only)."""

    encoder: str  # "lstm" (RNN-T) or "conformer"
    vocab_size: int  # output units, blank (id 0) included
    input_dim: int = 80  # feature bins
    frame_shift_ms: float = 10.0  # duration of one input frame (for look-ahead in ms)
    # LSTM transcriber
    lstm_stack: int = 4  # frames stacked per LSTM step (time reduction)
    lstm_layers: int = 3
    lstm_hidden: int = 256
    # Conformer transcriber
    conformer_dim: int = 144
    conformer_layers: int = 4
    conformer_heads: int = 4
    conformer_ffn_dim: int = 576
    conformer_conv_kernel: int = 15  # causal: current + 14 past encoder frames
    conformer_chunk_frames: int = 4  # attention chunk in encoder frames (4 × 40 ms)
    conformer_left_chunks: int | None = None  # previous chunks visible to attention; None: all
    conformer_subsampling_channels: int = 64
    # predictor and joiner
    pred_embed_dim: int = 128
    pred_layers: int = 1
    pred_hidden: int = 256
    joiner_dim: int = 256
    dropout: float = 0.1
    ctc_weight: float = 0.3  # weight of the auxiliary CTC loss on the encoder output; 0 removes the CTC head

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"TransducerConfig.encoder: {self.encoder!r} is not one of {ENCODERS}")
        if self.vocab_size < 2:
            raise ValueError(f"TransducerConfig.vocab_size: {self.vocab_size} leaves no unit besides the blank")
        if self.ctc_weight < 0:
            raise ValueError(f"TransducerConfig.ctc_weight: {self.ctc_weight} is negative")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransducerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TransducerConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"TransducerConfig: missing required field(s) {missing}")
        return cls(**d)


class Predictor(nn.Module):
    """Label model: embedding + stacked LSTM over the previous tokens, with blank (id 0) as start symbol.

    Args:
        vocab_size: V.
        embed_dim: token embedding size.
        hidden_dim: LSTM hidden size H (the predictor output width).
        num_layers: LSTM layers.
        dropout: dropout on the embedding, between LSTM layers and on the output.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, num_layers: int, dropout: float = 0.0):
        super().__init__()
        self.output_dim = hidden_dim
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(
            embed_dim, hidden_dim, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, U) -> (B, U + 1, H): output u has seen the start symbol and tokens[:, :u]."""
        start = torch.full_like(tokens[:, :1], BLANK)
        out, _ = self.lstm(self.dropout(self.embedding(torch.cat([start, tokens], dim=1))))
        return self.dropout(out)

    def step(self, tokens: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """One decoding step: tokens (B,) and the state after the previous ones (None: start) -> (B, 1, H), state."""
        out, state = self.lstm(self.dropout(self.embedding(tokens[:, None])), state)
        return self.dropout(out), state


class Joiner(nn.Module):
    """tanh(enc_proj(enc) + pred_proj(pred)) -> linear to V; leading dimensions broadcast.

    Args:
        enc_dim: D.
        pred_dim: H.
        joint_dim: J.
        vocab_size: V.
    """

    def __init__(self, enc_dim: int, pred_dim: int, joint_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, joint_dim)
        self.pred_proj = nn.Linear(pred_dim, joint_dim)
        self.output = nn.Linear(joint_dim, vocab_size)

    def forward(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """enc (..., D) and pred (..., H) with broadcastable leading dims, e.g. (B, T', 1, D) and (B, 1, U+1, H)
        -> logits (B, T', U+1, V)."""
        return self.output(torch.tanh(self.enc_proj(enc) + self.pred_proj(pred)))


class TransducerOutput(NamedTuple):
    logits: torch.Tensor  # (B, T', U+1, V)
    out_lens: torch.Tensor  # (B,) valid encoder frames
    enc: torch.Tensor  # (B, T', D)
    ctc_logits: torch.Tensor | None  # (B, T', V), or None without a CTC head


def rnnt_loss_per_token(
    logits: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
) -> torch.Tensor:
    """Transducer loss (torchaudio) summed over the batch / number of target tokens.

    logits (B, T', U+1, V) with T' = max(out_lens) and U = max(token_lens); tokens (B, U) padded with anything.
    """
    loss = torchaudio.functional.rnnt_loss(
        logits.float(), tokens.int(), out_lens.int(), token_lens.int(), blank=BLANK, reduction="sum"
    )
    return loss / token_lens.sum().clamp(min=1)


def ctc_loss_per_token(
    ctc_logits: torch.Tensor, out_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
) -> torch.Tensor:
    """CTC loss summed over the batch / number of target tokens; ctc_logits (B, T', V).

    ``zero_infinity``: CTC has no alignment (infinite loss) when an utterance has fewer encoder frames than tokens
    plus repeated-token separators — possible at 40 ms frames with character units and fast speech. Such an
    utterance then contributes zero loss and gradient instead of turning the whole batch's gradient into inf/NaN;
    the transducer loss, which can emit several tokens per frame, still trains on it.
    """
    log_probs = F.log_softmax(ctc_logits.float(), dim=-1).transpose(0, 1)  # (T', B, V)
    loss = F.ctc_loss(log_probs, tokens, out_lens, token_lens, blank=BLANK, reduction="sum", zero_infinity=True)
    return loss / token_lens.sum().clamp(min=1)


def transducer_loss(
    output: TransducerOutput, tokens: torch.Tensor, token_lens: torch.Tensor, ctc_weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """rnnt + ctc_weight · ctc, from a forward's output (usable on a DistributedDataParallel wrapper's output).

    Returns the total and its parts {"rnnt", "ctc" (only with a CTC head)}, detached.
    """
    tokens = tokens[:, : output.logits.shape[2] - 1]
    rnnt = rnnt_loss_per_token(output.logits, output.out_lens, tokens, token_lens)
    parts = {"rnnt": rnnt.detach()}
    if output.ctc_logits is None:
        return rnnt, parts
    ctc = ctc_loss_per_token(output.ctc_logits, output.out_lens, tokens, token_lens)
    parts["ctc"] = ctc.detach()
    return rnnt + ctc_weight * ctc, parts


class Transducer(nn.Module):
    """Streaming transducer: transcriber (per ``config.encoder``), predictor, joiner, optional CTC head."""

    # Modules that only training uses: greedy decoding never reads the CTC head, so it is neither quantized nor
    # counted in a model's size (sub8.models.deployed_parameters).
    training_only = ("ctc_head",)

    def __init__(self, config: TransducerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        if c.encoder == "lstm":
            self.transcriber = LSTMTranscriber(c.input_dim, c.lstm_stack, c.lstm_layers, c.lstm_hidden, c.dropout)
        else:
            self.transcriber = ConformerTranscriber(
                c.input_dim,
                c.conformer_dim,
                c.conformer_layers,
                c.conformer_heads,
                c.conformer_ffn_dim,
                c.conformer_conv_kernel,
                c.conformer_chunk_frames,
                c.conformer_left_chunks,
                c.conformer_subsampling_channels,
                c.dropout,
            )
        enc_dim = self.transcriber.output_dim
        self.predictor = Predictor(c.vocab_size, c.pred_embed_dim, c.pred_hidden, c.pred_layers, c.dropout)
        self.joiner = Joiner(enc_dim, c.pred_hidden, c.joiner_dim, c.vocab_size)
        self.ctc_head = nn.Linear(enc_dim, c.vocab_size) if c.ctc_weight > 0 else None

    @property
    def lookahead_frames(self) -> int:
        """Input frames after frame t that an encoder output covering frame t may depend on."""
        return self.transcriber.lookahead_frames

    @property
    def lookahead_ms(self) -> float:
        return self.transcriber.lookahead_frames * self.config.frame_shift_ms

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, F), feat_lens (B,) -> enc (B, T', D) with T' = max(out_lens), out_lens (B,)."""
        if feats.dim() != 3 or feats.shape[-1] != self.config.input_dim:
            raise ValueError(f"feats: expected (B, T, {self.config.input_dim}), got {tuple(feats.shape)}")
        if feat_lens.numel() and int(feat_lens.min()) < 1:
            raise ValueError(f"feat_lens: every utterance needs at least one frame, got {feat_lens.tolist()}")
        # Trim batch padding beyond the longest utterance: rnnt_loss requires T' == max(out_lens).
        return self.transcriber(feats[:, : int(feat_lens.max())], feat_lens)

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> TransducerOutput:
        """
        Args:
            feats: (B, T, F) features; feat_lens: (B,) valid frames.
            tokens: (B, U) target ids (no blanks), padded; token_lens: (B,) valid tokens.

        Returns:
            TransducerOutput with logits (B, T', U'+1, V), U' = max(token_lens).
        """
        if tokens.numel() and int(tokens.max()) >= self.config.vocab_size:
            raise ValueError(f"tokens: id {int(tokens.max())} is outside the vocabulary of {self.config.vocab_size}")
        enc, out_lens = self.encode(feats, feat_lens)
        pred = self.predictor(tokens[:, : int(token_lens.max())])
        logits = self.joiner(enc.unsqueeze(2), pred.unsqueeze(1))
        ctc_logits = self.ctc_head(enc) if self.ctc_head is not None else None
        return TransducerOutput(logits, out_lens, enc, ctc_logits)

    def loss(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, tokens: torch.Tensor, token_lens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rnnt + ctc_weight · ctc, {"rnnt", "ctc"}); both per target token (see the module docstring)."""
        output = self(feats, feat_lens, tokens, token_lens)
        return transducer_loss(output, tokens, token_lens, self.config.ctc_weight)

    @torch.no_grad()
    def greedy_decode(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, max_symbols_per_frame: int = 5
    ) -> list[list[int]]:
        """Batched greedy search (call ``eval()`` first): every utterance advances frame by frame together; at a
        frame each emits tokens until it picks blank or has emitted ``max_symbols_per_frame``; the predictor
        state advances only for the utterances that emitted.

        Returns: per utterance, the token ids without blanks.
        """
        enc, out_lens = self.encode(feats, feat_lens)
        batch = enc.shape[0]
        pred, state = self.predictor.step(torch.full((batch,), BLANK, dtype=torch.long, device=enc.device), None)
        hyps: list[list[int]] = [[] for _ in range(batch)]
        for t in range(enc.shape[1]):
            emitting = t < out_lens
            for _ in range(max_symbols_per_frame):
                best = self.joiner(enc[:, t], pred[:, 0]).argmax(dim=-1)  # (B,)
                emitting = emitting & (best != BLANK)
                if not emitting.any():
                    break
                new_pred, new_state = self.predictor.step(best, state)
                pred = torch.where(emitting[:, None, None], new_pred, pred)
                state = tuple(torch.where(emitting[None, :, None], new, old) for new, old in zip(new_state, state))
                for b in emitting.nonzero().flatten().tolist():
                    hyps[b].append(int(best[b]))
        return hyps


def build_model(config: TransducerConfig) -> Transducer:
    return Transducer(config)
