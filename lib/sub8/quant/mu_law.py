"""The μ-law constrained space of GQ (design.md §5): levels ``c_k = s · F⁻¹_μ(u_k)`` with ``u_k`` in [−1, 1].

``F_μ(x) = sgn(x) ln(1 + μ|x|) / ln(1 + μ)`` maps [−1, 1] onto itself, stretching the middle; its inverse
``F⁻¹_μ(y) = sgn(y) ((1 + μ)^|y| − 1) / μ`` turns evenly spaced ``u`` into levels dense near zero and sparse in the
tails, the shape of a weight histogram. ``μ → 0`` gives uniform levels.
"""

from __future__ import annotations

import math

import torch

from sub8.quant.base import check_bits


def mu_law_expand(y: torch.Tensor, mu: float) -> torch.Tensor:
    """F⁻¹_μ(y) elementwise: [−1, 1] → [−1, 1], differentiable in ``y``."""
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu


def mu_law_compress(x: torch.Tensor, mu: float) -> torch.Tensor:
    """F_μ(x) elementwise, the inverse of :func:`mu_law_expand`."""
    if mu <= 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


def even_grid(bits: int) -> torch.Tensor:
    """(K,) = 2^bits points evenly spaced over [−1, 1], ends included (GQ's initial ``u``)."""
    k = 2 ** check_bits(bits)
    return torch.linspace(-1.0, 1.0, k)


def mu_law_levels(bits: int, scale: float | torch.Tensor, mu: float) -> torch.Tensor:
    """(K,) sorted levels ``scale · F⁻¹_μ(u)`` for evenly spaced ``u``: GQ's levels before training."""
    return torch.as_tensor(scale, dtype=torch.float32) * mu_law_expand(even_grid(bits), mu)
