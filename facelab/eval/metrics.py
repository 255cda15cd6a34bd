"""Evaluation metrics: similarity alignment (Umeyama), aligned vertex error, landmark NME
(generic and AFLW2000-3D), NME by yaw bin, and image, mask, albedo and lighting errors.

Plain functions of tensors, batched without Python loops. Distances are in the units of the
input (mm for vertices, pixels for landmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from facelab.render.lighting import sh_irradiance

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
        norm = landmark_box_size(target)
    else:
        return error
    return error / norm.clamp_min(1e-12)


# AFLW2000-3D landmark NME --------------------------------------------------------------------

#: Yaw bins of the AFLW2000-3D protocol, degrees of |yaw|; the last bin is closed at 90.
YAW_BINS = ((0, 30), (30, 60), (60, 90))


def nme_aflw2000(predicted: Tensor, target: Tensor) -> Tensor:
    """68-point NME in the AFLW2000-3D convention: mean per-point Euclidean distance divided by
    sqrt(w*h) of the target's 2D (x, y) landmark bounding box.

    predicted, target: (B,68,2) or (B,68,3) float, pixels (image x right, y down; z any depth
    unit commensurate with pixels, as 3DDFA-style annotations give). For 3D input each set's
    mean z is subtracted first, since a prediction and an annotation share no depth origin, and
    the distances are 3D. All 68 points count (the protocol ignores visibility). Returns (B,)."""
    if not (isinstance(predicted, Tensor) and isinstance(target, Tensor)) or predicted.ndim != 3 \
            or predicted.shape[-1] not in (2, 3):
        shape = tuple(predicted.shape) if isinstance(predicted, Tensor) else type(predicted).__name__
        raise ValueError(f"predicted must be a (B,68,2) or (B,68,3) tensor, got {shape}")
    if target.shape != predicted.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must have the same "
                         f"shape (both 2D or both 3D, same batch)")
    if predicted.shape[1] != 68:
        raise ValueError(f"nme_aflw2000 needs the 68-point iBUG layout, got {predicted.shape[1]} landmarks; "
                         f"use landmark_error(..., normalize='bbox') for other layouts")
    if predicted.shape[-1] == 3:
        predicted, target = _centre_depth(predicted), _centre_depth(target)
    distance = (predicted - target).square().sum(dim=-1).clamp_min(1e-20).sqrt().mean(dim=1)  # (B,)
    return distance / landmark_box_size(target).clamp_min(1e-12)


def landmark_box_size(landmarks: Tensor) -> Tensor:
    """(B,L,2+) -> (B,) sqrt(w*h) of each set's 2D (x, y) bounding box: the AFLW2000 normaliser."""
    size = landmarks[..., :2].amax(dim=1) - landmarks[..., :2].amin(dim=1)  # (B,2)
    return (size[:, 0] * size[:, 1]).sqrt()


def _centre_depth(points: Tensor) -> Tensor:
    """(B,N,3) -> the same points with each set's mean z subtracted."""
    depth = points[..., 2:]
    return torch.cat([points[..., :2], depth - depth.mean(dim=1, keepdim=True)], dim=-1)


def _yaw_bin_name(index: int) -> str:
    low, high = YAW_BINS[index]
    return f"[{low},{high}]" if index == len(YAW_BINS) - 1 else f"[{low},{high})"


def nme_by_yaw(nme: Tensor | Sequence[float], yaw_deg: Tensor | Sequence[float]) -> dict:
    """Mean NME per |yaw| bin of YAW_BINS and their balanced mean (the AFLW2000-3D table).

    nme: (B,) per-sample NME (e.g. from nme_aflw2000); yaw_deg: (B,) yaw in degrees, sign
    ignored; |yaw| of 90 or more goes into the last bin. Returns plain Python values:
    {"[0,30)": float or None (empty bin), "[30,60)": ..., "[60,90]": ..., "mean": mean of the
    non-empty bin means (None if every bin is empty), "counts": {bin name: int}}."""
    nme = torch.as_tensor(nme, dtype=torch.float64).detach().cpu()
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float64).detach().cpu()
    if nme.ndim != 1 or yaw.shape != nme.shape:
        raise ValueError(f"nme and yaw_deg must be (B,) with the same B, got {tuple(nme.shape)} and "
                         f"{tuple(yaw.shape)}")
    if not bool(torch.isfinite(yaw).all()):
        raise ValueError("yaw_deg has NaN or infinite values; drop those samples before binning")
    magnitude = yaw.abs().clamp_max(float(YAW_BINS[-1][1]))
    result: dict = {}
    counts: dict[str, int] = {}
    for index, (low, high) in enumerate(YAW_BINS):
        last = index == len(YAW_BINS) - 1
        inside = (magnitude >= low) & ((magnitude <= high) if last else (magnitude < high))
        name = _yaw_bin_name(index)
        counts[name] = int(inside.sum())
        result[name] = float(nme[inside].mean()) if counts[name] else None
    filled = [result[_yaw_bin_name(index)] for index in range(len(YAW_BINS)) if counts[_yaw_bin_name(index)]]
    result["mean"] = sum(filled) / len(filled) if filled else None
    result["counts"] = counts
    return result


# images and masks ----------------------------------------------------------------------------

def _check_mask(name: str, mask: Tensor, batch: int, size: tuple[int, int]) -> Tensor:
    """(B,1,H,W) or (B,H,W) -> (B,1,H,W) float."""
    if not isinstance(mask, Tensor) or tuple(mask.shape) not in ((batch, 1, *size), (batch, *size)):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be ({batch}, 1, {size[0]}, {size[1]}) or ({batch}, {size[0]}, {size[1]}), "
                         f"got {shape}")
    return (mask[:, None] if mask.ndim == 3 else mask).float()


def photometric_error(image: Tensor, render: Tensor, mask: Tensor) -> Tensor:
    """Masked mean absolute colour error per image.

    image, render: (B,3,H,W) float, same colour space and range; mask: (B,1,H,W) or (B,H,W) in
    [0,1], soft weights allowed (e.g. the rendered face coverage times a skin mask). Returns (B,):
    sum(mask * |image - render|) / (3 * sum(mask)), NaN for an image whose mask is all zero
    (there is nothing to compare; drop it with torch.nanmean)."""
    if not isinstance(image, Tensor) or image.ndim != 4 or image.shape[1] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a (B,3,H,W) tensor, got {shape}")
    if not isinstance(render, Tensor) or render.shape != image.shape:
        shape = tuple(render.shape) if isinstance(render, Tensor) else type(render).__name__
        raise ValueError(f"render {shape} must have the image's shape {tuple(image.shape)}")
    mask = _check_mask("mask", mask, image.shape[0], tuple(image.shape[2:])).to(image)
    if bool(((mask < 0) | (mask > 1)).any()):
        raise ValueError("mask values must lie in [0,1]")
    total = (mask * (image - render).abs()).sum(dim=(1, 2, 3))
    area = mask.sum(dim=(1, 2, 3)) * image.shape[1]
    return torch.where(area > 0, total / area.clamp_min(1e-12), torch.full_like(total, math.nan))


def mask_iou(predicted: Tensor, target: Tensor, threshold: float = 0.5) -> Tensor:
    """Intersection over union of binarised masks (a pixel is inside where its value > threshold).

    predicted, target: (B,1,H,W) or (B,H,W) float or bool, same shape. Returns (B,) in [0,1];
    two empty masks have IoU 1 (they agree everywhere)."""
    if not isinstance(predicted, Tensor) or predicted.ndim not in (3, 4):
        shape = tuple(predicted.shape) if isinstance(predicted, Tensor) else type(predicted).__name__
        raise ValueError(f"predicted must be a (B,1,H,W) or (B,H,W) mask, got {shape}")
    size = tuple(predicted.shape[-2:])
    predicted = _check_mask("predicted", predicted, predicted.shape[0], size) > threshold
    target = _check_mask("target", target, predicted.shape[0], size) > threshold
    intersection = (predicted & target).sum(dim=(1, 2, 3)).double()
    union = (predicted | target).sum(dim=(1, 2, 3)).double()
    iou = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return iou.float()


# albedo and lighting -------------------------------------------------------------------------

ALBEDO_ALIGN_MODES = ("scale", "none")


def albedo_error(predicted: Tensor, target: Tensor, weights: Tensor | None = None, align: str = "scale") -> Tensor:
    """Mean absolute per-vertex albedo error over vertices and channels.

    predicted, target: (B,V,3) float, linear colour, same topology; weights: (V,) or (B,V) >= 0
    or None (all 1), e.g. a face-region mask; align: "scale" first multiplies each channel of
    each predicted albedo by its weighted least-squares gain onto the target (albedo and light
    intensity trade off freely in self-supervised fitting, so only the colour up to a per-channel
    gain is identifiable), "none" compares raw values. Returns (B,)."""
    if align not in ALBEDO_ALIGN_MODES:
        raise ValueError(f"unknown align {align!r}; valid options: {', '.join(ALBEDO_ALIGN_MODES)}")
    _check_pair(predicted, target, 3)
    batch, count = predicted.shape[:2]
    w = _batch_weights(weights, batch, count, predicted)[..., None]  # (B,V,1)
    if align == "scale":
        gain = (w * predicted * target).sum(dim=1) / (w * predicted.square()).sum(dim=1).clamp_min(1e-20)  # (B,3)
        predicted = predicted * gain[:, None]
    difference = (predicted - target).abs().mean(dim=-1)  # (B,V)
    return _weighted_mean(difference, w[..., 0])


def sphere_directions(count: int = 1000, hemisphere: bool = False) -> Tensor:
    """(count,3) float64 unit directions evenly covering the sphere (a Fibonacci lattice: equal
    area per point, deterministic), or only the +z hemisphere when hemisphere is True."""
    if count < 1:
        raise ValueError(f"count must be a positive number of directions, got {count}")
    index = torch.arange(count, dtype=torch.float64)
    height = (index + 0.5) / count  # uniform in z is uniform in area
    z = 1.0 - height if hemisphere else 1.0 - 2.0 * height
    radius = (1.0 - z.square()).clamp_min(0.0).sqrt()
    angle = index * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), z], dim=-1)


def lighting_error(predicted_sh: Tensor, target_sh: Tensor, samples: int = 1000, hemisphere: bool = True) -> Tensor:
    """Mean absolute irradiance difference between two SH lights over a fixed set of normals.

    predicted_sh, target_sh: (B,3,9) or (B,1,9) float, facelab's radiance SH coefficients (they
    multiply the Lambertian-convolved basis of facelab.render.lighting, so irradiance 1 is a
    DEFAULT_SH_DC-only light); a mono (B,1,9) light is compared with every channel of an RGB one.
    The irradiance is evaluated at `samples` Fibonacci-lattice normals (sphere_directions) over
    the hemisphere facing the camera (+z, in camera space and in unrotated model space) when
    hemisphere is True, since only front-facing normals are ever observed, or over the whole
    sphere. Both lights must be in the same frame.
    Returns (B,) in irradiance units, mean over normals and channels."""
    for name, sh in (("predicted_sh", predicted_sh), ("target_sh", target_sh)):
        if not isinstance(sh, Tensor) or sh.ndim != 3 or sh.shape[1] not in (1, 3) or sh.shape[2] != 9:
            shape = tuple(sh.shape) if isinstance(sh, Tensor) else type(sh).__name__
            raise ValueError(f"{name} must be (B,3,9) or (B,1,9) SH coefficients, got {shape}")
    if predicted_sh.shape[0] != target_sh.shape[0]:
        raise ValueError(f"predicted_sh and target_sh batch sizes differ: {predicted_sh.shape[0]} vs "
                         f"{target_sh.shape[0]}")
    batch = predicted_sh.shape[0]
    # irradiance is linear in the coefficients, so compare the irradiance of their difference
    difference = predicted_sh.double() - target_sh.double()  # broadcasts a mono light over RGB
    normals = sphere_directions(samples, hemisphere).to(difference.device).expand(batch, samples, 3)
    return sh_irradiance(normals, difference).abs().mean(dim=(1, 2)).to(predicted_sh.dtype)
