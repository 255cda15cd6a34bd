"""UV maps: unwrap an image into a UV texture through a projected mesh, and sample UV textures.

Knows meshes, not faces. Built from the rasterizer primitives (any backend), so it runs on the
torch backend on CPU and on nvdiffrast on CUDA alike.

Conventions (as ``facelab.render.rasterize``):

- ``uv``: (Vt,2) float32 in [0,1], origin bottom-left (u right, v up). ``uv_triangles`` (T,3)
  index ``uv`` and correspond one to one with the mesh's ``triangles`` (T,3), which index its
  vertices, so a mesh may have more UV vertices than vertices (seams).
- Textures: (B,Ht,Wt,C) channel-last, row 0 at v = 1, column 0 at u = 0; texel (i, j) has its
  centre at u = (j + 0.5) / Wt, v = 1 - (i + 0.5) / Ht (the layout ``rasterize.texture`` reads).
- Images: (B,C,H,W) channel-first, row 0 at the top, pixel centres at +0.5. ``clip`` (B,V,4) are
  clip-space positions, ndc = xyz / w, ndc x = -1 the left edge, ndc y = +1 the top edge.
- Front faces are counter-clockwise in ndc (OpenGL), as for meshes wound counter-clockwise seen
  from outside (``facelab.render.camera`` keeps that winding from model space to clip space).

All math in float32 with autocast off; no Python loop runs over triangles, texels or pixels.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import Rasterizer, get_rasterizer
from .camera import ndc_to_pixels
from .rasterize import _cross, _plane_coefficients
from .rasterize import _full_precision as _float32

_MIN_W = 1e-8
#: Floor of the depth tolerance, in ndc z/w: covers float32 rounding for flat meshes.
_DEPTH_EPSILON = 1e-5
_UV_RAST_CACHE: OrderedDict = OrderedDict()
_UV_RAST_CACHE_SIZE = 8


def uv_rasterize(uv: Tensor, uv_triangles: Tensor, texture_size: tuple[int, int],
                 rasterizer: Rasterizer | None = None) -> Tensor:
    """The mesh laid flat in UV space, rasterized at texture resolution.

    uv: (Vt,2) in [0,1]; uv_triangles: (T,3); texture_size: (Ht, Wt).
    Returns (1,Ht,Wt,4) float32 in the rasterizer's layout: per texel centre, the barycentrics
    (u, v) in its triangle and triangle_id + 1 (0: no triangle covers the texel). No gradients.

    Cached (8 entries) per (uv, uv_triangles) object, their in-place version, size and backend,
    so a fixed UV layout is rasterized once.
    """
    _expect("uv", uv, "Vt", 2)
    _expect("uv_triangles", uv_triangles, "T", 3)
    raster = rasterizer or get_rasterizer("torch")
    size = (int(texture_size[0]), int(texture_size[1]))
    key = (id(uv), uv._version, id(uv_triangles), uv_triangles._version, size,
           getattr(raster, "name", type(raster).__name__), str(uv.device))
    cached = _UV_RAST_CACHE.get(key)
    if cached is not None and cached[0]() is uv and cached[1]() is uv_triangles:
        _UV_RAST_CACHE.move_to_end(key)
        return cached[2]
    with torch.no_grad(), torch.autocast(uv.device.type, enabled=False):
        flat = uv.detach().float() * 2 - 1  # ndc y = +1 (row 0) is v = 1, as in the texture layout
        pos = torch.cat([flat, torch.zeros_like(flat[:, :1]), torch.ones_like(flat[:, :1])], dim=1)
        rast = raster.rasterize(pos[None], uv_triangles, size)
    _UV_RAST_CACHE[key] = (weakref.ref(uv), weakref.ref(uv_triangles), rast)
    if len(_UV_RAST_CACHE) > _UV_RAST_CACHE_SIZE:
        _UV_RAST_CACHE.popitem(last=False)
    return rast


def unwrap(image: Tensor, clip: Tensor, triangles: Tensor, uv: Tensor, uv_triangles: Tensor,
           texture_size: tuple[int, int], *, rasterizer: Rasterizer | None = None,
           image_rast: Tensor | None = None, depth_tolerance: float = 0.01,
           cull_backfaces: bool = True) -> tuple[Tensor, Tensor]:
    """Unwrap an image into a UV texture through the projected mesh, visible surface only.

    image: (B,C,H,W) float32; clip: (B,V,4) the mesh's clip-space positions in that image;
    triangles: (T,3) vertex ids; uv: (Vt,2); uv_triangles: (T,3); texture_size: (Ht, Wt).
    rasterizer: a backend (default: the torch one). image_rast: the mesh's (B,H,W,4) rasterization
    at the image's resolution if the caller has it (e.g. ``RenderOutput.rast``), else it is made.
    depth_tolerance: how far behind the visible surface a point may lie and still count as
    visible, as a fraction of the mesh's z/w extent in that image (0.01 is about 2 mm for a head).
    cull_backfaces: texels on triangles facing away from the camera are not visible.

    Returns (texture, mask): texture (B,Ht,Wt,C), the image's bilinear sample at each texel's
    surface point, 0 where the mask is 0; mask (B,Ht,Wt,1) float, 1 where the texel lies on a
    triangle whose surface point projects inside the image, in front of the camera, onto a pixel
    the mesh covers, and is not hidden (see below). The texture is differentiable with respect to
    the image and the clip positions; the mask carries no gradients.

    Each texel's surface point comes from rasterizing the mesh in UV space (``uv_rasterize``)
    and interpolating ``clip`` with those barycentrics. It is hidden when the triangle that wins
    the pixel it lands in, extended as a plane to the point's exact screen position, lies nearer
    than the point by more than the tolerance: comparing depths at the same screen position keeps
    points on triangle borders and grazing slopes visible, where triangle ids and pixel-centre
    depths would disagree.
    """
    _expect("image", image, "B", "C", "H", "W")
    _expect("clip", clip, image.shape[0], "V", 4)
    _expect("triangles", triangles, "T", 3)
    _expect("uv_triangles", uv_triangles, triangles.shape[0], 3)
    if len(texture_size) != 2 or min(texture_size) < 1:
        raise ValueError(f"texture_size must be (Ht, Wt) positive, got {tuple(texture_size)}")
    batch, _, height, width = image.shape
    if image_rast is not None:
        _expect("image_rast", image_rast, batch, height, width, 4)
    raster = rasterizer or get_rasterizer("torch")
    with torch.autocast(image.device.type, enabled=False):
        image, clip = _float32(image), _float32(clip)
        uv_rast = uv_rasterize(uv, uv_triangles, texture_size, raster).expand(batch, -1, -1, -1)
        texel_clip = raster.interpolate(clip, uv_rast, triangles)  # (B,Ht,Wt,4), the texel's surface point
        w = texel_clip[..., 3]
        in_front = (uv_rast[..., 3] > 0) & (w > _MIN_W)
        ndc = texel_clip[..., :3] / torch.where(in_front, w, torch.ones_like(w))[..., None]
        if image_rast is None:
            image_rast = raster.rasterize(clip.detach(), triangles, (height, width))
        mask = _visible_texels(ndc.detach(), in_front, uv_rast[..., 3].long() - 1, clip.detach(),
                               triangles.long(), image_rast, depth_tolerance, cull_backfaces)
        grid = torch.stack([ndc[..., 0], -ndc[..., 1]], dim=-1)  # grid_sample's y runs down
        grid = torch.where(in_front[..., None], grid, torch.full_like(grid, -2.0))  # no NaNs off the mesh
        colours = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return colours.permute(0, 2, 3, 1) * mask, mask


def _visible_texels(ndc: Tensor, candidates: Tensor, texel_triangle: Tensor, clip: Tensor, triangles: Tensor,
                    image_rast: Tensor, depth_tolerance: float, cull_backfaces: bool) -> Tensor:
    """(B,Ht,Wt,1) float mask of the texels whose surface point (ndc (B,Ht,Wt,3)) is visible."""
    batch, height, width = image_rast.shape[:3]
    with torch.no_grad():
        pixels = ndc_to_pixels(ndc[..., :2], (height, width))
        inside = (candidates & (pixels[..., 0] >= 0) & (pixels[..., 0] < width)
                  & (pixels[..., 1] >= 0) & (pixels[..., 1] < height))
        b_index, row, col = torch.nonzero(inside, as_tuple=True)
        point, depth = pixels[b_index, row, col], ndc[b_index, row, col, 2]
        pixel = point.floor().long()
        occluder = image_rast[b_index, pixel[:, 1], pixel[:, 0], 3].long() - 1
        own = texel_triangle[b_index, row, col]

        vertex_ok = clip[..., 3] > _MIN_W
        vertex_ndc = clip[..., :3] / torch.where(vertex_ok, clip[..., 3], torch.ones_like(clip[..., 3]))[..., None]
        vertex_pixels = ndc_to_pixels(vertex_ndc[..., :2], (height, width))
        occluder_vertices = triangles[occluder.clamp_min(0)]  # (N,3)
        planes = _plane_coefficients(vertex_pixels[b_index[:, None], occluder_vertices],
                                     vertex_ndc[b_index[:, None], occluder_vertices, 2])
        depth_plane = planes[:, 3]  # the occluder's z/w as a x + b y + c over the screen
        surface = depth_plane[:, 0] * point[:, 0] + depth_plane[:, 1] * point[:, 1] + depth_plane[:, 2]
        # a degenerate winner (possible with other backends) falls back to the pixel-centre depth
        surface = torch.where(torch.isfinite(surface), surface, image_rast[b_index, pixel[:, 1], pixel[:, 0], 2])
        lowest = torch.where(vertex_ok, vertex_ndc[..., 2], torch.full_like(vertex_ndc[..., 2], float("inf"))).amin(1)
        highest = torch.where(vertex_ok, vertex_ndc[..., 2], torch.full_like(vertex_ndc[..., 2], -float("inf"))).amax(1)
        tolerance = depth_tolerance * (highest - lowest).clamp_min(0) + _DEPTH_EPSILON  # (B,)
        visible = (occluder >= 0) & (depth <= surface + tolerance[b_index])
        visible &= vertex_ok[b_index[:, None], triangles[own]].all(-1)
        if cull_backfaces:
            corners = vertex_ndc[b_index[:, None], triangles[own], :2]  # (N,3,2)
            visible &= _cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]) > 0
        mask = ndc.new_zeros(batch, *ndc.shape[1:3], 1)
        return mask.index_put((b_index, row, col), visible[:, None].to(mask.dtype))


def sample_texture(texture: Tensor, rast: Tensor, uv: Tensor, uv_triangles: Tensor,
                   rasterizer: Rasterizer | None = None) -> Tensor:
    """Texture colours at each pixel of a rasterized mesh: interpolate uv, then look up.

    texture: (B,Ht,Wt,C); rast: (B,H,W,4) from the rasterizer; uv: (Vt,2) or (B,Vt,2);
    uv_triangles: (T,3). Returns (B,H,W,C), bilinear, differentiable in the texture and in rast's
    barycentrics; 0 on background pixels.
    """
    _expect("rast", rast, "B", "H", "W", 4)
    _expect("texture", texture, rast.shape[0], "Ht", "Wt", "C")
    raster = rasterizer or get_rasterizer("torch")
    with torch.autocast(rast.device.type, enabled=False):
        pixel_uv = raster.interpolate(_float32(uv), rast, uv_triangles)
        covered = (rast[..., 3:4] > 0).to(pixel_uv.dtype)
        return raster.texture(_float32(texture), pixel_uv) * covered


def sample_at_vertices(texture: Tensor, uv: Tensor, rasterizer: Rasterizer | None = None) -> Tensor:
    """Texture colours at the UV vertices. texture: (B,Ht,Wt,C); uv: (Vt,2) or (B,Vt,2).
    Returns (B,Vt,C), bilinear (clamped at the texture border), differentiable in both."""
    _expect("texture", texture, "B", "Ht", "Wt", "C")
    if uv.ndim == 2:
        uv = uv.expand(texture.shape[0], -1, -1)
    _expect("uv", uv, texture.shape[0], "Vt", 2)
    raster = rasterizer or get_rasterizer("torch")
    with torch.autocast(texture.device.type, enabled=False):
        return raster.texture(_float32(texture), _float32(uv)[:, None])[:, 0]


def dilate_texture(texture: Tensor, mask: Tensor, texels: int = 2) -> tuple[Tensor, Tensor]:
    """Grow a masked texture by `texels` rings: each empty texel next to valid ones takes the mean
    of its valid 3x3 neighbours. Bilinear lookups near chart borders (UV seams, visibility edges)
    then no longer blend in empty texels.

    texture: (B,Ht,Wt,C); mask: (B,Ht,Wt,1) in {0,1}, e.g. from :func:`unwrap`.
    Returns (texture, mask) with the grown mask; original texels are unchanged; differentiable in
    the texture.
    """
    _expect("texture", texture, "B", "Ht", "Wt", "C")
    _expect("mask", mask, *texture.shape[:3], 1)
    colours, valid = texture.permute(0, 3, 1, 2), (mask.permute(0, 3, 1, 2) > 0).to(texture.dtype)
    for _ in range(texels):  # one ring per step
        weight = F.avg_pool2d(valid, 3, stride=1, padding=1)
        mean = F.avg_pool2d(colours * valid, 3, stride=1, padding=1) / weight.clamp_min(1e-12)
        colours = torch.where(valid > 0, colours, mean * (weight > 0))
        valid = (weight > 0).to(valid.dtype)
    return colours.permute(0, 2, 3, 1), valid.permute(0, 2, 3, 1)


def _expect(name: str, tensor: Tensor, *shape: int | str) -> None:
    """Raise a readable error unless ``tensor`` has ``shape``: ints are fixed sizes, strings name
    free ones."""
    if tensor.ndim != len(shape) or any(isinstance(s, int) and s != t for s, t in zip(shape, tensor.shape)):
        wanted = "(" + ",".join(str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
