"""Synthetic corpus: render the face model with sampled parameters and exact ground truth.

    facelab data synth --out DIR --n N [--mode images|clips|identities] [--preset inversefacenet]

Each sample draws identity (shape), albedo, expression, pose, camera, SH light, specular and a
background from the distributions of a :class:`SynthConfig` (a preset plus overrides), renders the
face model into an aligned crop and writes it with its ground truth (schema in
:mod:`facelab.data.schema`): ``params`` (names in ``PARAM_DOC``), ``verts`` (model space, shape +
expression, before pose), the 68 and 478 landmarks (the landmark vertices projected through the
stored camera, pixel centres at +0.5), ``mask`` (the rendered coverage of the face skin) and
``regions`` (the rendered label of every pixel).

Modes: ``images`` (independent samples); ``clips`` (K frames: identity, albedo, camera,
specular and background fixed; pose, expression, light and framing move linearly from one
draw towards a second by the ``clip_*_motion`` fractions); ``identities`` (K photos of one person:
identity and albedo fixed, everything else drawn anew). ``--n`` counts samples (groups in the
group modes).

Choices made here (the design leaves them open):

- Framing (``framing``): ``template`` (the default) places each face as
  :class:`facelab.data.detect.FacePreprocessor` aligns a photo: its five alignment points
  (:func:`facelab.data.detect.alignment_points` of the projected dense landmarks) fall on
  ``TEMPLATE_5`` scaled by ``template_scale`` about its centroid and shifted by ``face_offset``.
  The image-plane rotation that FacePreprocessor would also remove is left in: the drawn head roll
  stands in for a rotation jitter. ``box`` (the InverseFaceNet preset) centres the 68-landmark box
  (plus ``face_offset``) and scales its longer side to ``face_size`` of the image. Either way only
  the camera translation is solved, for each frame, so the face moves smoothly in clips.
- Light lives in camera space (normals are rotated with the head), as InverseFaceNet's spec asks.
- The eye openings and the mouth gap of the ICT face region are closed by fans from their rim
  loops (eyes: dark iris to pale rim; mouth: dark cavity). ``fill_holes=False`` (the
  InverseFaceNet preset) still rasterizes them for the region map but leaves them transparent,
  so the background shows, as in the paper's masked renders.
- Region labels come from the model's disjoint vertex regions by majority vote per triangle:
  skin and nostrils -> skin, brows -> brows, eyes (+ eye fans) -> eyes, lips -> lips, inner_mouth
  (+ mouth fan) -> mouth_interior, read at each pixel centre from the visible triangle.
  ``mask`` = skin + lips (the schema's "face skin": eyes, brows and mouth interior excluded) of
  the final label map, from the hard (not antialiased) coverage, as ``detect.skin_mask``.
- Mouth interior (``mouth_label``): ``projected`` (the default) labels it as
  :func:`facelab.data.detect.draw_regions` does on photos: the whole 2D projection of the
  inner-lip fan (the rim polygon), drawn over lips and skin whatever hides what (brows and eyes
  stay on top, as there), and nothing else: the mesh's lip triangles on the inner rim that vote
  inner_mouth become lips. Methods compare their own, depth-free projection of that fan with it.
  ``visible`` keeps the depth-tested labels above (corpora written before this setting). The
  colour image is the same either way.
- Landmarks keep their projected positions when self-occluded (exact ground truth) with
  confidence 1; their indices go to ``meta["landmarks_occluded"]`` (a depth test against the
  render) and ``occluded_landmark_conf`` lowers their confidence if wanted.
- Colours: per-vertex SH diffuse + Blinn-Phong (Gouraud), gamma 2.2 at the vertices, interpolated
  across triangles in screen space, then silhouette antialiasing; within ~0.3 grey levels on
  average of ``MeshRenderer(shading="vertex")`` (tested). Albedo is clamped to [0, 1]. Specular
  uses the grey mean of the model's specular albedo times ``specular_scale``.
- Determinism: parameters and backgrounds come from generators seeded by (seed, chunk of 64
  frames), so the parameters do not depend on ``batch_size`` and nothing depends on ``workers``
  (renders match across batch sizes up to float rounding); the held-out benchmark uses its own
  fixed seed (``ensure_corpus``).
- Speed: rendering runs without gradients on ``facelab.render``'s visibility and antialias
  primitives, with a compiled (numba) per-pixel interpolation; chunks render on one thread each
  (torch intra-op threads set to 1 while writing) while a writer thread encodes PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from facelab.render.camera import PerspectiveCamera, euler_to_matrix, ndc_to_pixels, perspective
from facelab.render.lighting import DEFAULT_SH_DC, sh_from_directional, sh_irradiance
from facelab.render.rasterize import antialias, visible_triangles
from facelab.render.renderer import vertex_normals
from facelab.render.shading import blinn_phong, gamma_encode

from .detect import TEMPLATE_5, alignment_points
from .schema import REGION_LABELS
from .shards import INDEX, ShardWriter, read_index

MODES = ("images", "clips", "identities")
CHUNK = 64  # frames per RNG chunk (whole samples): results do not depend on batch size or workers
GAMMA = 2.2
ZNEAR, ZFAR = 10.0, 10000.0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_LABELS = ("skin", "lips")
MOUTH_LABELS = ("projected", "visible")  # SynthConfig.mouth_label, see the module docstring
#: labels that draw_regions paints after the mouth interior, so a projected mouth leaves them be
OVER_MOUTH_LABELS = ("brows", "eyes")
#: face-model region -> REGION_LABELS name (disjoint regions only; nose and jaw_contour overlap them)
REGION_MAP = {"skin": "skin", "nostrils": "skin", "brows": "brows", "eyes": "eyes", "lips": "lips",
              "inner_mouth": "mouth_interior"}
PARAM_DOC = {
    "shape": "(K_id,) identity codes, N(0,1) units",
    "expression": "(E,) blendshape weights (>= 0) or PCA codes, per index info expression_space",
    "albedo": "(A,) albedo codes, N(0,1) units (diffuse and specular bases)",
    "rotation": "(3,) radians (pitch, yaw, roll), R = Rz Ry Rx, model -> camera",
    "translation": "(3,) mm, camera-space position of the model origin (OpenGL camera, z < 0)",
    "focal": "(1,) pixels", "principal": "(2,) pixels (cx, cy)",
    "sh": "(3,9) camera-space SH radiance coefficients (facelab.render.lighting), linear RGB",
    "specular_scale": "(1,) multiplier of the model's specular albedo (0 = no highlight)",
    "shininess": "(1,) Blinn-Phong exponent",
    "light_position": "(3,) mm, camera space, the point light of the highlight",
}


def _alignment_map() -> tuple[np.ndarray, torch.Tensor]:
    """detect.alignment_points as a linear map, so that synthetic and real crops share one
    definition of the five points: the dense landmark ids it reads (M,) and weights (5,M) taking
    those points, once projected, to the five (means of eye rings, single points otherwise)."""
    from facelab.facemodel.mediapipe import NUM_DENSE

    weights = alignment_points(np.eye(NUM_DENSE))  # (5,478): it averages and picks, a linear map
    used = np.flatnonzero(np.abs(weights).sum(0))
    return used, torch.as_tensor(weights[:, used], dtype=torch.float32)


ALIGNMENT_DENSE, ALIGNMENT_WEIGHTS = _alignment_map()


@dataclass
class SynthConfig:
    """Generator settings. Ranges are (low, high) of uniform draws; angles in degrees.

    Built by :meth:`from_preset` (``PRESETS``) with overrides; every field is listed here."""

    preset: str = "default"
    face_model: str = "ict-face-lite"
    expression_space: str = "blendshape"  # the face model's expression space: blendshape | pca
    image_size: int = 224
    shape_std: float = 1.0
    shape_clip: float | None = 3.0  # |code| bound (None: unbounded)
    albedo_std: float = 1.0
    albedo_clip: float | None = 3.0
    expression: str = "sparse"  # sparse (blendshapes) | uniform | normal
    expression_active: float = 0.1  # sparse: probability that a shape is active
    expression_max: float = 0.8  # sparse: active weights ~ U(0, max)
    expression_symmetric: float = 0.5  # sparse: probability that a *_R shape copies its *_L twin
    expression_range: tuple = (-3.0, 3.0)  # uniform: per code
    expression_shift: float = 0.0  # uniform/normal: added to code 0, signed so that + opens the jaw
    expression_std: float = 1.0  # normal
    pitch_deg: tuple = (-20.0, 20.0)
    yaw_deg: tuple = (-45.0, 45.0)
    roll_deg: tuple = (-15.0, 15.0)
    fov_deg: tuple = (8.0, 20.0)  # vertical field of view
    framing: str = "template"  # template (five points on detect.TEMPLATE_5, as real crops) | box
    template_scale: tuple = (0.95, 1.05)  # template framing: scale of the template about its centroid
    face_size: tuple = (0.55, 0.7)  # box framing: longer side of the 68-landmark box / image size
    face_offset: float = 0.04  # shift of the template / box centre, fraction of the image size (uniform +-)
    light: str = "directional"  # directional (ambient + one light + noise) | sh_uniform
    ambient: tuple = (0.4, 1.0)  # directional: irradiance of the ambient term
    directional: tuple = (0.0, 0.8)  # directional: irradiance of the light facing it
    light_azimuth_deg: tuple = (-70.0, 70.0)  # camera space, 0 = from the camera
    light_elevation_deg: tuple = (-20.0, 60.0)
    light_color: float = 0.06  # directional: per-channel gains U(1 - c, 1 + c)
    sh_noise: float = 0.03  # directional: N(0, sh_noise) on every coefficient (grey)
    sh_dc: tuple = (0.6, 1.2)  # sh_uniform: DC coefficient
    sh_band: float = 0.2  # sh_uniform: coefficients 1..8 ~ U(-b, b)
    sh_monochrome: bool = True  # sh_uniform: one value per coefficient for R, G, B
    specular: tuple = (0.0, 1.5)  # specular_scale
    shininess: tuple = (5.0, 60.0)  # log-uniform
    light_distance_mm: float = 1000.0
    background: str = "procedural"  # procedural | black | photos (needs backgrounds=DIR)
    fill_holes: bool = True
    antialias: bool = True
    mouth_label: str = "projected"  # projected (the inner-lip fan's 2D projection, as detect.draw_regions) | visible
    occluded_landmark_conf: float = 1.0
    clip_pose_motion: float = 0.25  # clips: fraction of the way to a second draw over the clip
    clip_expression_motion: float = 1.0
    clip_light_motion: float = 0.3
    clip_framing_motion: float = 0.3

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides) -> "SynthConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown synth preset {preset!r}; valid: {', '.join(PRESETS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown synth setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        values = {**PRESETS[preset], **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}}
        config = cls(preset=preset, **values)
        config.validate()
        return config

    def validate(self) -> None:
        choices = {"expression": ("sparse", "uniform", "normal"), "light": ("directional", "sh_uniform"),
                   "background": ("procedural", "black", "photos"), "expression_space": ("blendshape", "pca"),
                   "framing": ("template", "box"), "mouth_label": MOUTH_LABELS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise ValueError(f"synth {name}={getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.expression == "sparse" and self.expression_space != "blendshape":
            raise ValueError("expression='sparse' draws blendshape weights; use expression_space='blendshape'")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(item.default, tuple) and (not isinstance(value, tuple) or len(value) != 2
                                                    or not value[0] <= value[1]):
                raise ValueError(f"synth {item.name}={value!r}: expected a range [low, high] with low <= high")
        if min(self.shininess) <= 0 or min(self.face_size) <= 0 or min(self.template_scale) <= 0:
            raise ValueError("synth shininess, face_size and template_scale must be positive")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict] = {
    "default": {},
    # InverseFaceNet's initial corpus (spec sections 3 and 10): yaw/pitch U(+-40), roll U(+-15),
    # shape and albedo N(0,1), expression uniform per PCA code, light DC U(0.6,1.2) and the other
    # coefficients U(+-0.2), monochrome, Lambertian, a black background showing through the mouth
    # gap and the eyes, no anti-aliasing, the landmark box filling the crop (box framing, the spec's
    # crop normalisation for real and synthetic images alike). Expression range: the
    # spec's +-3 (for a true-sigma basis) tears ICT's lips through negative blendshape weights, so
    # +-1.5; the shift on code 0 is the paper's 4.8/12 of the range, towards an open jaw.
    "inversefacenet": dict(
        expression_space="pca", expression="uniform", expression_range=(-1.5, 1.5), expression_shift=0.6,
        shape_clip=None, albedo_clip=None, pitch_deg=(-40.0, 40.0), yaw_deg=(-40.0, 40.0),
        roll_deg=(-15.0, 15.0), fov_deg=(12.0, 12.0), framing="box", face_size=(0.9, 0.9), face_offset=0.0,
        light="sh_uniform", sh_dc=(0.6, 1.2), sh_band=0.2, sh_monochrome=True, specular=(0.0, 0.0),
        background="black", fill_holes=False, antialias=False),
}


# --- parameters -----------------------------------------------------------------------------------


def generator_for(seed: int, chunk: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from (seed, chunk, stream) through numpy's SeedSequence."""
    entropy = [int(seed) & 0xFFFFFFFF, int(seed) >> 32, chunk, stream]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _uniform(gen: torch.Generator, shape, bounds) -> torch.Tensor:
    low, high = (float(b) for b in bounds)
    return low + (high - low) * torch.rand(shape, generator=gen)


def _normal(gen: torch.Generator, shape, std: float, clip: float | None) -> torch.Tensor:
    values = std * torch.randn(shape, generator=gen)
    return values if clip is None else values.clamp(-clip, clip)


def sample_parameters(face_model, cfg: SynthConfig, gen: torch.Generator, n: int, mode: str = "images",
                      group_size: int = 1) -> dict[str, torch.Tensor]:
    """Draw n samples' parameters (groups of K = group_size frames in the group modes).

    Returns name -> (n*K, ...) float32 tensors, group-major (see ``PARAM_DOC``); the camera
    translation is solved so that each frame is framed like an aligned crop."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; valid: {', '.join(MODES)}")
    frames = 1 if mode == "images" else group_size
    per_group = lambda draw: {k: v.repeat_interleave(frames, 0) for k, v in draw.items()}  # noqa: E731
    latents = per_group({"shape": _normal(gen, (n, face_model.num_shape), cfg.shape_std, cfg.shape_clip),
                         "albedo": _normal(gen, (n, face_model.num_albedo), cfg.albedo_std, cfg.albedo_clip)})
    if mode == "clips":
        latents.update(per_group(_draw_scene(cfg, gen, n)))
        start, end = _draw_motion(face_model, cfg, gen, n), _draw_motion(face_model, cfg, gen, n)
        progress = torch.linspace(0.0, 1.0, frames).repeat(n)
        for name, value in start.items():
            motion = _clip_motion(cfg, name)
            step = (progress * motion).reshape(-1, *[1] * (value.dim() - 1))
            a, b = value.repeat_interleave(frames, 0), end[name].repeat_interleave(frames, 0)
            latents[name] = a + step * (b - a)
    else:
        latents.update(_draw_scene(cfg, gen, n * frames))
        latents.update(_draw_motion(face_model, cfg, gen, n * frames))
    return _finalize(face_model, cfg, latents)


def _clip_motion(cfg: SynthConfig, name: str) -> float:
    if name == "expression":
        return cfg.clip_expression_motion
    if name in ("rotation",):
        return cfg.clip_pose_motion
    if name in ("framing_scale", "framing_offset"):
        return cfg.clip_framing_motion
    return cfg.clip_light_motion


def _draw_scene(cfg: SynthConfig, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """What stays fixed within a clip: the camera's field of view and the highlight's material."""
    log_shininess = _uniform(gen, (n, 1), [math.log(s) for s in cfg.shininess])
    return {"fov": _uniform(gen, (n,), cfg.fov_deg), "specular_scale": _uniform(gen, (n, 1), cfg.specular),
            "shininess": log_shininess.exp()}


def _draw_motion(face_model, cfg: SynthConfig, gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """What moves within a clip: pose, expression, light and framing."""
    degrees = torch.stack([_uniform(gen, (n,), cfg.pitch_deg), _uniform(gen, (n,), cfg.yaw_deg),
                           _uniform(gen, (n,), cfg.roll_deg)], dim=1)
    out = {"rotation": torch.deg2rad(degrees), "expression": _draw_expression(face_model, cfg, gen, n),
           # one draw whichever the framing: box-framed corpora keep the parameters they had
           "framing_scale": _uniform(gen, (n,), cfg.face_size if cfg.framing == "box" else cfg.template_scale),
           "framing_offset": _uniform(gen, (n, 2), (-cfg.face_offset, cfg.face_offset))}
    if cfg.light == "sh_uniform":
        channels = 1 if cfg.sh_monochrome else 3
        sh = _uniform(gen, (n, channels, 9), (-cfg.sh_band, cfg.sh_band))
        sh[:, :, 0] = _uniform(gen, (n, channels), cfg.sh_dc)
        out["sh"] = sh.expand(n, 3, 9).contiguous()
    else:
        azimuth = torch.deg2rad(_uniform(gen, (n,), cfg.light_azimuth_deg))
        elevation = torch.deg2rad(_uniform(gen, (n,), cfg.light_elevation_deg))
        out["light_direction"] = torch.stack([azimuth.sin() * elevation.cos(), elevation.sin(),
                                              azimuth.cos() * elevation.cos()], dim=1)
        out["ambient"] = _uniform(gen, (n, 1), cfg.ambient)
        out["directional"] = _uniform(gen, (n, 1), cfg.directional)
        out["light_gain"] = _uniform(gen, (n, 3), (1 - cfg.light_color, 1 + cfg.light_color))
        out["sh_noise"] = (cfg.sh_noise * torch.randn(n, 1, 9, generator=gen)).expand(n, 3, 9)
    return out


def _draw_expression(face_model, cfg: SynthConfig, gen: torch.Generator, n: int) -> torch.Tensor:
    count = face_model.num_expression
    if cfg.expression == "sparse":
        active = torch.rand(n, count, generator=gen) < cfg.expression_active
        weights = cfg.expression_max * torch.rand(n, count, generator=gen) * active
        left, right = _symmetric_pairs(face_model.expression_names)
        copy = torch.rand(n, len(left), generator=gen) < cfg.expression_symmetric
        weights[:, right] = torch.where(copy, weights[:, left], weights[:, right])
        return weights
    if cfg.expression == "uniform":
        codes = _uniform(gen, (n, count), cfg.expression_range)
    else:
        codes = cfg.expression_std * torch.randn(n, count, generator=gen)
    codes[:, 0] += cfg.expression_shift * _jaw_sign(face_model)
    return codes


def _symmetric_pairs(names: list[str]) -> tuple[list[int], list[int]]:
    left = [i for i, name in enumerate(names) if name.endswith("_L") and name[:-2] + "_R" in names]
    return left, [names.index(names[i][:-2] + "_R") for i in left]


def _jaw_sign(face_model) -> float:
    """+1 when a positive first expression code opens the jaw (the direction of the shift)."""
    if face_model.expression_space != "pca" or "jawOpen" not in face_model.expression_names:
        return 1.0
    weight = face_model.blendshape_from_pca[face_model.expression_names.index("jawOpen"), 0]
    return 1.0 if float(weight) >= 0 else -1.0


def _finalize(face_model, cfg: SynthConfig, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Latent draws -> stored parameters: focal from the field of view, the translation that
    frames the face, SH coefficients and the highlight's light position."""
    size = cfg.image_size
    count = latents["shape"].shape[0]
    focal = (0.5 * size) / torch.tan(torch.deg2rad(latents["fov"]) / 2)
    principal = torch.full((count, 2), 0.5 * size)
    rotation = latents["rotation"]
    translation = _framing_translation(face_model, cfg, latents, focal, principal)
    if "sh" in latents:
        sh = latents["sh"]
        linear = sh.mean(1)[:, [3, 1, 2]]  # the x, y, z band-1 terms: the light's dominant direction
        direction = torch.where(linear.norm(dim=1, keepdim=True) > 1e-6, linear, linear.new_tensor([0.0, 0.0, 1.0]))
    else:
        direction, gain = latents["light_direction"], latents["light_gain"]
        sh = sh_from_directional(direction, latents["directional"] * gain) + latents["sh_noise"]
        sh[:, :, 0] += latents["ambient"] * gain * DEFAULT_SH_DC
    direction = direction / direction.norm(dim=1, keepdim=True)
    params = {"shape": latents["shape"], "expression": latents["expression"], "albedo": latents["albedo"],
              "rotation": rotation, "translation": translation, "focal": focal[:, None], "principal": principal,
              "sh": sh, "specular_scale": latents["specular_scale"], "shininess": latents["shininess"],
              "light_position": translation + cfg.light_distance_mm * direction}
    return {name: value.float().contiguous() for name, value in params.items()}


def _framing_translation(face_model, cfg: SynthConfig, latents: dict[str, torch.Tensor], focal: torch.Tensor,
                         principal: torch.Tensor) -> torch.Tensor:
    """The camera translation (B,3) that frames each face by ``cfg.framing``, moved by the
    ``framing_scale`` and ``framing_offset`` latents."""
    size, rotation = cfg.image_size, euler_to_matrix(latents["rotation"])
    device = face_model.mean.device
    with torch.no_grad():
        verts = face_model(latents["shape"].to(device), latents["expression"].to(device))
        if cfg.framing == "box":
            points = face_model.landmarks(verts).cpu()
        else:
            points = face_model.dense_landmarks(verts)[:, ALIGNMENT_DENSE].cpu()
    shift, scale = latents["framing_offset"] * size, latents["framing_scale"]
    if cfg.framing == "box":
        return frame_faces(points, rotation, focal, principal, principal + shift, scale * size)
    template = torch.as_tensor(TEMPLATE_5, dtype=torch.float32) * size  # (5,2)
    centroid = template.mean(0)
    target = centroid + scale[:, None, None] * (template - centroid) + shift[:, None]
    return align_faces(points, rotation, focal, principal, target)


def frame_faces(landmarks: torch.Tensor, rotation: torch.Tensor, focal: torch.Tensor, principal: torch.Tensor,
                target: torch.Tensor, box_size: torch.Tensor, iterations: int = 4) -> torch.Tensor:
    """The camera translation (B,3) mm that puts the projected landmark box's centre at `target`
    (B,2) px with its longer side `box_size` (B,) px. landmarks: (B,L,3) model space; rotation
    (B,3,3); focal (B,); principal (B,2). A fixed-point iteration on distance and centre."""
    rotated = torch.einsum("bij,blj->bli", rotation, landmarks)
    low, high = rotated[..., :2].amin(1), rotated[..., :2].amax(1)

    def measure(pixels: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        box_low, box_high = pixels.amin(1), pixels.amax(1)
        return depth * (box_high - box_low).amax(-1) / box_size, 0.5 * (box_low + box_high)

    depth = focal * (high - low).amax(-1) / box_size
    return _place(landmarks, rotation, focal, principal, target, depth, 0.5 * (low + high),
                  rotated[..., 2].mean(1), measure, iterations)


def align_faces(points: torch.Tensor, rotation: torch.Tensor, focal: torch.Tensor, principal: torch.Tensor,
                target: torch.Tensor, iterations: int = 4) -> torch.Tensor:
    """The camera translation (B,3) mm that aligns the face's five alignment points to `target`
    (B,5,2) px as FacePreprocessor's similarity would, except for its rotation (the head's roll is
    kept): their centroid lands on the target's and the least-squares similarity from them to the
    target has scale 1. points: (B,M,3) model space, the dense landmarks ``ALIGNMENT_DENSE``;
    rotation (B,3,3); focal (B,); principal (B,2). The fixed-point iteration of
    :func:`frame_faces`, started from the orthographic solution."""
    weights = ALIGNMENT_WEIGHTS.to(points)
    rotated = torch.einsum("km,bmd->bkd", weights, torch.einsum("bij,bmj->bmi", rotation, points))

    def measure(pixels: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        five = torch.einsum("km,bmd->bkd", weights, pixels)
        return depth / _similarity_scale(five, target), five.mean(1)

    flip = torch.tensor([1.0, -1.0])  # image y points down, camera y up
    depth = focal / _similarity_scale(rotated[..., :2] * flip, target)  # the projection's scale is focal / depth
    return _place(points, rotation, focal, principal, target.mean(1), depth, rotated[..., :2].mean(1),
                  rotated[..., 2].mean(1), measure, iterations)


def _place(points: torch.Tensor, rotation: torch.Tensor, focal: torch.Tensor, principal: torch.Tensor,
           goal: torch.Tensor, depth: torch.Tensor, centre: torch.Tensor, mean_z: torch.Tensor,
           measure, iterations: int) -> torch.Tensor:
    """The fixed-point iteration behind frame_faces and align_faces: the translation (B,3) that
    puts the rotated points' reference `centre` (B,2, model xy) at pixel `goal` (B,2) at distance
    `depth` (B,) mm from the camera (`mean_z` (B,): their mean rotated z); after each projection,
    measure(pixels, depth) gives the distance rescaled by projected over wanted size (B,) and the
    projected centre (B,2), which moves the aim."""
    flip = torch.tensor([1.0, -1.0])  # image y points down, camera y up

    def translation(aim: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        offset = (aim - principal) * flip * (depth / focal)[:, None]
        return torch.cat([offset - centre, -(depth + mean_z)[:, None]], dim=1)

    aim = goal.clone()
    for _ in range(iterations):
        pixels, _ = perspective(points, rotation, translation(aim, depth), focal, principal)
        depth, projected = measure(pixels, depth)
        aim = aim + goal - projected
    return translation(aim, depth)


def _similarity_scale(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) the scale of the least-squares similarity (detect.fit_similarity) taking source (B,N,2)
    to target (B,N,2)."""
    z, w = source - source.mean(1, keepdim=True), target - target.mean(1, keepdim=True)
    real = (w * z).sum((1, 2))
    imaginary = (w[..., 1] * z[..., 0] - w[..., 0] * z[..., 1]).sum(1)
    return torch.hypot(real, imaginary) / z.square().sum((1, 2))


# --- backgrounds ----------------------------------------------------------------------------------


def sample_backgrounds(gen: torch.Generator, n: int) -> dict[str, torch.Tensor]:
    """Latent draws of n backgrounds, the same whichever kind is rendered (so switching kinds
    never changes the faces): a two-colour gradient, two octaves of smooth noise, a photo crop."""
    grey = 0.05 + 0.9 * torch.rand(n, 2, 1, generator=gen)  # mostly grey tones, mildly coloured
    colours = grey + 0.25 * (torch.rand(n, 2, 3, generator=gen) - 0.5)
    coarse = 0.12 * torch.randn(n, 1, 4, 4, generator=gen) + 0.04 * torch.randn(n, 3, 4, 4, generator=gen)
    fine = 0.04 * torch.randn(n, 1, 16, 16, generator=gen) + 0.015 * torch.randn(n, 3, 16, 16, generator=gen)
    return {"colours": colours, "angle": 2 * math.pi * torch.rand(n, generator=gen), "coarse": coarse,
            "fine": fine, "photo": torch.rand(n, 4, generator=gen)}


def procedural_backgrounds(latents: dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """(n,H,W,3) float32 display colour (a channels-last view, values may leave [0,1] slightly:
    the composite clamps) from :func:`sample_backgrounds` latents. Written to touch each pixel
    twice: full-size passes dominate the cost on a CPU."""
    n = latents["angle"].shape[0]
    fine = latents["fine"].shape[-1]
    noise = latents["fine"] + F.interpolate(latents["coarse"], size=(fine, fine), mode="bicubic", align_corners=False)
    upsample = _upsampling_matrix(fine, size)  # bicubic, separable: rows then columns
    rows = torch.matmul(upsample, noise).reshape(n * 3, size, fine)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    cos, sin = latents["angle"].cos(), latents["angle"].sin()
    ramp = (cos[:, None, None] * grid[None, None, :] + sin[:, None, None] * grid[None, :, None]) / math.sqrt(2) + 0.5
    c0, c1 = latents["colours"][:, 0], latents["colours"][:, 1]
    image = torch.addcmul(c0[:, :, None, None], (c1 - c0)[:, :, None, None], ramp[:, None])  # (n,3,H,W)
    image = torch.baddbmm(image.reshape(n * 3, size, size), rows, upsample.T.expand(n * 3, -1, -1))
    return image.reshape(n, 3, size, size).permute(0, 2, 3, 1)


def _upsampling_matrix(cells: int, size: int) -> torch.Tensor:
    """(size, cells): bicubic interpolation weights of F.interpolate (align_corners=False)."""
    basis = torch.eye(cells).reshape(cells, 1, cells, 1)
    return F.interpolate(basis, size=(size, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T


class PhotoBackgrounds:
    """Random square crops of the photos in a folder, resized to the image size."""

    def __init__(self, folder: str | Path, size: int, cache: int = 32):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"backgrounds folder {self.folder} does not exist")
        self.files = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise FileNotFoundError(f"backgrounds folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.size, self.cache_size, self._cache, self._lock = size, cache, {}, threading.Lock()

    def crops(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        """(n,H,W,3) float32 in [0,1] from the ``photo`` latents (file, crop scale, x, y)."""
        out = []
        for pick, scale, x, y in latents["photo"].tolist():
            image = self._load(self.files[min(int(pick * len(self.files)), len(self.files) - 1)])
            side = min(image.size) * (0.3 + 0.7 * scale)
            left, top = (image.size[0] - side) * x, (image.size[1] - side) * y
            crop = image.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + side, top + side))
            out.append(np.asarray(crop, dtype=np.float32) / 255.0)
        return torch.from_numpy(np.stack(out))

    def _load(self, path: Path) -> Image.Image:
        with self._lock:  # render threads share the cache
            if path not in self._cache:
                if len(self._cache) >= self.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                try:
                    with Image.open(path) as image:
                        self._cache[path] = image.convert("RGB")
                except OSError as error:
                    raise ValueError(f"background {path}: cannot be read as an image ({error})") from error
            return self._cache[path]


# --- rendering ------------------------------------------------------------------------------------


@dataclass
class _Fan:
    """A triangle fan closing a hole of the mesh: rim vertex ids, the centre pushed in by `inward_mm`."""

    rim: np.ndarray
    label: str
    inward_mm: float
    rim_albedo: tuple
    centre_albedo: tuple
    specular: float


def hole_fans(face_model) -> list[_Fan]:
    """Fans for the mouth gap (``mouth_loop``) and the eye openings (boundary loops whose centre
    lies near the eye landmarks); none for a model without them."""
    from facelab.facemodel.geometry import boundary_loops

    fans = []
    mean = face_model.mean.cpu().numpy()
    if hasattr(face_model, "mouth_loop"):
        fans.append(_Fan(face_model.mouth_loop.cpu().numpy(), "mouth_interior", 8.0, (0.22, 0.07, 0.07),
                         (0.03, 0.01, 0.01), 0.0))
    landmarks = mean[face_model.landmarks_68.cpu().numpy()]
    eyes = [landmarks[36:42].mean(0), landmarks[42:48].mean(0)]
    mouth = set(fans[0].rim.tolist()) if fans else set()
    for loop in boundary_loops(face_model.triangles.cpu().numpy()):
        centre = mean[loop].mean(0)
        if set(loop.tolist()) != mouth and min(np.linalg.norm(centre - eye) for eye in eyes) < 12.0:
            fans.append(_Fan(loop, "eyes", 2.0, (0.55, 0.5, 0.45), (0.05, 0.035, 0.03), 0.4))
    return fans


def _fan_topology(face_model, fans: list[_Fan]):
    """Triangles (F,3) over the fan vertices appended after the mesh's (rim copies, then the
    centre, fan by fan), their labels (F,) and the fan vertices' albedo (P,3) and specular (P,1)."""
    mean = face_model.mean.cpu().numpy()
    first = face_model.num_vertices
    triangles, labels, albedo, specular = [np.zeros((0, 3), np.int64)], [], [], []
    for fan in fans:
        count = len(fan.rim)
        local = np.arange(count)
        fan_triangles = np.stack([local, np.roll(local, 1), np.full(count, count)], 1)
        corners = np.concatenate([mean[fan.rim], mean[fan.rim].mean(0, keepdims=True)])[fan_triangles]
        if np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])[:, 2].sum() < 0:
            fan_triangles = fan_triangles[:, [0, 2, 1]]  # face the viewer (+z), and so do its normals
        triangles.append(first + fan_triangles)
        labels += [REGION_LABELS[fan.label]] * count
        albedo += [fan.rim_albedo] * count + [fan.centre_albedo]
        specular += [[fan.specular]] * (count + 1)
        first += count + 1
    return (np.concatenate(triangles), np.asarray(labels, np.uint8), np.asarray(albedo, np.float32).reshape(-1, 3),
            np.asarray(specular, np.float32).reshape(-1, 1))


class SynthRenderer:
    """Render parameter batches of one face model into raw-sample arrays, without gradients.

    image_size: pixels (square); fill_holes: draw the eye and mouth fans (else they stay
    transparent but keep their region labels); antialias: blend silhouettes
    (``facelab.render.rasterize.antialias``); mouth_label: ``projected`` or ``visible``
    (``SynthConfig.mouth_label``)."""

    def __init__(self, face_model, image_size: int, fill_holes: bool = True, antialias: bool = True,
                 device: str | torch.device = "cpu", mouth_label: str = "projected"):
        if mouth_label not in MOUTH_LABELS:
            raise ValueError(f"mouth_label={mouth_label!r}; valid: {', '.join(MOUTH_LABELS)}")
        self.model = face_model.to(device)
        self.size, self.fill_holes, self.antialias = int(image_size), fill_holes, antialias
        self.mouth_label = mouth_label
        self.device = torch.device(device)
        triangles = face_model.triangles.cpu().numpy()
        self.num_mesh_triangles = len(triangles)
        fans = hole_fans(face_model)
        self._fans = [(torch.as_tensor(fan.rim, device=device), fan.inward_mm) for fan in fans]
        fan_triangles, fan_labels, fan_albedo, fan_specular = _fan_topology(face_model, fans)
        self.triangles = torch.as_tensor(np.concatenate([triangles, fan_triangles]), dtype=torch.long, device=device)
        mesh_labels = _triangle_labels(face_model, triangles)
        mouth = REGION_LABELS["mouth_interior"]
        mouth_fan = np.flatnonzero(fan_labels == mouth)
        if mouth_label == "projected" and len(mouth_fan):
            # the lip surface along the inner rim: outside the inner-lip polygon, so lips on photos
            mesh_labels = np.where(mesh_labels == mouth, REGION_LABELS["lips"], mesh_labels).astype(np.uint8)
        # per-triangle tables, with a last row for background
        labels = np.concatenate([mesh_labels, fan_labels, [REGION_LABELS["background"]]])
        self.labels = torch.as_tensor(labels, dtype=torch.uint8, device=device)
        self.mouth_triangles = self.triangles[torch.as_tensor(mouth_fan + len(triangles), device=device)]
        label_values = np.arange(len(REGION_LABELS))  # per-label tables, indexed by a label map
        masked = np.isin(label_values, [REGION_LABELS[name] for name in MASK_LABELS])
        self.mask_of_label = torch.as_tensor(masked.astype(np.uint8) * 255, device=device)
        over_mouth = np.isin(label_values, [REGION_LABELS[name] for name in OVER_MOUTH_LABELS])
        self.kept_under_mouth = torch.as_tensor(over_mouth, device=device)
        self.opaque = (torch.arange(len(labels), device=device) < self.num_mesh_triangles).float()
        self.fan_albedo = torch.as_tensor(fan_albedo, dtype=torch.float32, device=device)
        self.fan_specular = torch.as_tensor(fan_specular, dtype=torch.float32, device=device)

    def vertices(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Model-space vertices (B,V,3) mm: shape + expression, before pose."""
        return self.model(params["shape"], params["expression"])

    def camera(self, params: dict[str, torch.Tensor]) -> PerspectiveCamera:
        return PerspectiveCamera(euler_to_matrix(params["rotation"]), params["translation"], params["focal"][:, 0],
                                 params["principal"], ZNEAR, ZFAR)

    @torch.no_grad()
    def render(self, params: dict[str, torch.Tensor], background: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """params: name -> (B,...) (``PARAM_DOC``); background: (B,H,W,3) display colour or None (black).
        Returns numpy arrays: image (B,H,W,3) uint8, mask (B,H,W) uint8 {0,255}, regions (B,H,W)
        uint8, landmarks (B,68,2), dense_landmarks (B,478,2), landmarks_occluded (B,68) bool,
        verts (B,V,3)."""
        params = {name: value.to(self.device) for name, value in params.items()}
        size, batch = self.size, params["shape"].shape[0]
        verts = self.vertices(params)
        camera = self.camera(params)
        full = torch.cat([verts, *self._fan_vertices(verts)], dim=1)
        clip = camera.to_clip(full, (size, size))
        in_camera = torch.einsum("bij,bvj->bvi", camera.rotation, full) + camera.translation[:, None]
        ids = visible_triangles(clip, self.triangles, size, size, "auto")
        # one flat row per pixel into per-(image, triangle) tables; background -> a last, empty row
        count = self.triangles.shape[0]
        offset = torch.arange(batch, device=self.device)[:, None, None] * count
        rows = torch.where(ids >= 0, ids + offset, batch * count).reshape(-1)
        triangle_rows = torch.where(ids >= 0, ids, count).reshape(-1)
        screen = ndc_to_pixels(clip[..., :2] / clip[..., 3:], (size, size))
        ones = torch.ones_like(clip[..., 3:])
        values = torch.cat([self._vertex_colours(params, in_camera), ones, clip[..., 2:3] / clip[..., 3:]], dim=-1)
        # channels: r, g, b, coverage, z/w, triangle id + 1 (a constant plane, so exact); the last
        # four are laid out as the rasterizer's (u, v, z/w, id + 1) of which antialias reads z and id
        pixels = _interpolate_affine(screen, values, self.triangles, rows, (batch, size, size), with_ids=True)
        stacked, z_ndc = pixels[..., :4], pixels[..., 4]
        if self.antialias:
            stacked = antialias(stacked, pixels[..., 2:6], clip, self.triangles)
        if not self.fill_holes:
            stacked = stacked * self.opaque.index_select(0, triangle_rows).reshape(batch, size, size, 1)
        image = stacked[..., :3]
        if background is not None:
            image = torch.addcmul(image, background.to(self.device), 1 - stacked[..., 3:].clamp(0, 1))
        image = image.mul_(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
        regions = self.labels.index_select(0, triangle_rows).reshape(batch, size, size)
        if self.mouth_label == "projected" and len(self.mouth_triangles):
            regions = self._project_mouth(regions, clip)
        mask = self.mask_of_label[regions.long()]
        landmarks, depth = camera.project(self.model.landmarks(verts))
        dense, _ = camera.project(self.model.dense_landmarks(verts))
        occluded = _occluded(landmarks, depth, z_ndc, ids >= 0)
        out = {"image": image, "mask": mask, "regions": regions, "landmarks": landmarks, "dense_landmarks": dense,
               "landmarks_occluded": occluded, "verts": verts}
        return {name: value.cpu().numpy() for name, value in out.items()}

    def _project_mouth(self, regions: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        """regions (B,H,W) uint8 with every pixel whose centre the mouth fan covers, hidden or
        not, set to mouth_interior, except brows and eyes; clip: (B,V',4) all vertices, fans
        included. The same rasterizer (and pixel-centre rule) as the visible labels."""
        covered = visible_triangles(clip, self.mouth_triangles, self.size, self.size, "auto") >= 0
        covered &= ~self.kept_under_mouth[regions.long()]
        return regions.masked_fill(covered, REGION_LABELS["mouth_interior"])

    def _fan_vertices(self, verts: torch.Tensor) -> list[torch.Tensor]:
        """Each fan's vertices: copies of its rim (own normals, so the mesh's stay untouched) and
        a centre pushed in along -z, model space."""
        out = []
        for rim, inward in self._fans:
            ring = verts[:, rim]
            out += [ring, ring.mean(1, keepdim=True) - verts.new_tensor([0.0, 0.0, inward])]
        return out

    def _vertex_colours(self, params: dict[str, torch.Tensor], in_camera: torch.Tensor) -> torch.Tensor:
        """Display colour per vertex (B,V',3): SH diffuse + Blinn-Phong, gamma-encoded."""
        batch = in_camera.shape[0]
        normals = vertex_normals(in_camera, self.triangles)
        fan_albedo = self.fan_albedo.expand(batch, -1, -1)
        albedo = torch.cat([self.model.albedo(params["albedo"]).clamp(0, 1), fan_albedo], dim=1)
        colour = albedo * sh_irradiance(normals, params["sh"])
        if bool((params["specular_scale"] > 0).any()) and hasattr(self.model, "specular_basis"):
            model_specular = self.model.specular(params["albedo"]).mean(-1, keepdim=True).clamp_min(0)
            specular = torch.cat([model_specular, self.fan_specular.expand(batch, -1, -1)], dim=1)
            colour = colour + blinn_phong(normals, in_camera, view_position=torch.zeros_like(params["light_position"]),
                                          light_position=params["light_position"], shininess=params["shininess"][:, 0],
                                          specular_albedo=specular * params["specular_scale"][:, :, None])
        return gamma_encode(colour, GAMMA)


def _interpolate_affine(screen: torch.Tensor, values: torch.Tensor, triangles: torch.Tensor, rows: torch.Tensor,
                        shape: tuple[int, int, int], with_ids: bool = False) -> torch.Tensor:
    """Per-pixel values (B,H,W,C) of each pixel's triangle, interpolated linearly in screen space
    (exact for z/w; for colours the triangles are small enough that perspective correction does
    not show). screen: (B,V,2) px; values: (B,V,C); rows: (B*H*W,) index b*T + triangle, or B*T
    for background (zeros); with_ids: append a channel holding triangle id + 1 (0 on background).
    One plane a x + b y + c per triangle and channel, gathered per pixel."""
    batch, height, width = shape
    corners, corner_values = screen[:, triangles], values[:, triangles]  # (B,T,3,2), (B,T,3,C)
    edge1, edge2 = corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0]
    det = edge1[..., 0] * edge2[..., 1] - edge1[..., 1] * edge2[..., 0]
    inverse = torch.where(det.abs() > 1e-12, 1.0 / det, torch.zeros_like(det))[..., None]
    delta1, delta2 = corner_values[:, :, 1] - corner_values[:, :, 0], corner_values[:, :, 2] - corner_values[:, :, 0]
    a = (delta1 * edge2[..., 1:] - delta2 * edge1[..., 1:]) * inverse
    b = (delta2 * edge1[..., :1] - delta1 * edge2[..., :1]) * inverse
    c = corner_values[:, :, 0] - a * corners[:, :, 0, :1] - b * corners[:, :, 0, 1:]
    if with_ids:
        ids = torch.arange(1, triangles.shape[0] + 1, dtype=values.dtype, device=values.device)
        a, b = (torch.cat([plane, torch.zeros_like(plane[..., :1])], dim=-1) for plane in (a, b))
        c = torch.cat([c, ids.expand(batch, -1)[..., None]], dim=-1)
    channels = c.shape[-1]
    empty = values.new_zeros(1, channels)
    a, b, c = (torch.cat([plane.reshape(-1, channels), empty]) for plane in (a, b, c))
    if rows.device.type == "cpu" and values.dtype == torch.float32:
        out = np.empty((batch * height * width, channels), np.float32)
        _compiled_planes()(a.numpy(), b.numpy(), c.numpy(), rows.numpy(), width, height, out)
        return torch.from_numpy(out).reshape(batch, height, width, channels)
    x = torch.arange(width, device=rows.device, dtype=values.dtype)[:, None] + 0.5  # broadcast (W,1)
    y = torch.arange(height, device=rows.device, dtype=values.dtype)[:, None, None] + 0.5  # (H,1,1)
    out = c.index_select(0, rows).reshape(batch, height, width, channels)
    out.addcmul_(a.index_select(0, rows).reshape(batch, height, width, channels), x)
    return out.addcmul_(b.index_select(0, rows).reshape(batch, height, width, channels), y)


_PLANES_KERNEL = None


def _compiled_planes():
    """The per-pixel plane evaluation of :func:`_interpolate_affine` as one compiled loop (numba,
    GIL released so render threads overlap): a quarter of the torch version's time, which pays
    for a full-size temporary per operation. Compiled on first use, cached on disk."""
    global _PLANES_KERNEL
    if _PLANES_KERNEL is None:
        import numba

        @numba.njit(nogil=True, cache=True)
        def kernel(a, b, c, rows, width, height, out):  # pragma: no cover - compiled
            for pixel in range(out.shape[0]):
                row = rows[pixel]
                x = np.float32(pixel % width) + np.float32(0.5)
                y = np.float32((pixel // width) % height) + np.float32(0.5)
                for channel in range(out.shape[1]):
                    out[pixel, channel] = a[row, channel] * x + b[row, channel] * y + c[row, channel]

        _PLANES_KERNEL = kernel
    return _PLANES_KERNEL


def _occluded(landmarks: torch.Tensor, depth: torch.Tensor, z_ndc: torch.Tensor, covered: torch.Tensor,
              tolerance_mm: float = 5.0) -> torch.Tensor:
    """(B,L) bool: at each of the four pixel centres around the landmark, a surface lies more than
    `tolerance_mm` in front of it (so grazing surfaces at the silhouette do not count)."""
    batch, height, width = covered.shape
    index = torch.arange(batch, device=covered.device)[:, None]
    hidden = torch.ones_like(depth, dtype=torch.bool)
    for dx in (-0.5, 0.5):
        for dy in (-0.5, 0.5):
            column = (landmarks[..., 0] + dx).floor().long().clamp(0, width - 1)
            row = (landmarks[..., 1] + dy).floor().long().clamp(0, height - 1)
            z = z_ndc[index, row, column]
            surface = 2 * ZFAR * ZNEAR / ((ZFAR + ZNEAR) - z * (ZFAR - ZNEAR))  # OpenGL depth from z/w
            hidden &= covered[index, row, column] & (depth > surface + tolerance_mm)
    return hidden


def _triangle_labels(face_model, triangles: np.ndarray) -> np.ndarray:
    """(T,) uint8 REGION_LABELS of the mesh triangles: majority vote of the corners' regions
    (ties: the rarer label, so thin regions such as brows keep their triangles)."""
    vertex_labels = np.full(face_model.num_vertices, REGION_LABELS["skin"], np.uint8)
    for region, label in REGION_MAP.items():
        if region in face_model.region_names and label != "skin":
            vertex_labels[face_model.regions[region].cpu().numpy()] = REGION_LABELS[label]
    corner_labels = vertex_labels[triangles]  # (T,3)
    counts = np.stack([(corner_labels == value).sum(1) for value in range(len(REGION_LABELS))], 1)
    rarity = 1.0 - np.bincount(vertex_labels, minlength=len(REGION_LABELS)) / len(vertex_labels)
    return np.argmax(counts + 0.5 * rarity, axis=1).astype(np.uint8)


# --- corpus ---------------------------------------------------------------------------------------


def write_corpus(out_dir: str | Path, n: int, config: SynthConfig | None = None, *, mode: str = "images",
                 group_size: int = 4, seed: int = 0, batch_size: int = 32, backgrounds: str | Path | None = None,
                 image_format: str = "png", prefix: str = "synthetic", progress: bool = True,
                 device: str = "cpu", workers: int | None = None, face_model=None) -> dict:
    """Render and write n samples (groups of `group_size` frames in the group modes) into shards
    under `out_dir`; returns the index (its ``info`` records the settings and ``complete``).

    RNG chunks of 64 frames render on `workers` threads (default: :func:`default_workers`), in
    batches of `batch_size` frames, while a writer thread encodes and writes finished chunks in
    order, so the output does not depend on `workers` or `batch_size`. face_model: a loaded
    FaceModel (default: ``load_face_model(config.face_model)`` in the config's expression space)."""
    config = config or SynthConfig()
    config.validate()
    frames = _check_request(n, mode, group_size, batch_size, image_format, seed)
    if backgrounds is not None and config.background != "photos":
        config = dataclasses.replace(config, background="photos")
    if config.background == "photos" and backgrounds is None:
        raise ValueError("background='photos' needs a folder of photos (--backgrounds DIR)")
    out_dir = Path(out_dir)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar*"))
    if existing:
        raise FileExistsError(f"{out_dir} already holds shards named {prefix}-*.tar ({len(existing)}); choose "
                              "another folder or prefix, or delete them")
    if face_model is None:
        from facelab.facemodel import load_face_model

        face_model = load_face_model(config.face_model, expression_space=config.expression_space)
    if face_model.expression_space != config.expression_space:
        raise ValueError(f"the face model's expression space is {face_model.expression_space!r}, the synth "
                         f"config's {config.expression_space!r}")
    renderer = SynthRenderer(face_model, config.image_size, config.fill_holes, config.antialias, device,
                             config.mouth_label)
    photos = PhotoBackgrounds(backgrounds, config.image_size) if config.background == "photos" else None
    settings = {"n": n, "mode": mode, "group_size": frames if mode != "images" else None, "seed": seed,
                "image_format": image_format, "config": config.to_dict()}
    info = {"generator": "facelab.data.synth", "settings": settings, "complete": False,
            "expression_space": face_model.expression_space, "regions": REGION_LABELS,
            "mask_regions": list(MASK_LABELS), "params": PARAM_DOC, "gamma": GAMMA}
    writer = ShardWriter(out_dir, prefix=prefix, max_count=max(1, 1000 // frames), kind=mode,
                         info=info, image_format=image_format)
    from tqdm import tqdm

    bar = tqdm(total=n, unit="sample", desc=f"synth {out_dir.name}", file=sys.stderr, disable=not progress)
    per_chunk = max(1, CHUNK // frames)
    starts = range(0, n, per_chunk)
    workers = max(1, min(workers or default_workers(device), len(starts)))
    threads = torch.get_num_threads()
    started = time.perf_counter()
    try:
        if renderer.device.type == "cpu":
            # one intra-op thread per render worker: OpenMP pools that spin against a busy core
            # (the other worker, the writer) run several times slower than single threads
            torch.set_num_threads(1)
        with writer, ThreadPoolExecutor(workers) as render_pool, ThreadPoolExecutor(1) as write_pool:
            rendering, writing = deque(), None
            for start in starts:
                count = min(per_chunk, n - start)
                rendering.append((start, count, render_pool.submit(
                    render_chunk, renderer, config, seed, start // per_chunk, count, mode, frames, batch_size, photos)))
                while len(rendering) > workers or (start == starts[-1] and rendering):
                    first, size, future = rendering.popleft()
                    samples = _samples(future.result(), config, seed, first, size, mode, frames)
                    if writing is not None:
                        bar.update(writing.result())
                    writing = write_pool.submit(_write_all, writer, samples)
            if writing is not None:
                bar.update(writing.result())
            writer.info["complete"] = True
            writer.info["seconds"] = round(time.perf_counter() - started, 3)
    finally:
        torch.set_num_threads(threads)
        bar.close()
    return read_index(out_dir)


def default_workers(device: str | torch.device = "cpu") -> int:
    """Render threads: one per core (at most 4) on CPU, one on a GPU."""
    return 1 if torch.device(device).type != "cpu" else max(1, min(4, os.cpu_count() or 1))


def render_chunk(renderer: SynthRenderer, config: SynthConfig, seed: int, chunk: int, count: int, mode: str,
                 frames: int, batch_size: int, photos: PhotoBackgrounds | None = None) -> dict[str, np.ndarray]:
    """Parameters, backgrounds and renders of one RNG chunk: `count` samples of `frames` frames.
    Returns numpy arrays with count*frames rows (``SynthRenderer.render`` keys plus ``params``)."""
    params = sample_parameters(renderer.model, config, generator_for(seed, chunk, 0), count, mode, frames)
    shared_background = mode == "clips"
    latents = sample_backgrounds(generator_for(seed, chunk, 1), count if shared_background else count * frames)
    if shared_background:
        latents = {name: value.repeat_interleave(frames, 0) for name, value in latents.items()}
    parts = []
    for first in range(0, count * frames, batch_size):
        rows = slice(first, first + batch_size)
        batch_latents = {name: value[rows] for name, value in latents.items()}
        if config.background == "procedural":
            background = procedural_backgrounds(batch_latents, config.image_size)
        elif config.background == "photos":
            background = photos.crops(batch_latents)
        else:
            background = None
        parts.append(renderer.render({name: value[rows] for name, value in params.items()}, background))
    out = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    out["params"] = {name: value.numpy() for name, value in params.items()}
    return out


def _samples(rendered: dict, config: SynthConfig, seed: int, start: int, count: int, mode: str,
             frames: int) -> list[dict]:
    """Raw samples (schema) of a rendered chunk."""
    conf = np.where(rendered["landmarks_occluded"], np.float32(config.occluded_landmark_conf), np.float32(1.0))
    samples = []
    for local in range(count):
        index = start + local
        rows = slice(local * frames, (local + 1) * frames) if mode != "images" else local
        tag = f"synth{seed}-{index:08d}"
        metas = [{"source": "synthetic", "identity": tag, "clip": tag if mode == "clips" else None,
                  "frame": frame if mode != "images" else None, "seed": seed, "index": index,
                  "landmarks_occluded": np.flatnonzero(rendered["landmarks_occluded"][row]).tolist()}
                 for frame, row in enumerate(range(local * frames, (local + 1) * frames))]
        samples.append({
            "image": rendered["image"][rows], "mask": rendered["mask"][rows], "regions": rendered["regions"][rows],
            "landmarks": rendered["landmarks"][rows], "landmarks_conf": conf[rows],
            "dense_landmarks": rendered["dense_landmarks"][rows], "verts": rendered["verts"][rows],
            "params": {name: value[rows] for name, value in rendered["params"].items()},
            "meta": metas[0] if mode == "images" else metas})
    return samples


def _write_all(writer: ShardWriter, samples: list[dict]) -> int:
    for sample in samples:
        writer.write(sample)
    return len(samples)


def _check_request(n: int, mode: str, group_size: int, batch_size: int, image_format: str, seed: int) -> int:
    """Frames per sample; ValueError naming the bad argument."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; valid: {', '.join(MODES)}")
    if int(n) < 1:
        raise ValueError(f"the number of samples must be at least 1, got {n}")
    if mode != "images" and int(group_size) < 2:
        raise ValueError(f"mode {mode!r} needs a group size of at least 2 frames, got {group_size}")
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image format {image_format!r}; valid: png, jpg")
    if int(seed) < 0:
        raise ValueError(f"the seed must be non-negative, got {seed}")
    return 1 if mode == "images" else int(group_size)


# --- the training default: built on first use -----------------------------------------------------

SYNTH_DEFAULTS = {"n_train": 2000, "n_test": 200, "seed": 0, "test_seed": 1_000_003, "mode": "images",
                  "group_size": None, "face_model": "ict-face-lite", "preset": "default", "image_size": None,
                  "image_format": "png", "batch_size": 32, "backgrounds": None, "overrides": {}}


def corpus_settings(cfg_data) -> dict:
    """The ``synth`` block of a data config with its defaults filled in (image_size and
    group_size fall back to the data config's own)."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg_data, resolve=True) if isinstance(cfg_data, DictConfig) else dict(cfg_data)
    synth = dict(data.get("synth") or {})
    unknown = sorted(set(synth) - set(SYNTH_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown data.synth key(s) {', '.join(unknown)}; valid: {', '.join(SYNTH_DEFAULTS)}")
    settings = {**SYNTH_DEFAULTS, **synth}
    settings["image_size"] = settings["image_size"] or data.get("image_size") or 224
    settings["group_size"] = settings["group_size"] or data.get("group_size") or 4
    if settings["seed"] == settings["test_seed"]:
        raise ValueError(f"data.synth.seed equals test_seed ({settings['seed']}): the training corpus would "
                         "repeat the held-out benchmark; pick another seed")
    return settings


def ensure_corpus(root: str | Path, cfg_data, progress: bool = True, device: str = "cpu") -> Path:
    """Build ``<root>/train`` (seed ``synth.seed``) and ``<root>/test`` (the held-out synthetic
    benchmark, ``synth.test_seed``, fixed whatever the training seed) unless each already holds a
    complete corpus with the same settings; a half-written one is removed and rebuilt. A complete
    corpus with other settings is an error (it is never overwritten). Returns root."""
    root = Path(root)
    settings = corpus_settings(cfg_data)
    config = SynthConfig.from_preset(settings["preset"], **{
        **settings["overrides"], "face_model": settings["face_model"], "image_size": int(settings["image_size"])})
    splits = (("train", settings["n_train"], settings["seed"]), ("test", settings["n_test"], settings["test_seed"]))
    for split, n, seed in splits:
        directory = root / split
        frames = _check_request(n, settings["mode"], settings["group_size"], settings["batch_size"],
                                settings["image_format"], seed)
        wanted = {"n": int(n), "mode": settings["mode"], "group_size": frames if settings["mode"] != "images" else None,
                  "seed": int(seed), "image_format": settings["image_format"], "config": config.to_dict()}
        if (directory / INDEX).exists():
            index = read_index(directory)
            info = index.get("info", {})
            if info.get("complete"):
                found = json.loads(json.dumps(info.get("settings", {})))
                if found != json.loads(json.dumps(wanted)):
                    raise ValueError(_mismatch(directory, found, wanted))
                continue
        for stale in [*directory.glob("synthetic-*.tar*"), directory / INDEX]:
            stale.unlink(missing_ok=True)
        write_corpus(directory, int(n), config, mode=settings["mode"], group_size=frames, seed=int(seed),
                     batch_size=int(settings["batch_size"]), backgrounds=settings["backgrounds"],
                     image_format=settings["image_format"], progress=progress, device=device)
    return root


def _mismatch(directory: Path, found: dict, wanted: dict) -> str:
    flat = lambda d: {**{k: v for k, v in d.items() if k != "config"}, **d.get("config", {})}  # noqa: E731
    a, b = flat(found), flat(wanted)
    diffs = [f"{key}: {a.get(key)!r} there, {b.get(key)!r} asked"
             for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]
    return (f"{directory} holds a synthetic corpus built with other settings ({'; '.join(diffs)}). Delete it to "
            "rebuild, or point data.root at another folder")


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (shards + index.json)")
    parser.add_argument("--n", type=int, required=True, help="samples to write (groups in the group modes)")
    parser.add_argument("--mode", choices=MODES, default="images")
    parser.add_argument("--group-size", type=int, default=4, help="frames per clip / photos per identity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="parameter distributions (inversefacenet: the paper's initial corpus)")
    parser.add_argument("--face-model", default="ict-face-lite")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backgrounds", default=None, metavar="DIR",
                        help="crop backgrounds from the photos in DIR (default: procedural)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames rendered at once")
    parser.add_argument("--image-format", choices=("png", "jpg"), default="png",
                        help="colour image encoding (jpg: smaller, faster, lossy)")
    parser.add_argument("--prefix", default="synthetic", help="shard name prefix")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a SynthConfig setting (YAML value), e.g. --set yaw_deg=[-60,60]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="render threads (default: one per core, at most 4)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = {}
        for item in args.overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE")
            overrides[key.strip()] = yaml.safe_load(value)
        config = SynthConfig.from_preset(args.preset, **{"face_model": args.face_model,
                                                         "image_size": args.image_size, **overrides})
        index = write_corpus(args.out, args.n, config, mode=args.mode, group_size=args.group_size, seed=args.seed,
                             batch_size=args.batch_size, backgrounds=args.backgrounds,
                             image_format=args.image_format, prefix=args.prefix, progress=not args.quiet,
                             device=args.device, workers=args.workers)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"facelab data synth: error: {error}", file=sys.stderr)
        return 2
    frames = args.n * (index["group_size"] or 1)
    seconds = index["info"]["seconds"]  # rendering and writing, without start-up
    print(json.dumps({"out": str(args.out), "kind": index["kind"], "count": index["count"],
                      "group_size": index["group_size"], "shards": len(index["shards"]), "seconds": seconds,
                      "images_per_s": round(frames / max(seconds, 1e-9), 1)}))
    return 0
