"""The quantizer interface (design.md §5): a quantizer maps one weight tensor to at most K = 2^b levels, and only that.

How a quantizer takes part in training (fake quantization, a regularizer, a hard compressor) lives in
:mod:`sub8.quant.apply`, as in torchao's PARQ, where quantizers are small objects separate from the optimizer.

Levels are per tensor, shape (K,), or per output channel, shape (C, K) with channel c = ``w[c]`` (dim 0: the output
rows of Linear, Conv and LSTM weights, the rows of an Embedding). Codes index the levels of their tensor (or row).

The int8-grid constraint: the 8-bit accelerator only multiplies int8 values, so every level must be ``scale · m``
with ``m`` an int8 integer; sub-8-bit codes then index a K-entry int8 lookup table (LUT). ``quantize_int8`` gives
that form, and evaluation and export always use it.
"""

from __future__ import annotations

import torch

INT8_MAX = 127  # symmetric int8 grid: -127..127, so that negating a level stays on the grid


def check_bits(bits: object) -> int:
    """Validate a bit width: an int (not bool) in 1..8; returns it. Raises ValueError naming the bad value."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits!r} is invalid: expected an integer from 1 to 8")
    return bits


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of every weight, by binary search on the midpoints: O(N log K) time and O(N)
    memory (never an (N, K) distance matrix). A weight exactly at a midpoint goes to the upper level.

    Args:
        w: (C, ...) weights.
        levels: (K,) sorted levels, or (C, K) sorted per row of ``w``.

    Returns:
        codes: int64, same shape as ``w``.
    """
    midpoints = (levels[..., 1:] + levels[..., :-1]) / 2
    if levels.dim() == 1:
        return torch.searchsorted(midpoints, w.detach().contiguous(), right=True)
    rows = w.detach().reshape(w.shape[0], -1).contiguous()
    return torch.searchsorted(midpoints.contiguous(), rows, right=True).reshape(w.shape)


def dequantize(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The weights that ``codes`` stand for: ``levels[codes]`` per tensor, or per row for (C, K) levels."""
    if levels.dim() == 1:
        return levels[codes]
    return torch.gather(levels, 1, codes.reshape(codes.shape[0], -1)).reshape(codes.shape)


def snap_to_int8_grid(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap float levels to the int8 grid of their tensor: ``scale = max|levels| / 127``, ``lut = round(levels /
    scale)``. Two levels closer than ``scale`` may snap to the same entry, so the LUT holds at most K distinct values.

    Args:
        levels: (K,) or (C, K).

    Returns:
        lut: int8 of the same shape; scale: float32, () or (C,).
    """
    absmax = levels.detach().abs().amax(dim=-1)
    scale = (absmax / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny).float()
    lut = torch.round(levels.detach() / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return lut, scale


def int8_levels(lut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float levels ``lut · scale`` as the device sees them: (K,) for a scalar scale, (C, K) for a (C,) scale (a
    shared (K,) LUT is broadcast over the channels)."""
    if scale.dim() == 0:
        return lut.float() * scale
    return lut.float().expand(scale.shape[0], lut.shape[-1]) * scale[:, None]


class Quantizer:
    """Maps a weight tensor to at most ``2**bits`` levels. Subclasses implement :meth:`levels`."""

    def __init__(self, bits: int) -> None:
        self.bits = check_bits(bits)

    @property
    def num_levels(self) -> int:
        return 2**self.bits

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        """Sorted levels for ``w``: (K,), or (C, K) for a per-channel quantizer."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int64 shaped like ``w``, levels) with every weight mapped to its nearest level."""
        levels = self.levels(w)
        return nearest_level(w, levels), levels

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The nearest level in the forward, identity gradient to ``w`` (straight-through estimator)."""
        return w + (dequantize(*self.quantize(w)) - w).detach()

    def int8_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lut int8, scale) of ``w``'s levels on the int8 grid; by default the float levels snapped to it."""
        return snap_to_int8_grid(self.levels(w))

    def quantize_int8(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, lut int8, scale): the form the device runs; the weights become ``int8_levels(lut, scale)[codes]``."""
        lut, scale = self.int8_grid(w)
        return nearest_level(w, int8_levels(lut, scale)), lut, scale


class FixedLevels(Quantizer):
    """Levels chosen elsewhere and kept fixed (e.g. Lloyd-Max on the fp32 weights before fine-tuning), given on the
    int8 grid: ``lut`` (K,) int8 and a scalar ``scale``."""

    def __init__(self, bits: int, lut: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__(bits)
        if lut.dtype != torch.int8 or lut.dim() != 1 or not 1 <= lut.numel() <= self.num_levels:
            raise ValueError(
                f"FixedLevels: expected an int8 LUT of 1..{self.num_levels} entries, got {lut.dtype} {tuple(lut.shape)}"
            )
        self.lut = torch.sort(lut).values
        self.scale = scale.detach().float().reshape(())

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        return int8_levels(self.lut, self.scale).to(w.device)

    def int8_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lut.to(w.device), self.scale.to(w.device)
