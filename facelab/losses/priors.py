"""Priors on predicted parameters: coefficient norms, colour uniformity, monochrome light."""

from __future__ import annotations

from torch import Tensor


def coefficient_l2(*coefficients: Tensor) -> Tensor:
    """Sum of squared coefficients over every given group, per sample, then the batch mean.
    Each group (B,K); with standard-normal model coefficients this is the negative log prior up
    to a factor 2."""
    return sum(group.square().flatten(1).sum(dim=1) for group in coefficients).mean()


def colour_variance(colours: Tensor, weights: Tensor | None = None, norm: str = "l2sq") -> Tensor:
    """Mean deviation of colours from their own mean, per sample, then the batch mean.

    colours: (B,N,3) (per-vertex albedo or shaded diffuse colour, linear); weights: (N,) or
    (B,N) {0,1} selecting the points that count (default all); norm: "l2sq" (squared
    Euclidean) or "l1" (sum of absolute channel deviations)."""
    if norm not in ("l2sq", "l1"):
        raise ValueError(f"norm must be 'l2sq' or 'l1', got {norm!r}")
    weight = colours.new_ones(colours.shape[:2]) if weights is None else weights.to(colours).expand(colours.shape[:2])
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (weight[..., None] * colours).sum(dim=1, keepdim=True) / count[..., None]
    deviation = colours - mean
    per_point = deviation.square().sum(-1) if norm == "l2sq" else deviation.abs().sum(-1)
    return ((weight * per_point).sum(dim=1) / count[:, 0]).mean()


def sh_channel_spread(sh: Tensor, reduction: str = "sum") -> Tensor:
    """How far the SH light is from monochrome: squared deviation of each coefficient's three
    channels from their mean. sh: (B,3,9); reduction over the 27 entries: "sum" or "mean";
    then the batch mean."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    spread = (sh - sh.mean(dim=1, keepdim=True)).square().flatten(1)
    return (spread.sum(dim=1) if reduction == "sum" else spread.mean(dim=1)).mean()


def uniform(colours: Tensor, sh: Tensor, weights: Tensor | None = None, norm: str = "l2sq",
            sh_reduction: str = "sum") -> Tensor:
    """The specular method's L_uniform: diffuse colours as uniform as the image allows, so the
    rest of the appearance goes to specular, plus near-monochrome diffuse light (the printed
    formula sums deviations from their own means, which is identically zero; this is the squared
    reading). See :func:`colour_variance` and :func:`sh_channel_spread`."""
    return colour_variance(colours, weights, norm) + sh_channel_spread(sh, sh_reduction)
