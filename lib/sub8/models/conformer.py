"""Streaming Conformer transcriber: causal ×4 convolutional subsampling, then Conformer layers with chunked
self-attention and causal depthwise convolutions.

The layer follows ``torchaudio.models.conformer.ConformerLayer`` (macaron feed-forward halves, self-attention,
convolution module, final LayerNorm; same sub-module names) but is written here rather than reused, because four
things in torchaudio's layer are wrong for this study and none can be changed from outside without reaching into
private classes:

* its ``forward`` passes only a key-padding mask to attention, so attention cannot be chunked;
* its depthwise convolution is padded symmetrically (sees ``(kernel − 1) / 2`` future frames per layer);
* ``nn.MultiheadAttention`` keeps the Q/K/V projection in a bare ``in_proj_weight`` parameter, not an
  ``nn.Linear``, so the quantizers (which wrap ``nn.Linear``/``nn.Conv*``/``nn.LSTM``/``nn.Embedding``) would miss it;
* its convolution module normalises with BatchNorm (statistics pooled over the padding and over future frames in
  training) or GroupNorm (over the whole utterance, non-causal even at inference). This one uses LayerNorm, which
  normalises each frame on its own: streaming-exact in training and at inference, independent of padding.

There is no explicit positional encoding (as in torchaudio's Conformer): the causal convolutions give every frame
its relative position. Pointwise convolutions are ``nn.Linear`` (the same weights as a kernel-1 ``nn.Conv1d``,
without the transposes).

Streaming and look-ahead (``F`` = one 10 ms input frame, ``c`` = ``chunk_frames``):

* Subsampling: each stride-2 ``Conv2d`` (kernel 3) is padded by one frame on the left only, so encoder frame k sees
  input frames ``4k − 3 … 4k + 3``: nothing after the end of its own 4-frame group (3 F of look-ahead for its first
  input frame). Inputs are padded with zero frames to a multiple of 4, so ``out_lens = ceil(feat_lens / 4)``.
* Attention: encoder frames are grouped in chunks of ``c`` from the start of the utterance; a frame attends to every
  frame of its own chunk and of the previous ``left_chunks`` chunks (all previous chunks if ``None``). Chunks are
  aligned in every layer, so stacking layers does not grow the look-ahead.
* Convolution: the depthwise convolution is left-padded only (causal).

Together an encoder frame depends on no input after the end of its chunk, so the algorithmic look-ahead is
``lookahead_frames = 4c − 1`` input frames (``4c·10 − 10`` ms: 150 ms for c = 4). The 25 ms feature window adds its
own 15 ms on top, as for any model on these features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SUBSAMPLING = 4  # two stride-2 convolutions


class ConvSubsampling(nn.Module):
    """×4 time reduction by two causal stride-2 ``Conv2d`` over (time, mel), then a linear to the model width.

    Args:
        input_dim: mel bins F.
        channels: convolution channels.
        output_dim: model width D.
    """

    def __init__(self, input_dim: int, channels: int, output_dim: int) -> None:
        super().__init__()
        left_pad_time = nn.ZeroPad2d((0, 0, 1, 0))  # (freq left, freq right, time left, time right)
        self.conv = nn.Sequential(
            left_pad_time,
            nn.Conv2d(1, channels, kernel_size=3, stride=2),
            nn.ReLU(),
            left_pad_time,
            nn.Conv2d(channels, channels, kernel_size=3, stride=2),
            nn.ReLU(),
        )
        freq_bins = ((input_dim - 1) // 2 - 1) // 2  # each unpadded kernel-3 stride-2 conv: F -> (F - 1) // 2
        self.out = nn.Linear(channels * freq_bins, output_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T, F) with T a multiple of 4 -> (B, T / 4, D)."""
        x = self.conv(feats.unsqueeze(1))  # (B, C, T/4, F')
        return self.out(x.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Pre-norm position-wise feed-forward block: (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.sequential = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequential(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention under a boolean mask, with its projections in plain ``nn.Linear`` layers."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model width {dim} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, T, D).
            mask: (B, 1, T, T) bool, True where query t may attend to key s.

        Returns:
            (B, T, D).
        """
        batch, frames, dim = x.shape
        q, k, v = self.qkv(x).view(batch, frames, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(batch, frames, dim))


class CausalConvolution(nn.Module):
    """Conformer convolution module with a causal depthwise convolution: (B, T, D) -> (B, T, D).

    LayerNorm, pointwise expansion + GLU, depthwise convolution over the current and ``kernel_size − 1`` past
    frames, LayerNorm, SiLU, pointwise projection, dropout.
    """

    def __init__(self, dim: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel_size, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim)
        self.pointwise_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.glu(self.pointwise_in(self.layer_norm(x)), dim=-1).transpose(1, 2)  # (B, D, T)
        y = self.depthwise(F.pad(y, (self.depthwise.kernel_size[0] - 1, 0))).transpose(1, 2)
        return self.dropout(self.pointwise_out(F.silu(self.depthwise_norm(y))))


class ConformerLayer(nn.Module):
    """Macaron Conformer layer, as torchaudio's: ½ FFN, masked self-attention, causal convolution, ½ FFN, norm."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, conv_kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.ffn1 = FeedForward(dim, ffn_dim, dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, num_heads, dropout)
        self.self_attn_dropout = nn.Dropout(dropout)
        self.conv_module = CausalConvolution(dim, conv_kernel_size, dropout)
        self.ffn2 = FeedForward(dim, ffn_dim, dropout)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), mask: (B, 1, T, T) bool -> (B, T, D)."""
        x = x + 0.5 * self.ffn1(x)
        x = x + self.self_attn_dropout(self.self_attn(self.self_attn_layer_norm(x), mask))
        x = x + self.conv_module(x)
        x = x + 0.5 * self.ffn2(x)
        return self.final_layer_norm(x)


def attention_mask(out_lens: torch.Tensor, num_frames: int, chunk_frames: int, left_chunks: int | None) -> torch.Tensor:
    """(B, 1, T', T') bool, True where query t may attend to key s: s lies in t's chunk or in one of the
    ``left_chunks`` chunks before it (any earlier chunk if None), and s is a valid frame — or s is t itself.

    Padding frames may attend to themselves because a query row with every key masked gives NaN on some attention
    backends, and a NaN in a padding frame's value would reach valid frames in the next layer (0 · NaN = NaN).
    """
    frames = torch.arange(num_frames, device=out_lens.device)
    distance = frames[:, None] // chunk_frames - frames[None, :] // chunk_frames  # chunks from key to query
    allowed = distance >= 0
    if left_chunks is not None:
        allowed &= distance <= left_chunks
    key_valid = frames < out_lens[:, None]  # (B, T')
    itself = frames[:, None] == frames[None, :]
    return (allowed & (key_valid[:, None, :] | itself)).unsqueeze(1)


class ConformerTranscriber(nn.Module):
    """Causal ×4 subsampling + Conformer layers with chunked attention (see the module docstring).

    Args:
        input_dim: mel bins F.
        dim: model width D (also the encoder output dimension).
        num_layers: Conformer layers.
        num_heads: attention heads.
        ffn_dim: feed-forward hidden width.
        conv_kernel_size: depthwise convolution kernel (current frame + kernel − 1 past frames).
        chunk_frames: attention chunk, in encoder frames (4 input frames each).
        left_chunks: previous chunks a frame may attend to; None for all of them.
        subsampling_channels: channels of the two subsampling convolutions.
        dropout: dropout probability.
    """

    def __init__(
        self,
        input_dim: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        ffn_dim: int,
        conv_kernel_size: int,
        chunk_frames: int,
        left_chunks: int | None = None,
        subsampling_channels: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.input_dim = input_dim
        self.output_dim = dim
        self.chunk_frames = chunk_frames
        self.left_chunks = left_chunks
        self.subsampling = ConvSubsampling(input_dim, subsampling_channels, dim)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(dim, ffn_dim, num_heads, conv_kernel_size, dropout) for _ in range(num_layers)
        )

    @property
    def time_reduction(self) -> int:
        """Input frames per encoder output frame."""
        return SUBSAMPLING

    @property
    def lookahead_frames(self) -> int:
        """How many input frames after frame t an encoder output covering frame t may depend on."""
        return SUBSAMPLING * self.chunk_frames - 1

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            feats: (B, T, F) features, padded after each utterance's length.
            feat_lens: (B,) valid frames per utterance.

        Returns:
            enc: (B, T', D) with T' = ceil(T / 4).
            out_lens: (B,) = ceil(feat_lens / 4).
        """
        num_frames = feats.shape[1]
        num_out = -(-num_frames // SUBSAMPLING)
        # Zero the padding so the last partial group of every utterance is padded the same way whatever the batch.
        valid = torch.arange(num_frames, device=feats.device) < feat_lens[:, None]
        x = feats.masked_fill(~valid[..., None], 0.0)
        x = self.dropout(self.subsampling(F.pad(x, (0, 0, 0, num_out * SUBSAMPLING - num_frames))))

        out_lens = (feat_lens + SUBSAMPLING - 1) // SUBSAMPLING
        mask = attention_mask(out_lens, num_out, self.chunk_frames, self.left_chunks)
        for layer in self.layers:
            x = layer(x, mask)
        return x, out_lens
