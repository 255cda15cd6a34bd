"""Photometric losses: how well a render explains the input's colours, inside a mask."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def pixel_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-pixel Euclidean colour distance, (B,3,H,W) x2 -> (B,H,W); sqrt(eps + sum of squares)
    keeps the gradient finite where the two agree."""
    return (EPS + (a - b).square().sum(dim=1)).sqrt()


def skin_confidence(probability: Tensor) -> Tensor:
    """C_skin from a skin probability map p (B,H,W) in [0,1]: 1 where p > 0.5, else p, so skin
    pixels count fully and doubtful ones (beard, hair, highlights) in proportion."""
    return torch.where(probability > 0.5, torch.ones_like(probability), probability)


def masked_photometric(image: Tensor, render: Tensor, mask: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean colour distance inside a mask, per image, then the batch mean.

    image, render: (B,3,H,W) in [0,1]; mask: (B,H,W) {0,1} (detached: the mask says where to
    compare, not what to change); weights: (B,H,W) >= 0 or None (all 1). The denominator is the
    mask's total weight, at least 1."""
    mask = mask.detach().to(image.dtype)
    weight = mask if weights is None else mask * weights.detach()
    total = (weight * pixel_distance(image, render)).sum(dim=(1, 2))
    return (total / weight.sum(dim=(1, 2)).clamp_min(1.0)).mean()


def hybrid_photometric(image: Tensor, diffuse: Tensor, full: Tensor, mask: Tensor, skin: Tensor,
                       eta: float = 1.0) -> Tensor:
    """The specular method's L_photo: the diffuse-only render must explain the skin colour
    (weighted by C_skin, so highlights and hair do not leak into diffuse albedo), and the full
    render (diffuse + specular) everything inside the mask, with weight eta.

    image, diffuse, full: (B,3,H,W); mask: (B,H,W) face skin and render coverage; skin: (B,H,W)
    C_skin (see :func:`skin_confidence`)."""
    return masked_photometric(image, diffuse, mask, skin) + eta * masked_photometric(image, full, mask)
