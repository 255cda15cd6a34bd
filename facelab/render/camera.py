"""Rotations and cameras: model space -> pixels -> clip space for the rasterizer.

Conventions (ARCHITECTURE.md, "Conventions"):

- Model/world space: right-handed, +y up, +z toward the camera, millimetres.
- Rotations at the API: Euler (pitch, yaw, roll) radians, R = Rz(roll) @ Ry(yaw) @ Rx(pitch)
  acting on column vectors, with the right-hand elementary rotations. Signs that follow:
  positive yaw turns +z toward +x (R @ [0,0,1] = [1,0,0] at yaw = +90 deg: the face turns to the
  viewer's right, the subject's own left); positive pitch turns +z toward -y (the face looks
  down); positive roll turns +x toward +y (counter-clockwise in the image as the viewer sees it).
- Camera space (OpenGL): x right, y up, the camera at the origin looking down -z.
- Pixels: x right, y down, origin at the top-left corner, pixel centres at +0.5.
- Clip space (OpenGL / nvdiffrast): (x, y, z, w), ndc = xyz / w in [-1, 1];
  x_ndc = 2 * px / W - 1 and y_ndc = 1 - 2 * py / H, so ndc y = +1 is the top edge (row 0).
  Camera space and ndc are both y-up, so triangles that are counter-clockwise seen from the
  camera stay counter-clockwise in ndc (front faces as in OpenGL) for both camera models.

Every function is batched, differentiable, keeps the input dtype and contains no loop over vertices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EPS = 1e-8


def _check(name: str, tensor: Tensor, *shape: int | None) -> None:
    """Raise a readable error unless ``tensor`` has ``shape`` (None = any size)."""
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        wanted = "(" + ",".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name}: expected shape {wanted}, got {tuple(tensor.shape)}")


# --- rotations ------------------------------------------------------------------------------------


def euler_to_matrix(angles: Tensor) -> Tensor:
    """Rotation matrices from Euler angles.

    angles: (...,3) float, radians, (pitch, yaw, roll) = rotations about x, y, z.
    Returns (...,3,3), same dtype: R = Rz(roll) @ Ry(yaw) @ Rx(pitch), acting on column vectors.
    """
    if angles.shape[-1] != 3:
        raise ValueError(f"angles: expected (...,3) (pitch, yaw, roll), got {tuple(angles.shape)}")
    cos, sin = torch.cos(angles), torch.sin(angles)
    cx, cy, cz = cos.unbind(-1)
    sx, sy, sz = sin.unbind(-1)
    rows = (
        (cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx),
        (sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx),
        (-sy, cy * sx, cy * cx),
    )
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


def matrix_to_euler(rotation: Tensor) -> Tensor:
    """Euler angles (pitch, yaw, roll) of rotation matrices; inverse of :func:`euler_to_matrix`.

    rotation: (...,3,3) float, orthonormal, det +1.
    Returns (...,3) radians. Exact inverse on |pitch| < pi, |yaw| < pi/2, |roll| < pi; at
    |yaw| = pi/2 (gimbal lock) pitch and roll are not separable and gradients are undefined.
    """
    if rotation.shape[-2:] != (3, 3):
        raise ValueError(f"rotation: expected (...,3,3), got {tuple(rotation.shape)}")
    # R[2] = (-sin yaw, cos yaw sin pitch, cos yaw cos pitch); R[:,0] = cos yaw (cos roll, sin roll, .)
    yaw = torch.atan2(-rotation[..., 2, 0], torch.hypot(rotation[..., 2, 1], rotation[..., 2, 2]))
    pitch = torch.atan2(rotation[..., 2, 1], rotation[..., 2, 2])
    roll = torch.atan2(rotation[..., 1, 0], rotation[..., 0, 0])
    return torch.stack([pitch, yaw, roll], dim=-1)


def rotation_6d_to_matrix(x: Tensor) -> Tensor:
    """Rotation matrices from the continuous 6D representation (Zhou et al., CVPR 2019).

    x: (...,6) float; x[..., :3] and x[..., 3:] are the (unnormalised) first and second columns.
    Returns (...,3,3): Gram-Schmidt of the two columns, the third is their cross product.
    The two 3-vectors must not be (near) parallel; norms are clamped at 1e-8 against division by 0.
    """
    if x.shape[-1] != 6:
        raise ValueError(f"x: expected (...,6) 6D rotation, got {tuple(x.shape)}")
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(EPS)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(EPS)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


def matrix_to_rotation_6d(rotation: Tensor) -> Tensor:
    """The 6D representation of rotation matrices: (...,3,3) -> (...,6), first column then second."""
    if rotation.shape[-2:] != (3, 3):
        raise ValueError(f"rotation: expected (...,3,3), got {tuple(rotation.shape)}")
    return torch.cat([rotation[..., :, 0], rotation[..., :, 1]], dim=-1)


def rigid_transform(vertices: Tensor, rotation: Tensor, translation: Tensor | None = None) -> Tensor:
    """Rigid transform R v + t of points (or, without t, of normals).

    vertices: (B,V,3); rotation: (B,3,3); translation: (B,3) or None, same units as vertices.
    Returns (B,V,3).
    """
    out = torch.einsum("bij,bvj->bvi", rotation, vertices)
    return out if translation is None else out + translation[:, None, :]


# --- projections ----------------------------------------------------------------------------------


def weak_perspective(vertices: Tensor, rotation: Tensor, scale: Tensor, translation: Tensor) -> tuple[Tensor, Tensor]:
    """Scaled orthographic projection to pixels.

    vertices: (B,V,3) float32, mm, model space.
    rotation: (B,3,3) model -> camera orientation.
    scale: (B,) pixels per mm.
    translation: (B,2) pixels, where the model origin lands in the image.
    Returns pixels (B,V,2): x = scale * (Rv)_x + tx, y = -scale * (Rv)_y + ty (image y points down);
    and depth (B,V) = -scale * (Rv)_z, pixel units relative to the origin's depth: larger is
    farther, only its order matters (z-buffering), and it is negative for points in front of the
    origin, so give :func:`pixels_to_clip` a depth range around 0.
    """
    _check("vertices", vertices, None, None, 3)
    _check("rotation", rotation, vertices.shape[0], 3, 3)
    _check("scale", scale, vertices.shape[0])
    _check("translation", translation, vertices.shape[0], 2)
    rotated = rigid_transform(vertices, rotation) * scale[:, None, None]
    pixels = torch.stack([rotated[..., 0], -rotated[..., 1]], dim=-1) + translation[:, None, :]
    return pixels, -rotated[..., 2]


def perspective(vertices: Tensor, rotation: Tensor, translation: Tensor, focal: Tensor,
                principal: Tensor) -> tuple[Tensor, Tensor]:
    """Pinhole projection to pixels.

    vertices: (B,V,3) float32, mm, model space.
    rotation: (B,3,3) and translation: (B,3) mm: camera-space point p = R v + t (OpenGL camera,
    looking down -z, so a face in view has t_z < 0, e.g. t = (0, 0, -500)).
    focal: (B,) pixels. principal: (B,2) pixels, the principal point (cx, cy).
    Returns pixels (B,V,2): x = cx + focal * p_x / depth, y = cy - focal * p_y / depth;
    and depth (B,V) mm = -p_z, the distance along the view axis. Pixels are meaningless (and
    their gradients unbounded) for depth <= 0, points at or behind the camera.
    """
    _check("vertices", vertices, None, None, 3)
    _check("rotation", rotation, vertices.shape[0], 3, 3)
    _check("translation", translation, vertices.shape[0], 3)
    _check("focal", focal, vertices.shape[0])
    _check("principal", principal, vertices.shape[0], 2)
    camera = rigid_transform(vertices, rotation, translation)
    depth = -camera[..., 2]
    planar = camera[..., :2] * (focal[:, None, None] / depth[..., None])
    pixels = torch.stack([planar[..., 0], -planar[..., 1]], dim=-1) + principal[:, None, :]
    return pixels, depth


# --- clip space -----------------------------------------------------------------------------------


def pixels_to_ndc(pixels: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(...,2) pixels -> (...,2) ndc: x_ndc = 2 px / W - 1, y_ndc = 1 - 2 py / H (H, W = image_size)."""
    height, width = image_size
    return torch.stack([2.0 * pixels[..., 0] / width - 1.0, 1.0 - 2.0 * pixels[..., 1] / height], dim=-1)


def ndc_to_pixels(ndc: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(...,2) ndc -> (...,2) pixels; inverse of :func:`pixels_to_ndc`."""
    height, width = image_size
    return torch.stack([(ndc[..., 0] + 1.0) * (0.5 * width), (1.0 - ndc[..., 1]) * (0.5 * height)], dim=-1)


def pixels_to_clip(pixels: Tensor, depth: Tensor, image_size: tuple[int, int], znear: float, zfar: float,
                   perspective: bool) -> Tensor:
    """Clip-space positions for the rasterizer (nvdiffrast contract) from pixels and depth.

    pixels: (B,V,2) pixels; depth: (B,V) from :func:`perspective` (mm) or
    :func:`weak_perspective` (scaled units); image_size: (H, W); znear < zfar in depth's units.
    Returns (B,V,4) = (x, y, z, w) with (x/w, y/w) = :func:`pixels_to_ndc` (pixels).

    perspective=True: w = depth, so the rasterizer interpolates perspective-correctly, and
    z = ((f + n) depth - 2 f n) / (f - n), OpenGL's projection, so that
    z_ndc = z / w = (f + n) / (f - n) - 2 f n / ((f - n) depth) runs from -1 at depth = znear to
    +1 at depth = zfar (hyperbolic in depth; points outside [znear, zfar] are clipped).
    perspective=False: w = 1 and z = 2 (depth - znear) / (zfar - znear) - 1, linear, -1 at znear
    and +1 at zfar; znear/zfar must bracket the (signed, origin-relative) weak-perspective depth.
    """
    _check("pixels", pixels, None, None, 2)
    _check("depth", depth, pixels.shape[0], pixels.shape[1])
    if not zfar > znear:
        raise ValueError(f"pixels_to_clip: need znear < zfar, got znear={znear}, zfar={zfar}")
    ndc = pixels_to_ndc(pixels, image_size)
    if perspective:
        w = depth
        z = ((zfar + znear) * depth - 2.0 * zfar * znear) / (zfar - znear)
        xy = ndc * w[..., None]
    else:
        w = torch.ones_like(depth)
        z = 2.0 * (depth - znear) / (zfar - znear) - 1.0
        xy = ndc
    return torch.cat([xy, z[..., None], w[..., None]], dim=-1)


def clip_to_pixels(clip: Tensor, image_size: tuple[int, int]) -> Tensor:
    """(B,V,4) clip positions -> (B,V,2) pixels (perspective division, then :func:`ndc_to_pixels`)."""
    _check("clip", clip, None, None, 4)
    return ndc_to_pixels(clip[..., :2] / clip[..., 3:4], image_size)


# --- parameter groups -----------------------------------------------------------------------------


@dataclass
class WeakPerspectiveCamera:
    """Weak-perspective parameters; see :func:`weak_perspective` for units.

    rotation: (B,3,3); scale: (B,) px/mm; translation: (B,2) px. The default depth range suits a
    head of up to +-500 mm at up to 10 px/mm.
    """

    rotation: Tensor
    scale: Tensor
    translation: Tensor
    znear: float = -5000.0
    zfar: float = 5000.0

    def project(self, vertices: Tensor) -> tuple[Tensor, Tensor]:
        """(B,V,3) mm -> pixels (B,V,2), depth (B,V)."""
        return weak_perspective(vertices, self.rotation, self.scale, self.translation)

    def to_clip(self, vertices: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(B,V,3) mm -> (B,V,4) clip positions."""
        pixels, depth = self.project(vertices)
        return pixels_to_clip(pixels, depth, image_size, self.znear, self.zfar, perspective=False)


@dataclass
class PerspectiveCamera:
    """Pinhole parameters; see :func:`perspective` for units.

    rotation: (B,3,3); translation: (B,3) mm; focal: (B,) px; principal: (B,2) px; znear, zfar: mm.
    """

    rotation: Tensor
    translation: Tensor
    focal: Tensor
    principal: Tensor
    znear: float = 10.0
    zfar: float = 10000.0

    def project(self, vertices: Tensor) -> tuple[Tensor, Tensor]:
        """(B,V,3) mm -> pixels (B,V,2), depth (B,V) mm."""
        return perspective(vertices, self.rotation, self.translation, self.focal, self.principal)

    def to_clip(self, vertices: Tensor, image_size: tuple[int, int]) -> Tensor:
        """(B,V,3) mm -> (B,V,4) clip positions."""
        pixels, depth = self.project(vertices)
        return pixels_to_clip(pixels, depth, image_size, self.znear, self.zfar, perspective=True)
