"""Symmetric uniform quantization, the "8-bit QAT" baseline (design.md §5).

``scale = max|W| / qmax`` with ``qmax = 2^(b-1) - 1``, per tensor or per output channel; ``q = clamp(round(W /
scale), -qmax, qmax)``; the weight becomes ``q · scale``. The grid is symmetric with zero on it, so it uses 2^b - 1
of the 2^b codes, and its levels are already on the int8 grid (``m = q`` with |q| ≤ 127): no snapping at export.
One bit cannot hold a symmetric grid with zero ({-s, 0, s} needs three codes), so b = 1 is refused.
"""

from __future__ import annotations

import torch

from sub8.quant.base import Quantizer, int8_levels


class UniformQuantizer(Quantizer):
    def __init__(self, bits: int, per_channel: bool = True) -> None:
        super().__init__(bits)
        if bits < 2:
            raise ValueError(f"uniform quantization needs at least 2 bits (a symmetric grid with zero), got {bits}")
        self.per_channel = per_channel
        self.qmax = 2 ** (bits - 1) - 1

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """() per tensor or (C,) per channel; never 0 (an all-zero row keeps a tiny scale and quantizes to 0)."""
        w = w.detach()
        absmax = w.reshape(w.shape[0], -1).abs().amax(dim=1) if self.per_channel else w.abs().amax()
        return (absmax / self.qmax).clamp_min(torch.finfo(torch.float32).tiny).float()

    def int8_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lut = torch.arange(-self.qmax, self.qmax + 1, dtype=torch.int8, device=w.device)
        return lut, self.scale(w)

    def levels(self, w: torch.Tensor) -> torch.Tensor:
        return int8_levels(*self.int8_grid(w))

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Rounding w / scale is the nearest-level search of a uniform grid, without the binary search.
        scale = self.scale(w)
        s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (w.dim() - 1)))
        codes = torch.clamp(torch.round(w.detach() / s), -self.qmax, self.qmax).long() + self.qmax
        return codes, int8_levels(*self.int8_grid(w))

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """``q · scale`` in the forward, identity gradient to ``w`` (straight-through estimator)."""
        scale = self.scale(w)
        s = scale if scale.dim() == 0 else scale.reshape(-1, *([1] * (w.dim() - 1)))
        hard = torch.clamp(torch.round(w.detach() / s), -self.qmax, self.qmax) * s
        return w + (hard - w).detach()

    def quantize_int8(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, _ = self.quantize(w)
        return (codes, *self.int8_grid(w))
