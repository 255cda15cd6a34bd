"""Shading in linear colour: Lambertian SH diffuse, Blinn-Phong specular, explicit gamma.

Every function takes per-point tensors shaped (B,N,k): N vertices, or any number of middle
dims instead of N (e.g. (B,H,W,k) for per-pixel shading after interpolation). Per-batch
parameters, shaped (B,k), broadcast over those dims. Directions point away from the surface
(toward the light, toward the viewer), and normals are unit length; neither is renormalised
except the light and view directions, which are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lighting import sh_irradiance

EPS = 1e-8


def _per_batch(value: Tensor, like: Tensor) -> Tensor:
    """(B,k) -> (B,1,...,1,k) so that it broadcasts against ``like`` shaped (B,...,k')."""
    return value.reshape(value.shape[0], *([1] * (like.dim() - 2)), value.shape[-1])


def _normalize(vectors: Tensor) -> Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _direction(name: str, points: Tensor | None, position: Tensor | None, direction: Tensor | None,
               like: Tensor) -> Tensor:
    """Unit vectors from each point toward a position (B,3), or a fixed direction (B,3)."""
    if (position is None) == (direction is None):
        raise ValueError(f"blinn_phong: give exactly one of {name}_position and {name}_direction")
    for given in (position, direction):
        if given is not None and (given.dim() != 2 or given.shape != (like.shape[0], 3)):
            raise ValueError(f"blinn_phong: {name} position/direction must be (B,3) with B={like.shape[0]}, "
                             f"got {tuple(given.shape)}")
    if direction is not None:
        return _normalize(_per_batch(direction, like))
    if points is None:
        raise ValueError(f"blinn_phong: {name}_position needs `positions` (B,N,3) of the shaded points")
    return _normalize(_per_batch(position, like) - points)


def lambertian(albedo: Tensor, irradiance: Tensor) -> Tensor:
    """Diffuse colour = albedo * irradiance.

    albedo: (B,N,3) float, linear reflectance in [0,1].
    irradiance: (B,N,C) float, linear, C = 3 or 1 (grey light), e.g. from ``sh_irradiance``.
    Returns (B,N,3) linear colour. The Lambertian 1/pi is folded into the light's scale, as the
    SH convention (DEFAULT_SH_DC gives irradiance 1, so colour = albedo) intends.
    """
    if albedo.shape[-1] != 3 or irradiance.shape[-1] not in (1, 3) or albedo.shape[:-1] != irradiance.shape[:-1]:
        raise ValueError(f"lambertian: expected albedo (B,N,3) and irradiance (B,N,1 or 3), "
                         f"got {tuple(albedo.shape)} and {tuple(irradiance.shape)}")
    return albedo * irradiance


def blinn_phong(normals: Tensor, positions: Tensor | None = None, *, view_position: Tensor | None = None,
                view_direction: Tensor | None = None, light_position: Tensor | None = None,
                light_direction: Tensor | None = None, shininess: Tensor | float,
                specular_albedo: Tensor, light_color: Tensor | None = None) -> Tensor:
    """Blinn-Phong specular highlight of one light.

    normals: (B,N,3) float, unit, in the same space as everything below (camera or world).
    positions: (B,N,3) float, the shaded points (mm); needed only with a *_position argument.
    view_position: (B,3) the eye (camera space: zeros), OR view_direction: (B,3) toward a distant
        viewer (camera space: (0,0,1)). Exactly one.
    light_position: (B,3) a point light, OR light_direction: (B,3) toward a directional light.
        Exactly one. Point lights have no distance fall-off: light_color is what reaches the surface.
    shininess: (B,) float or a float, the Blinn exponent (> 0).
    specular_albedo: (B,N,3) or (B,N,1) float, linear specular reflectance.
    light_color: (B,3) float, linear; None = white (1,1,1).
    Returns (B,N,3) linear colour
        specular_albedo * light_color * max(n.h, 1e-8)^shininess  where n.l > 0, else 0,
    h = normalize(l + v). Unnormalised in energy, so the peak (n = h) is specular_albedo *
    light_color. n.h is clamped at 1e-8 rather than 0 so that gradients w.r.t. a learned
    shininess stay finite (0^s log 0 would be NaN).
    """
    if normals.dim() < 3 or normals.shape[-1] != 3:
        raise ValueError(f"blinn_phong: normals must be (B,N,3), got {tuple(normals.shape)}")
    if positions is not None and positions.shape != normals.shape:
        raise ValueError(f"blinn_phong: positions {tuple(positions.shape)} must match normals {tuple(normals.shape)}")
    if specular_albedo.shape[:-1] != normals.shape[:-1] or specular_albedo.shape[-1] not in (1, 3):
        raise ValueError(f"blinn_phong: specular_albedo must be (B,N,3) or (B,N,1) like normals "
                         f"{tuple(normals.shape)}, got {tuple(specular_albedo.shape)}")
    to_light = _direction("light", positions, light_position, light_direction, normals)
    to_viewer = _direction("view", positions, view_position, view_direction, normals)
    half = _normalize(to_light + to_viewer)
    n_dot_l = (normals * to_light).sum(-1, keepdim=True)
    n_dot_h = (normals * half).sum(-1, keepdim=True).clamp_min(EPS)
    if isinstance(shininess, Tensor):
        shininess = _per_batch(shininess.reshape(-1, 1), normals)
    highlight = torch.where(n_dot_l > 0, n_dot_h.pow(shininess), torch.zeros_like(n_dot_h))
    color = specular_albedo * highlight
    return color if light_color is None else color * _per_batch(light_color, normals)


def gamma_encode(linear: Tensor, gamma: float = 2.2) -> Tensor:
    """Linear -> display colour, x^(1/gamma).

    linear: any shape, float, linear colour (values above 1 pass through).
    Inputs are clamped at 1e-8 first so the gradient stays finite at and below 0 (it is 0
    there); the price is that 0 encodes to 1e-8^(1/gamma) ~ 2.3e-4 for gamma 2.2, below 8-bit
    resolution.
    """
    return _GammaEncode.apply(linear, gamma)


class _GammaEncode(torch.autograd.Function):
    """x.clamp_min(EPS) ** (1 / gamma) with a backward that reuses the output: d/dx = y / (gamma x)
    above EPS, 0 below. Saves the second power over the whole image that autograd's pow takes."""

    @staticmethod
    def forward(ctx, linear: Tensor, gamma: float) -> Tensor:
        encoded = linear.clamp_min(EPS).pow(1.0 / gamma)
        ctx.save_for_backward(linear, encoded)
        ctx.save_for_forward(linear, encoded)
        ctx.gamma = gamma
        return encoded

    @staticmethod
    def backward(ctx, grad: Tensor):
        linear, encoded = ctx.saved_tensors
        return _GammaEncode._slope(linear, encoded, ctx.gamma, grad), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _):
        linear, encoded = ctx.saved_tensors
        return _GammaEncode._slope(linear, encoded, ctx.gamma, tangent)

    @staticmethod
    def _slope(linear: Tensor, encoded: Tensor, gamma: float, times: Tensor) -> Tensor:
        above = linear > EPS
        return torch.where(above, times * encoded / (gamma * torch.where(above, linear, 1.0)), 0.0)


def gamma_decode(encoded: Tensor, gamma: float = 2.2) -> Tensor:
    """Display -> linear colour, x^gamma; inputs clamped at 1e-8 as in :func:`gamma_encode`."""
    return encoded.clamp_min(EPS).pow(gamma)


def shade(albedo: Tensor, normals: Tensor, sh: Tensor, specular: Tensor | None = None, *,
          positions: Tensor | None = None, view_position: Tensor | None = None,
          view_direction: Tensor | None = None, light_position: Tensor | None = None,
          light_direction: Tensor | None = None, shininess: Tensor | float = 20.0,
          light_color: Tensor | None = None) -> Tensor:
    """Linear colour = albedo * SH irradiance (+ Blinn-Phong specular if ``specular`` is given).

    albedo: (B,N,3) linear diffuse reflectance; normals: (B,N,3) unit; sh: (B,C,9) SH
    coefficients (C = 3 or 1) in the frame of the normals; specular: (B,N,3) or (B,N,1) linear
    specular reflectance, or None for diffuse only. The keyword arguments describe the specular
    light and viewer exactly as in :func:`blinn_phong` and are required only with ``specular``.
    Returns (B,N,3) linear colour (apply :func:`gamma_encode` for display).
    """
    color = lambertian(albedo, sh_irradiance(normals, sh))
    if specular is None:
        return color
    return color + blinn_phong(normals, positions, view_position=view_position, view_direction=view_direction,
                               light_position=light_position, light_direction=light_direction,
                               shininess=shininess, specular_albedo=specular, light_color=light_color)
