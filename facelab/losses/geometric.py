"""Geometric losses: landmark reprojection and mask overlap."""

from __future__ import annotations

import torch
from torch import Tensor

# iBUG 68-point groups (0-based)
BROWS_68 = tuple(range(17, 27))
OUTER_LIPS_68 = tuple(range(48, 60))


def landmark_weights(emphasis: float = 20.0, groups: tuple[tuple[int, ...], ...] = (BROWS_68, OUTER_LIPS_68),
                     count: int = 68) -> Tensor:
    """Per-landmark weights mu (count,): `emphasis` on the given groups, 1 elsewhere. The
    specular method's default stresses the brows and the outer lips (inner lips stay at 1: they
    are ambiguous, which the inner-mouth mask term addresses)."""
    weights = torch.ones(count)
    for group in groups:
        weights[list(group)] = emphasis
    return weights


def landmark_reprojection(predicted: Tensor, target: Tensor, weights: Tensor | None = None,
                          confidence: Tensor | None = None, squared: bool = False) -> Tensor:
    """Weighted mean landmark distance in pixels, per image, then the batch mean.

    predicted, target: (B,N,2) px; weights: (N,) (mu; default 1); confidence: (B,N) in [0,1]
    from the detector (default 1), multiplied into the weights; squared: squared distances
    instead of Euclidean ones. The sum is divided by N, as in (1/|K|) sum mu_i ||k_i - k_i^p||."""
    distance = (predicted - target).square().sum(dim=-1)
    distance = distance if squared else (distance + 1e-12).sqrt()
    weight = torch.ones_like(distance) if weights is None else weights.to(distance).expand_as(distance)
    if confidence is not None:
        weight = weight * confidence.to(distance)
    return ((weight * distance).sum(dim=-1) / distance.shape[-1]).mean()


def mask_l1(target: Tensor, predicted: Tensor) -> Tensor:
    """Sum over pixels of |A - A^p| per image, then the batch mean. target: (B,H,W) {0,1}
    (a labelled region of the input); predicted: (B,H,W) in [0,1] (a soft rendered mask).

    A sum, not a mean: a mouth covers 1e2 to 1e3 pixels, and a per-pixel mean would make any
    sensible weight vanish."""
    return (target.detach().to(predicted) - predicted).abs().sum(dim=(1, 2)).mean()
