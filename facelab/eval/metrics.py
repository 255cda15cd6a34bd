"""Evaluation metrics: similarity alignment (Umeyama), aligned vertex error and landmark NME.

Plain functions of tensors, batched without Python loops. Distances are in the units of the
input (mm for vertices, pixels for landmarks)."""

from __future__ import annotations

import torch
from torch import Tensor

ALIGN_MODES = ("similarity", "rigid", "none")
NORMALIZE_MODES = ("none", "interocular", "bbox")
# outer eye corners of the iBUG 68-point layout (0-based)
OUTER_EYE_CORNERS_68 = (36, 45)


def _check_points(name: str, points: Tensor, dim: int) -> None:
    if not isinstance(points, Tensor) or points.ndim != 3 or points.shape[-1] != dim:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"{name} must be a (B,N,{dim}) tensor, got {shape}; add a batch dimension "
                         f"with [None] for a single sample")


def _check_pair(predicted: Tensor, target: Tensor, dim: int, names=("predicted", "target")) -> None:
    _check_points(names[0], predicted, dim)
    _check_points(names[1], target, dim)
    if predicted.shape != target.shape:
        raise ValueError(f"{names[0]} {tuple(predicted.shape)} and {names[1]} {tuple(target.shape)} must have "
                         f"the same shape (same batch size and point order)")


def _batch_weights(weights: Tensor | None, batch: int, count: int, like: Tensor, name: str = "weights") -> Tensor:
    """(N,) or (B,N) non-negative weights (or None: all 1) -> (B,N) in like's dtype and device."""
    if weights is None:
        return torch.ones(batch, count, dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights)
    if weights.shape not in ((count,), (batch, count)):
        raise ValueError(f"{name} must have shape ({count},) or ({batch}, {count}) to match the points, "
                         f"got {tuple(weights.shape)}")
    weights = weights.to(like).expand(batch, count)
    if bool((weights.detach() < 0).any()):
        raise ValueError(f"{name} must be non-negative; use 0 to drop a point")
    return weights


def similarity_transform(source: Tensor, target: Tensor, weights: Tensor | None = None,
                         scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity (Umeyama 1991) with target ~ s R source + t and det R = +1.

    source, target: (B,N,3) float, corresponding points (N >= 3); weights: (N,) or (B,N) >= 0, or
    None (all 1); scale: False fits a rigid transform (s = 1). Returns scale (B,), rotation
    (B,3,3), translation (B,3) in source's dtype; computed in float64. Differentiable (through
    an SVD, so gradients are unreliable for degenerate, e.g. collinear, point sets)."""
    _check_pair(source, target, 3, ("source", "target"))
    batch, count = source.shape[:2]
    if count < 3:
        raise ValueError(f"a 3D similarity needs at least 3 corresponding points, got {count}")
    dtype = source.dtype if source.is_floating_point() else torch.float32
    x, y = source.double(), target.double()
    w = _batch_weights(weights, batch, count, x)
    total = w.sum(dim=1, keepdim=True)
    if bool((total.detach() <= 0).any()):
        raise ValueError("weights sum to zero for some sample; give at least 3 points positive weight")
    w = w / total  # (B,N), sums to 1
    mean_x = (w[..., None] * x).sum(dim=1)  # (B,3)
    mean_y = (w[..., None] * y).sum(dim=1)
    xc, yc = x - mean_x[:, None], y - mean_y[:, None]
    covariance = torch.einsum("bn,bni,bnj->bij", w, yc, xc)  # (B,3,3), sum w y x^T
    u, singular, vh = torch.linalg.svd(covariance)
    # flip the weakest axis where U V^T would be a reflection
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    correction = torch.cat([torch.ones_like(singular[:, :2]), sign[:, None]], dim=1)  # (B,3)
    rotation = u @ (correction[..., None] * vh)
    if scale:
        variance = (w * xc.square().sum(dim=-1)).sum(dim=1)  # (B,)
        s = (singular * correction).sum(dim=1) / variance.clamp_min(1e-300)
    else:
        s = torch.ones(batch, dtype=x.dtype, device=x.device)
    translation = mean_y - s[:, None] * torch.einsum("bij,bj->bi", rotation, mean_x)
    return s.to(dtype), rotation.to(dtype), translation.to(dtype)


def apply_similarity(points: Tensor, scale: Tensor, rotation: Tensor, translation: Tensor) -> Tensor:
    """s R p + t for each point. points: (B,N,3); scale: (B,); rotation: (B,3,3); translation:
    (B,3). Returns (B,N,3)."""
    _check_points("points", points, 3)
    batch = points.shape[0]
    if scale.shape != (batch,) or rotation.shape != (batch, 3, 3) or translation.shape != (batch, 3):
        raise ValueError(f"for {batch} point sets expected scale ({batch},), rotation ({batch}, 3, 3), translation "
                         f"({batch}, 3); got {tuple(scale.shape)}, {tuple(rotation.shape)}, "
                         f"{tuple(translation.shape)}")
    return scale[:, None, None] * points @ rotation.transpose(1, 2) + translation[:, None]


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """(B,N) values, (B,N) weights -> (B,) weighted mean (0 where all weights are 0)."""
    return (weights * values).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


def aligned_vertex_error(predicted: Tensor, target: Tensor, align: str = "similarity",
                         weights: Tensor | None = None) -> Tensor:
    """Mean Euclidean per-vertex distance after aligning predicted onto target.

    predicted, target: (B,V,3) float, same topology (e.g. mm); align: "similarity" (scale,
    rotation, translation), "rigid" (rotation, translation) or "none"; weights: (V,) or (B,V)
    >= 0 or None, used for both the fit and the mean (0 drops a vertex, e.g. outside the face
    region). Returns (B,) in the input units."""
    if align not in ALIGN_MODES:
        raise ValueError(f"unknown align {align!r}; valid options: {', '.join(ALIGN_MODES)}")
    _check_pair(predicted, target, 3)
    batch, count = predicted.shape[:2]
    if align != "none":
        transform = similarity_transform(predicted, target, weights, scale=align == "similarity")
        predicted = apply_similarity(predicted, *(part.to(predicted.dtype) for part in transform))
    distance = (predicted - target).square().sum(dim=-1).clamp_min(1e-20).sqrt()  # (B,V)
    return _weighted_mean(distance, _batch_weights(weights, batch, count, distance))


def landmark_error(predicted: Tensor, target: Tensor, normalize: str = "none",
                   confidence: Tensor | None = None) -> Tensor:
    """Mean 2D Euclidean landmark distance per image, optionally normalised (NME).

    predicted, target: (B,L,2) float, pixels; normalize: "none" (pixels), "interocular" (divide
    by the target's outer-eye-corner distance, 68-point iBUG points 36 and 45) or "bbox" (divide
    by sqrt(w*h) of the target's landmark bounding box, the AFLW2000 convention); confidence:
    (B,L) >= 0 or None, weights the mean. Returns (B,)."""
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize {normalize!r}; valid options: {', '.join(NORMALIZE_MODES)}")
    if isinstance(predicted, Tensor) and isinstance(target, Tensor) and predicted.ndim == 3 \
            and predicted.shape[-1] == 3 and target.shape[-1] == 3:
        raise ValueError("landmark_error compares 2D landmarks (B,L,2); pass predicted[..., :2] and target[..., :2]")
    _check_pair(predicted, target, 2)
    batch, count = predicted.shape[:2]
    distance = (predicted - target).square().sum(dim=-1).clamp_min(1e-20).sqrt()  # (B,L)
    error = _weighted_mean(distance, _batch_weights(confidence, batch, count, distance, "confidence"))
    if normalize == "interocular":
        if count != 68:
            raise ValueError(f"interocular normalisation needs the 68-point iBUG layout, got {count} landmarks; "
                             f"use normalize='bbox' for other layouts")
        left, right = OUTER_EYE_CORNERS_68
        norm = (target[:, left] - target[:, right]).norm(dim=-1)
    elif normalize == "bbox":
        size = target.amax(dim=1) - target.amin(dim=1)  # (B,2)
        norm = (size[:, 0] * size[:, 1]).sqrt()
    else:
        return error
    return error / norm.clamp_min(1e-12)
