"""MeshRenderer: one render call from clip positions, geometry and appearance to images.

Composes the rasterizer primitives (any backend) with per-pixel shading: interpolate normals,
positions and albedo (per vertex or from a UV texture), shade in linear colour (SH diffuse +
optional Blinn-Phong), antialias, and return everything a loss needs, channel-first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import numba_ops
from .backends import get_rasterizer
from .rasterize import _use_numba
from .shading import blinn_phong, gamma_encode, lambertian
from .lighting import sh_irradiance
from .uv import sample_texture

SHADING = ("pixel", "vertex")


@dataclass
class RenderOutput:
    """All (B,C,H,W) float32, row 0 at the top. image: shaded colour (gamma-encoded when the
    renderer has a gamma, else linear); alpha: coverage (antialiased at silhouettes); depth:
    z/w (background 0); normals (computed on first access): unit, in the frame of the vertices
    given, 0 on background; attributes: name -> interpolated extra attribute; rast: the raw
    (B,H,W,4) rasterizer output."""

    image: Tensor
    alpha: Tensor
    depth: Tensor
    rast: Tensor
    attributes: dict[str, Tensor] = field(default_factory=dict)
    interpolated_normals: Tensor | None = field(default=None, repr=False)  # (B,H,W,3), not unit length
    _normals: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def normals(self) -> Tensor:
        if self._normals is None:
            raw = self.interpolated_normals
            unit = raw / raw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            self._normals = _channels_first(unit * (self.rast[..., 3:4] > 0).to(unit.dtype))
        return self._normals


def vertex_normals(vertices: Tensor, triangles: Tensor, kernels: str = "auto") -> Tensor:
    """Area-weighted unit vertex normals, differentiable. vertices (B,V,3), triangles (T,3);
    kernels as for the rasterizer ("auto" runs the compiled loop on CPU)."""
    if _use_numba(kernels, vertices):
        return numba_ops.vertex_normals(vertices, triangles)
    corners = vertices[:, triangles]  # (B,T,3,3)
    face = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0], dim=-1)
    normals = torch.zeros_like(vertices)
    for corner in range(3):
        normals = normals.index_add(1, triangles[:, corner], face)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class MeshRenderer(nn.Module):
    """Render triangle meshes.

    Args:
        image_size: (H, W).
        backend: "auto", "torch" or "nvdiffrast" (see ``facelab.render.backends``).
        antialias: blend across silhouettes (needed for silhouette gradients).
        gamma: encode the shaded image with x^(1/gamma); None keeps it linear.
        shading: "pixel" shades interpolated normals at every pixel (Phong shading);
            "vertex" shades at the vertices and interpolates the colour (Gouraud shading),
            cheaper and indistinguishable when triangles are about a pixel wide. A UV texture is
            always shaded per pixel.
        kernels: the torch backend's implementation: "numba" (compiled loops, CPU), "torch"
            (vectorised, any device) or "auto" (numba on CPU when it imports).
    """

    def __init__(self, image_size: tuple[int, int], backend: str = "auto", antialias: bool = True,
                 gamma: float | None = 2.2, shading: str = "pixel", kernels: str = "auto"):
        super().__init__()
        if shading not in SHADING:
            raise ValueError(f"unknown shading {shading!r}; valid: {', '.join(SHADING)}")
        self.image_size = tuple(image_size)
        self.backend = backend
        self.antialias = antialias
        self.gamma = gamma
        self.shading = shading
        self.kernels = kernels
        self._rasterizers: dict[str, object] = {}

    def rasterizer(self, device: torch.device):
        key = str(device)
        if key not in self._rasterizers:
            self._rasterizers[key] = get_rasterizer(self.backend, device, kernels=self.kernels)
        return self._rasterizers[key]

    def forward(self, clip: Tensor, vertices: Tensor, triangles: Tensor, sh: Tensor, *,
                albedo: Tensor | None = None, texture: Tensor | None = None, uv: Tensor | None = None,
                uv_triangles: Tensor | None = None, specular: Tensor | None = None,
                light_position: Tensor | None = None, view_position: Tensor | None = None,
                shininess: Tensor | float = 20.0, attributes: dict[str, Tensor] | None = None) -> RenderOutput:
        """clip: (B,V,4) clip-space positions; vertices: (B,V,3) the same mesh in the frame used
        for shading (camera space for a perspective camera: normals, positions, light and view
        positions all in it); triangles: (T,3); sh: (B,C,9).
        Albedo: per vertex `albedo` (B,V,3), or `texture` (B,Ht,Wt,3) with `uv` (Vt,2) and
        `uv_triangles` (T,3). Specular (optional): `specular` (B,V,3|1) per-vertex specular
        albedo with a point light `light_position` (B,3), a `view_position` (B,3) and `shininess`.
        attributes: extra per-vertex values (B|1,V,C) to interpolate."""
        if texture is None and albedo is None:
            raise ValueError("give per-vertex albedo or a UV texture")
        if texture is not None and (uv is None or uv_triangles is None):
            raise ValueError("a texture needs uv (Vt,2) and uv_triangles (T,3)")
        with torch.autocast(clip.device.type, enabled=False):
            raster = self.rasterizer(clip.device)
            rast = raster.rasterize(clip, triangles, self.image_size)
            covered = (rast[..., 3:4] > 0).to(clip.dtype)
            normals = vertex_normals(vertices, triangles, self.kernels)
            batch = clip.shape[0]
            # one interpolation for every per-vertex channel: each call gathers the same corners
            channels = {name: value.expand(batch, -1, -1) for name, value in (attributes or {}).items()}
            per_vertex = self.shading == "vertex" and texture is None
            if per_vertex:
                channels["color"] = self._shade(albedo, normals, vertices, sh, specular, light_position,
                                                view_position, shininess)
            else:
                if albedo is not None and texture is None:
                    channels["albedo"] = albedo.expand(batch, -1, -1)
                if specular is not None:
                    channels["positions"] = vertices
                    channels["specular"] = specular.expand(batch, -1, -1)
            channels["normals"] = normals
            pixels = _split(raster.interpolate(torch.cat(list(channels.values()), dim=-1), rast, triangles),
                            {name: value.shape[-1] for name, value in channels.items()})
            if per_vertex:
                color = pixels["color"]
            else:
                if texture is not None:
                    pixel_albedo = sample_texture(texture, rast, uv, uv_triangles, raster)
                else:
                    pixel_albedo = pixels["albedo"]
                pixel_normals = pixels["normals"] / pixels["normals"].norm(dim=-1, keepdim=True).clamp_min(1e-12)
                color = self._shade(pixel_albedo, pixel_normals, pixels.get("positions"), sh,
                                    pixels.get("specular"), light_position, view_position, shininess)
            if self.gamma is not None:  # background is 0 already; gamma_encode's clamp lifts it
                color = gamma_encode(color, self.gamma) * covered
            stacked = torch.cat([color, covered], dim=-1)
            if self.antialias:
                stacked = raster.antialias(stacked, rast, clip, triangles)
            extra = {name: _channels_first(pixels[name]) for name in (attributes or {})}
            return RenderOutput(
                image=_channels_first(stacked[..., :3]), alpha=_channels_first(stacked[..., 3:]),
                depth=_channels_first(rast[..., 2:3]), rast=rast, attributes=extra,
                interpolated_normals=pixels["normals"])

    @staticmethod
    def _shade(albedo, normals, positions, sh, specular, light_position, view_position, shininess) -> Tensor:
        """Linear colour at vertices (B,V,·) or pixels (B,H,W,·): SH diffuse plus Blinn-Phong."""
        color = lambertian(albedo, sh_irradiance(normals, sh))
        if specular is not None:
            color = color + blinn_phong(normals, positions, view_position=view_position,
                                        light_position=light_position, shininess=shininess,
                                        specular_albedo=specular)
        return color


def _split(stacked: Tensor, widths: dict[str, int]) -> dict[str, Tensor]:
    return dict(zip(widths, torch.split(stacked, list(widths.values()), dim=-1)))


def _channels_first(tensor: Tensor) -> Tensor:
    return tensor.permute(0, 3, 1, 2)
