"""Spherical-harmonics lighting: 3 bands, 9 real coefficients per colour channel.

Coefficients ``sh`` are (B,C,9), C = 3 (RGB) or 1 (mono), and are the radiance SH coefficients
of a distant environment. They multiply the Lambertian-convolved basis, in this order
(Ramamoorthi & Hanrahan 2001, with the clamped-cosine factors A_0 = pi, A_1 = 2 pi / 3,
A_2 = pi / 4 folded into the SH basis constants):

    k   Ylam_k(n)                      = A_l * Y_k(n)
    0   0.886227                         pi      * 0.282095
    1   1.023328 * y                     2 pi/3  * 0.488603 * y
    2   1.023328 * z                     2 pi/3  * 0.488603 * z
    3   1.023328 * x                     2 pi/3  * 0.488603 * x
    4   0.858086 * x y                   pi/4    * 1.092548 * x y
    5   0.858086 * y z                   pi/4    * 1.092548 * y z
    6   0.247708 * (3 z^2 - 1)           pi/4    * 0.315392 * (3 z^2 - 1)
    7   0.858086 * x z                   pi/4    * 1.092548 * x z
    8   0.429043 * (x^2 - y^2)           pi/4    * 0.546274 * (x^2 - y^2)

so irradiance(n) = sum_k c_k Ylam_k(n), and a DC of DEFAULT_SH_DC (~1.128) alone gives 1.
Normals are in whatever frame the coefficients were defined in (model or camera space: the
caller picks one and keeps to it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Real SH basis constants of bands 0..2 (before convolution), as in the table above.
SH_Y00 = 0.5 / math.sqrt(math.pi)  # 0.282095
SH_Y1 = math.sqrt(3.0 / (4.0 * math.pi))  # 0.488603
SH_Y2_CROSS = 0.5 * math.sqrt(15.0 / math.pi)  # 1.092548 (xy, yz, xz)
SH_Y20 = 0.25 * math.sqrt(5.0 / math.pi)  # 0.315392
SH_Y22 = 0.25 * math.sqrt(15.0 / math.pi)  # 0.546274
# Clamped-cosine convolution factor of each band.
LAMBERT_BAND = (math.pi, 2.0 * math.pi / 3.0, math.pi / 4.0)

#: The DC coefficient that alone gives irradiance 1 everywhere: 1 / 0.886227 = 2 / sqrt(pi) ~ 1.128.
DEFAULT_SH_DC = 1.0 / (LAMBERT_BAND[0] * SH_Y00)


def _basis(normals: Tensor, band_factors: tuple[float, float, float]) -> Tensor:
    x, y, z = normals.unbind(-1)
    a0, a1, a2 = band_factors
    terms = [
        torch.full_like(x, a0 * SH_Y00),
        (a1 * SH_Y1) * y,
        (a1 * SH_Y1) * z,
        (a1 * SH_Y1) * x,
        (a2 * SH_Y2_CROSS) * x * y,
        (a2 * SH_Y2_CROSS) * y * z,
        (a2 * SH_Y20) * (3.0 * z * z - 1.0),
        (a2 * SH_Y2_CROSS) * x * z,
        (a2 * SH_Y22) * (x * x - y * y),
    ]
    return torch.stack(terms, dim=-1)


def sh_basis(normals: Tensor) -> Tensor:
    """The Lambertian-convolved SH basis Ylam_k(n) of the module table.

    normals: (...,3) float, unit length (not renormalised here).
    Returns (...,9), same dtype.
    """
    if normals.shape[-1] != 3:
        raise ValueError(f"normals: expected (...,3), got {tuple(normals.shape)}")
    return _basis(normals, LAMBERT_BAND)


def sh_irradiance(normals: Tensor, sh: Tensor) -> Tensor:
    """Irradiance sum_k c_k Ylam_k(n) for each normal and channel.

    normals: (B,N,3) float, unit length (any middle dims work: (B,H,W,3) -> (B,H,W,C)).
    sh: (B,C,9) float, radiance SH coefficients, C = 3 (RGB) or 1 (mono), linear colour.
    Returns (B,N,C) irradiance, linear colour (1 = the irradiance of DEFAULT_SH_DC alone).
    """
    if normals.dim() < 2 or normals.shape[-1] != 3:
        raise ValueError(f"normals: expected (B,N,3), got {tuple(normals.shape)}")
    if sh.dim() != 3 or sh.shape[-1] != 9 or sh.shape[0] != normals.shape[0]:
        raise ValueError(f"sh: expected (B,C,9) with B={normals.shape[0]}, got {tuple(sh.shape)}")
    return torch.einsum("b...k,bck->b...c", sh_basis(normals), sh)


def sh_from_directional(direction: Tensor, intensity: Tensor) -> Tensor:
    """Radiance SH coefficients of a distant directional light, truncated to 3 bands.

    direction: (B,3) float, pointing from the scene toward the light (renormalised here).
    intensity: (B,C) float, linear colour: the irradiance the light gives a surface facing it.
    Returns (B,C,9): c_k = intensity * Y_k(direction) (unconvolved basis), so that
    sh_irradiance(n, c) approximates intensity * max(0, n . direction); the 3-band truncation
    peaks at 1.0625 * intensity for n = direction and rings by up to ~0.1 * intensity elsewhere.
    """
    if direction.dim() != 2 or direction.shape[-1] != 3:
        raise ValueError(f"direction: expected (B,3), got {tuple(direction.shape)}")
    if intensity.dim() != 2 or intensity.shape[0] != direction.shape[0]:
        raise ValueError(f"intensity: expected (B,C) with B={direction.shape[0]}, got {tuple(intensity.shape)}")
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return intensity[:, :, None] * _basis(unit, (1.0, 1.0, 1.0))[:, None, :]


def mono_to_rgb(sh: Tensor) -> Tensor:
    """(B,1,9) grey coefficients -> (B,3,9), the same light in every channel."""
    if sh.dim() != 3 or sh.shape[1:] != (1, 9):
        raise ValueError(f"sh: expected (B,1,9) mono coefficients, got {tuple(sh.shape)}")
    return sh.repeat(1, 3, 1)
