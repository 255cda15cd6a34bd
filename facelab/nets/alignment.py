"""Differentiable five-point similarity alignment of face images to SFace's 112x112 crop.

The same geometry as OpenCV's ``FaceRecognizerSF::alignCrop``: a least-squares similarity
(rotation, uniform scale, translation; no reflection) from five points (subject's right eye
centre, left eye centre, nose tip, right and left mouth corner) to :data:`SFACE_TEMPLATE`, then a
bilinear warp to 112x112 with zeros outside the image. Everything is torch, so gradients reach both
the images and the points.

Coordinates are continuous pixels with pixel centres at +0.5 (the facelab convention): the pixel
in row i, column j covers [j, j+1] x [i, i+1]. OpenCV indexes pixel centres at integers, so
points given to OpenCV (e.g. YuNet's) are OpenCV coordinates plus 0.5 here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Side of SFace's aligned crop, pixels.
SFACE_CROP_SIZE = 112

#: alignCrop's destination points in OpenCV pixel coordinates (centres at integers), from
#: ``getSimilarityTransformMatrix`` in OpenCV's modules/objdetect/src/face_recognize.cpp: the
#: ArcFace 112x112 template (Deng et al. 2019, insightface). Rows: subject's right eye, left eye,
#: nose tip, right mouth corner, left mouth corner; columns x (right), y (down).
SFACE_TEMPLATE_OPENCV = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
                         (41.5493, 92.3655), (70.7299, 92.2041))

#: The same five points in facelab's continuous pixel coordinates of the 112x112 crop.
SFACE_TEMPLATE = tuple((x + 0.5, y + 0.5) for x, y in SFACE_TEMPLATE_OPENCV)

# iBUG 68-point indices (0-based) of the five alignment points.
IBUG_RIGHT_EYE = slice(36, 42)  # the subject's right eye: six contour points, image left
IBUG_LEFT_EYE = slice(42, 48)
IBUG_NOSE_TIP = 30
IBUG_RIGHT_MOUTH_CORNER = 48
IBUG_LEFT_MOUTH_CORNER = 54


def five_points_from_68(landmarks_68: torch.Tensor) -> torch.Tensor:
    """landmarks_68: (...,68,2) iBUG points -> (...,5,2) in :data:`SFACE_TEMPLATE`'s order: eye
    centres (mean of each eye's six contour points), nose tip (30), mouth corners (48, 54)."""
    if landmarks_68.shape[-2:] != (68, 2):
        raise ValueError(f"five_points_from_68 takes (...,68,2) landmarks, got {tuple(landmarks_68.shape)}")
    eyes = [landmarks_68[..., IBUG_RIGHT_EYE, :].mean(-2), landmarks_68[..., IBUG_LEFT_EYE, :].mean(-2)]
    nose_and_mouth = landmarks_68[..., [IBUG_NOSE_TIP, IBUG_RIGHT_MOUTH_CORNER, IBUG_LEFT_MOUTH_CORNER], :]
    return torch.cat([torch.stack(eyes, dim=-2), nose_and_mouth], dim=-2)


def fit_similarity(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity taking source (B,N,2) to target (B,N,2) or (N,2), N >= 2.

    Returns (B,2,3) matrices M with target ~ M @ [x, y, 1]. In complex numbers the linear part is
    a = sum(w conj(z)) / sum(|z|^2) over centred points z (source), w (target): Umeyama's solution
    restricted to proper rotations, which is what alignCrop computes with an SVD."""
    if source.ndim != 3 or source.shape[-1] != 2 or source.shape[1] < 2:
        raise ValueError(f"fit_similarity takes (B,N,2) source points with N >= 2, got {tuple(source.shape)}")
    target = target.to(source).expand_as(source)
    source_mean, target_mean = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
    x, y = (source - source_mean).unbind(-1)
    u, v = (target - target_mean).unbind(-1)
    spread = (x * x + y * y).sum(1).clamp_min(torch.finfo(source.dtype).tiny)
    a_real, a_imag = (u * x + v * y).sum(1) / spread, (v * x - u * y).sum(1) / spread
    linear = torch.stack([torch.stack([a_real, -a_imag], -1), torch.stack([a_imag, a_real], -1)], -2)
    shift = target_mean[:, 0] - (linear @ source_mean[:, 0, :, None])[..., 0]
    return torch.cat([linear, shift[..., None]], dim=-1)


def warp_affine(images: torch.Tensor, matrix: torch.Tensor, size: int) -> torch.Tensor:
    """images (B,C,H,W) float, matrix (B,2,3) from image to output continuous pixel coordinates
    -> (B,C,size,size): output pixel centre p holds images at matrix⁻¹ p, bilinear, zero outside
    (OpenCV's warpAffine with INTER_LINEAR and a zero constant border, in facelab coordinates).

    Bilinear taps alias when the warp shrinks by more than about 2: blur or pool the images first."""
    if images.ndim != 4 or matrix.shape != (images.shape[0], 2, 3):
        raise ValueError(f"warp_affine takes (B,C,H,W) images and (B,2,3) matrices, got {tuple(images.shape)} "
                         f"and {tuple(matrix.shape)}")
    height, width = images.shape[-2:]
    matrix = matrix.to(images)
    inverse_linear = torch.linalg.inv(matrix[:, :, :2])
    centres = torch.arange(size, device=images.device, dtype=images.dtype) + 0.5
    row, column = torch.meshgrid(centres, centres, indexing="ij")
    output_points = torch.stack([column, row], -1).reshape(1, -1, 2) - matrix[:, None, :, 2]
    source = output_points @ inverse_linear.transpose(1, 2)  # (B,size²,2), continuous pixels
    # grid_sample with align_corners=False puts -1 and +1 at the outer pixel edges, 0 and W here.
    grid = source / source.new_tensor([width, height]) * 2 - 1
    return F.grid_sample(images, grid.reshape(-1, size, size, 2), mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def sface_alignment(points_5: torch.Tensor) -> torch.Tensor:
    """points_5 (B,5,2) image pixels -> (B,2,3) similarity from the image to SFace's crop."""
    return fit_similarity(points_5, torch.tensor(SFACE_TEMPLATE, dtype=points_5.dtype, device=points_5.device))


def align_crop(images: torch.Tensor, points_5: torch.Tensor) -> torch.Tensor:
    """images (B,C,H,W) float, points_5 (B,5,2) image pixels in :data:`SFACE_TEMPLATE`'s order ->
    (B,C,112,112) aligned crops for :class:`facelab.nets.sface.SFace`, differentiable in both."""
    return warp_affine(images, sface_alignment(points_5), SFACE_CROP_SIZE)
