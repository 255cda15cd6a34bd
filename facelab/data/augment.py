"""Augmentation of raw samples (numpy, before ``schema.to_tensors``) that keeps labels consistent
with the image: a horizontal flip mirrors the landmarks and permutes them so that each index keeps
its meaning (iBUG 36, the subject's right eye corner, is still the right eye corner), a similarity
warp moves landmarks, mask and region map exactly as it moves the image, and colour jitter touches
the image only.

Coordinates follow the project convention: pixel centres at +0.5, so a flip maps x to W - x and a
warp matrix acts on continuous pixel coordinates (converted once for OpenCV, whose pixel centres
lie on integers). A group sample (K frames) gets one draw for all its frames, so a clip stays
temporally consistent. Samples that carry ground truth (``params``/``verts``) get no flip, warp
or jitter unless ``ground_truth`` is set: a mirrored image has no mirrored parameter vector, a
warp changes the camera and a jitter the albedo and light; resizing to the output size applies to
every sample.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, fields
from typing import Mapping

import cv2
import numpy as np

from facelab.facemodel.derive import IBUG_MIRROR_68

from .schema import SampleError

log = logging.getLogger(__name__)

#: Mirror partners of the 10 MediaPipe iris points (468..472 one eye: centre, then the ring in
#: the order inner-side, top, outer-side, bottom; 473..477 the other eye, its ring starting at the
#: outer side), taken from MediaPipe's face_model_with_iris.obj.
IRIS_MIRROR = np.array([473, 476, 475, 474, 477, 468, 471, 470, 469, 472])


@dataclass(frozen=True)
class AugmentConfig:
    """The ``augment`` block of a data config. color_jitter: relative range of brightness,
    contrast and saturation factors; max_rotation_deg, max_scale (relative), max_shift (fraction
    of the image size): ranges of the similarity warp; ground_truth: augment samples with
    ``params``/``verts`` too (their ground truth then no longer matches the image)."""

    flip: bool = False
    color_jitter: float = 0.0
    max_rotation_deg: float = 0.0
    max_scale: float = 0.0
    max_shift: float = 0.0
    ground_truth: bool = False

    @classmethod
    def from_config(cls, cfg: Mapping | None) -> "AugmentConfig":
        cfg = dict(cfg or {})
        valid = [field.name for field in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown augment keys {unknown}; valid: {valid}")
        return cls(**cfg)

    @property
    def warps(self) -> bool:
        return bool(self.max_rotation_deg or self.max_scale or self.max_shift)


def mirror_permutation(points: np.ndarray, tolerance: float = 1e-3) -> np.ndarray:
    """perm with points[perm[i]] the mirror image (x -> -x) of points[i], for a left-right
    symmetric point set (N,3) or (N,2); ValueError if some point has no partner within
    `tolerance` times the set's extent, or the pairing is not an involution."""
    points = np.asarray(points, np.float64)
    mirrored = points * np.r_[-1.0, np.ones(points.shape[1] - 1)]
    distance = np.linalg.norm(mirrored[:, None] - points[None], axis=-1)
    perm = distance.argmin(axis=1)
    worst = distance[np.arange(len(points)), perm].max()
    extent = np.ptp(points, axis=0).max()
    if worst > tolerance * extent or not np.array_equal(perm[perm], np.arange(len(points))):
        raise ValueError(f"points are not mirror-symmetric (worst partner distance {worst:.3g}, extent {extent:.3g})")
    return perm


@functools.lru_cache(maxsize=1)
def dense_mirror_permutation() -> np.ndarray | None:
    """(478,) mirror permutation of the MediaPipe points: the 468 mesh points paired by nearest
    mirrored vertex of the canonical face model (an asset), the iris points by IRIS_MIRROR.
    None (with a warning) when the asset cannot be found; computed once per process."""
    from facelab import assets
    from facelab.facemodel.obj import read_obj_vertices

    try:
        path = assets.find("mediapipe-canonical")
    except assets.AssetNotFoundError as error:
        log.warning("no mirror permutation for dense landmarks, so samples that carry them are not flipped: %s",
                    error)
        return None
    return np.concatenate([mirror_permutation(read_obj_vertices(path)), IRIS_MIRROR])


def has_ground_truth(sample: dict) -> bool:
    return "params" in sample or "verts" in sample


def hflip(sample: dict, dense_perm: np.ndarray | None = None) -> dict:
    """Mirror a raw sample left-right: image, mask and regions flipped; landmarks x -> W - x and
    permuted by IBUG_MIRROR_68 (confidences with them); dense landmarks likewise with `dense_perm`
    (default :func:`dense_mirror_permutation`; SampleError if none is available)."""
    out = dict(sample)
    width = sample["image"].shape[-2]
    out["image"] = sample["image"][..., ::-1, :].copy()
    for key in ("mask", "regions"):
        if key in sample:
            out[key] = sample[key][..., ::-1].copy()
    out["landmarks"] = _mirror_points(sample["landmarks"], width, IBUG_MIRROR_68)
    out["landmarks_conf"] = sample["landmarks_conf"][..., IBUG_MIRROR_68].copy()
    if "dense_landmarks" in sample:
        dense_perm = dense_mirror_permutation() if dense_perm is None else dense_perm
        if dense_perm is None:
            raise SampleError("cannot flip dense landmarks: no mirror permutation (asset mediapipe-canonical)")
        out["dense_landmarks"] = _mirror_points(sample["dense_landmarks"], width, dense_perm)
    return out


def _mirror_points(points: np.ndarray, width: int, perm: np.ndarray) -> np.ndarray:
    mirrored = np.array(points, dtype=np.float32)
    mirrored[..., 0] = width - mirrored[..., 0]
    return mirrored[..., perm, :]


def similarity_matrix(width: int, height: int, angle_deg: float = 0.0, scale: float = 1.0,
                      shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """(2,3) float64 map of continuous pixel coordinates: rotate by `angle_deg` (counter-clockwise
    on screen) and scale about the image centre, then move by `shift` (fractions of W and H)."""
    angle = np.deg2rad(angle_deg)
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    linear = np.array([[cos, sin], [-sin, cos]])  # y points down, so this turns counter-clockwise
    centre = np.array([width / 2.0, height / 2.0])
    target = centre + np.array(shift) * (width, height)
    return np.hstack([linear, (target - linear @ centre)[:, None]])


def warp_affine(sample: dict, matrix: np.ndarray, size: tuple[int, int] | None = None) -> dict:
    """Apply a (2,3) map of continuous pixel coordinates to a raw sample: image bilinear (border
    reflected), mask and regions nearest (border 0), landmarks and dense landmarks moved by the
    same map. size: output (width, height), default the input's."""
    height, width = sample["image"].shape[-3:-1]
    size = (width, height) if size is None else tuple(size)
    matrix = np.asarray(matrix, np.float64)
    # OpenCV puts pixel centres on integers: shift by half a pixel on both sides.
    opencv = matrix.copy()
    opencv[:, 2] += matrix[:, :2] @ (0.5, 0.5) - 0.5
    out = dict(sample)
    out["image"] = _per_frame(sample["image"], 3, lambda frame: cv2.warpAffine(
        frame, opencv, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101))
    for key in ("mask", "regions"):
        if key in sample:
            out[key] = _per_frame(sample[key], 2, lambda frame: cv2.warpAffine(
                frame, opencv, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    for key in ("landmarks", "dense_landmarks"):
        if key in sample:
            points = np.asarray(sample[key], np.float64)
            out[key] = (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)
    return out


def resize(sample: dict, size: int | tuple[int, int]) -> dict:
    """Resize a raw sample to `size` (square side, or (width, height)): image with area averaging
    when shrinking (bilinear when growing), mask and regions nearest, landmarks scaled."""
    width, height = (size, size) if isinstance(size, int) else size
    in_height, in_width = sample["image"].shape[-3:-1]
    if (in_width, in_height) == (width, height):
        return sample
    shrink = width * height < in_width * in_height
    out = dict(sample)
    out["image"] = _per_frame(sample["image"], 3, lambda frame: cv2.resize(
        frame, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR))
    for key in ("mask", "regions"):
        if key in sample:
            out[key] = _per_frame(sample[key], 2, lambda frame: cv2.resize(
                frame, (width, height), interpolation=cv2.INTER_NEAREST))
    factor = np.array([width / in_width, height / in_height], np.float32)
    for key in ("landmarks", "dense_landmarks"):
        if key in sample:
            out[key] = (sample[key] * factor).astype(np.float32)
    return out


def jitter_colour(sample: dict, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0) -> dict:
    """Scale brightness, then contrast about each frame's mean grey, then saturation about each
    pixel's grey (factors 1 = unchanged); image only.

    The three compose into one affine colour map per frame, out = c s b x + c (1 - s) b grey(x)
    + (1 - c) m with m the frame's mean grey after brightness, applied in a single pass that
    rounds and saturates to uint8 (``cv2.transform``)."""
    if brightness == contrast == saturation == 1.0:
        return sample

    def apply(frame: np.ndarray) -> np.ndarray:
        mean_grey = brightness * float(np.dot(cv2.mean(frame)[:3], GREY_WEIGHTS))
        matrix = np.empty((3, 4), np.float64)
        matrix[:, :3] = contrast * brightness * (saturation * np.eye(3) + (1 - saturation) * GREY_WEIGHTS[None])
        matrix[:, 3] = (1 - contrast) * mean_grey
        return cv2.transform(frame, matrix)

    return {**sample, "image": _per_frame(sample["image"], 3, apply)}


GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def _per_frame(array: np.ndarray, frame_dims: int, apply) -> np.ndarray:
    if array.ndim == frame_dims:
        return apply(np.ascontiguousarray(array))
    return np.stack([apply(np.ascontiguousarray(frame)) for frame in array])


class Augmenter:
    """Random augmentation of raw samples: resize to `image_size` (if set), then, per the
    config, a flip (probability 1/2), a similarity warp and colour jitter, all drawn from the
    Generator passed in, so the result is fixed by its state. Call as ``augmenter(sample, rng)``."""

    def __init__(self, config: AugmentConfig | None = None, image_size: int | None = None):
        self.config = config or AugmentConfig()
        self.image_size = image_size

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        config = self.config
        if self.image_size is not None:
            sample = resize(sample, self.image_size)
        if has_ground_truth(sample) and not config.ground_truth:
            return sample
        if config.flip and rng.random() < 0.5:
            if "dense_landmarks" not in sample or dense_mirror_permutation() is not None:
                sample = hflip(sample)
        if config.warps:
            height, width = sample["image"].shape[-3:-1]
            matrix = similarity_matrix(
                width, height,
                angle_deg=rng.uniform(-config.max_rotation_deg, config.max_rotation_deg),
                scale=1.0 + rng.uniform(-config.max_scale, config.max_scale),
                shift=tuple(rng.uniform(-config.max_shift, config.max_shift, size=2)))
            sample = warp_affine(sample, matrix)
        if config.color_jitter:
            low, high = 1.0 - config.color_jitter, 1.0 + config.color_jitter
            sample = jitter_colour(sample, *rng.uniform(low, high, size=3))
        return sample
