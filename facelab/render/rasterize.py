"""The pure-PyTorch rasterizer backend, with nvdiffrast's contract.

Four primitives, composable into any renderer:

- ``rasterize(pos, tri, resolution) -> rast``: visibility by a vectorised z-buffer (no
  gradients), then perspective-correct barycentrics of the winning triangle recomputed
  differentiably from ``pos``, so gradients reach vertex positions through ``rast``.
- ``interpolate(attr, rast, tri)``: per-pixel attributes from per-vertex ones.
- ``texture(tex, uv)``: bilinear texture lookup.
- ``antialias(color, rast, pos, tri)``: blends colours across geometric (silhouette and
  occlusion) edges by the fraction of the pixel pair each side covers, which makes the image a
  continuous function of vertex positions and gives silhouettes their gradients.

Conventions: clip space as OpenGL (ndc = xyz / w in [-1, 1]); image row 0 is ndc y = +1 (top),
column 0 is ndc x = -1; pixel centres at +0.5. ``rast`` is (B,H,W,4) float32 =
(u, v, z/w, triangle_id + 1) with 0 meaning background, u and v the barycentric weights of the
triangle's second and third vertex. All math in float32 (float64 inputs stay float64, for
gradcheck) with autocast off. No Python loop runs over triangles or pixels.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from . import numba_ops
from .camera import ndc_to_pixels

_DEPTH_LEVELS = 2**31 - 1
_NO_HIT = torch.iinfo(torch.int64).max


KERNELS = ("auto", "torch", "numba")


def rasterize(pos: torch.Tensor, tri: torch.Tensor, resolution: tuple[int, int],
              kernels: str = "auto") -> torch.Tensor:
    """Rasterize triangles.

    pos: (B,V,4) float32 clip-space positions; tri: (T,3) int vertex ids (shared by the batch);
    resolution: (H, W); kernels: "torch" (these vectorised primitives, the reference), "numba"
    (the same primitives compiled, forward and backward, :mod:`facelab.render.numba_ops`; CPU)
    or "auto" (numba for CPU tensors when it imports; the same for every primitive below).
    Returns rast (B,H,W,4) float32 (see module docstring); its u, v and z/w are differentiable
    with respect to pos. Triangles with a vertex at w <= 0 are not drawn.
    """
    _check(pos, tri)
    with torch.autocast(pos.device.type, enabled=False):
        pos = _full_precision(pos)
        tri = tri.long()
        height, width = resolution
        if _use_numba(kernels, pos):
            return numba_ops.rasterize(pos, tri, (height, width))
        # visibility carries no gradients: under forward-mode AD it can still run compiled
        triangle_ids = visible_triangles(pos.detach(), tri, height, width, "torch" if kernels == "torch" else "auto")
        return _barycentrics(pos, tri, triangle_ids, height, width)


def visible_triangles(pos: torch.Tensor, tri: torch.Tensor, height: int, width: int,
                      kernels: str = "torch") -> torch.Tensor:
    """Nearest triangle id per pixel (B,H,W) int64, -1 for background. No gradients.

    Each triangle's bounding box gives candidate pixels; the triangle's three edge functions and
    its screen-space depth plane, packed in one row per triangle, test each candidate (one
    gather per candidate); a ``scatter_reduce(amin)`` over keys packing quantised depth above
    the triangle id resolves visibility (ties go to the lower id). ``kernels="numba"`` runs the
    same arithmetic in a compiled loop and gives the same ids.
    """
    batch = pos.shape[0]
    if _use_numba(kernels, pos):
        return numba_ops.visible_triangles(pos.detach(), tri, height, width).to(pos.device)
    with torch.no_grad():
        screen, depth, valid = _screen(pos, height, width)  # (B,V,2), (B,V), (B,V)
        corners = screen[:, tri].reshape(-1, 3, 2)  # (B*T,3,2)
        corner_depth = depth[:, tri].reshape(-1, 3)
        planes = _plane_coefficients(corners, corner_depth)  # (B*T,4,3): 3 edges + depth, as (a, b, c)
        drawable = valid[:, tri].all(dim=-1).reshape(-1) & torch.isfinite(planes).all(dim=(1, 2))
        lo = torch.ceil(corners.amin(dim=1) - 0.5).clamp_min(0)
        hi = torch.floor(corners.amax(dim=1) - 0.5)
        hi = torch.minimum(hi, hi.new_tensor([width - 1, height - 1]))
        extent = (hi - lo + 1).clamp_min(0).long()  # (B*T,2) columns, rows
        count = torch.where(drawable, extent[:, 0] * extent[:, 1], 0)
        flat_triangle = torch.repeat_interleave(torch.arange(count.numel(), device=pos.device), count)
        first = torch.cumsum(count, 0) - count
        local = torch.arange(flat_triangle.numel(), device=pos.device) - first[flat_triangle]
        box = torch.stack([lo[:, 0].long(), lo[:, 1].long(), extent[:, 0]], dim=1)[flat_triangle]
        x = box[:, 0] + local % box[:, 2]
        y = box[:, 1] + torch.div(local, box[:, 2], rounding_mode="floor")
        coefficients = planes.reshape(-1, 12)[flat_triangle].reshape(-1, 4, 3)
        values = coefficients[..., 0] * (x[:, None] + 0.5) + coefficients[..., 1] * (y[:, None] + 0.5) + coefficients[..., 2]
        inside = (values[:, :3] >= 0).all(-1) & (values[:, 3].abs() <= 1)
        flat_triangle, x, y, depth_at = flat_triangle[inside], x[inside], y[inside], values[inside, 3]
        image = torch.div(flat_triangle, tri.shape[0], rounding_mode="floor")
        triangle = flat_triangle - image * tri.shape[0]
        quantised = ((depth_at + 1) * 0.5 * _DEPTH_LEVELS).long().clamp(0, _DEPTH_LEVELS)
        keys = torch.full((batch * height * width,), _NO_HIT, dtype=torch.int64, device=pos.device)
        keys.scatter_reduce_(0, (image * height + y) * width + x, (quantised << 32) | triangle, "amin")
        ids = torch.where(keys == _NO_HIT, -1, keys & 0xFFFFFFFF)
        return ids.reshape(batch, height, width)


def _use_numba(kernels: str, *tensors: torch.Tensor) -> bool:
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    if kernels == "torch":
        return False
    if kernels == "numba":
        if not numba_ops.supports(*tensors):
            raise ValueError("kernels='numba' runs on CPU float32/float64 tensors; use 'torch' or 'auto' for "
                             + ", ".join(sorted({f"{t.device.type} {t.dtype}" for t in tensors})))
        if not numba_ops.available():
            raise RuntimeError("kernels='numba' needs the numba package (pip install numba), or use kernels='torch'")
        return True
    # the compiled Functions have no forward-mode rule: dual tensors take the reference
    return numba_ops.supports(*tensors) and numba_ops.available() and not _any_dual(tensors)


def _any_dual(tensors) -> bool:
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _plane_coefficients(corners: torch.Tensor, corner_depth: torch.Tensor) -> torch.Tensor:
    """Per triangle, (a, b, c) with f(x, y) = a x + b y + c for its three barycentric weights
    (non-negative inside, any winding) and for its screen-space-linear depth. (N,4,3); rows of
    degenerate triangles are inf."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area = _cross(b - a, c - a)
    inverse = 1.0 / torch.where(area.abs() > 1e-12, area, torch.zeros_like(area))

    def weight(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        # cross(end - start, p - start) / area, linear in p = (x, y)
        edge = end - start
        return torch.stack([-edge[:, 1], edge[:, 0], edge[:, 1] * start[:, 0] - edge[:, 0] * start[:, 1]], 1) * inverse[:, None]

    weights = torch.stack([weight(b, c), weight(c, a), weight(a, b)], dim=1)  # (N,3,3)
    depth = (weights * corner_depth[:, :, None]).sum(dim=1)  # (N,3)
    return torch.cat([weights, depth[:, None]], dim=1)


def _barycentrics(pos, tri, triangle_ids, height, width) -> torch.Tensor:
    batch = pos.shape[0]
    hit = triangle_ids >= 0
    b_index, y, x = torch.nonzero(hit, as_tuple=True)
    corners_clip = pos[b_index[:, None], tri[triangle_ids[hit]]]  # (N,3,4)
    w = corners_clip[..., 3]
    screen = ndc_to_pixels(corners_clip[..., :2] / w[..., None], (height, width))
    planes = _plane_coefficients(screen, corners_clip[..., 2] / w)  # winners are never degenerate
    centre = torch.stack([x, y], dim=-1).to(pos.dtype) + 0.5
    at_centre = planes[..., 0] * centre[:, :1] + planes[..., 1] * centre[:, 1:] + planes[..., 2]
    linear, depth = at_centre[:, :3], at_centre[:, 3]  # screen-space barycentrics, z/w
    perspective = linear / w
    perspective = perspective / perspective.sum(-1, keepdim=True)
    values = torch.stack([perspective[:, 1], perspective[:, 2], depth,
                          (triangle_ids[hit] + 1).to(pos.dtype)], dim=-1)
    rast = pos.new_zeros(batch, height, width, 4)
    return rast.index_put((b_index, y, x), values)


def interpolate(attr: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """Per-pixel attributes. attr: (B,V,C), (1,V,C) or (V,C) float32; rast: (B,H,W,4); tri: (T,3).
    Returns (B,H,W,C), zero on background; differentiable in attr and in rast's u, v."""
    with torch.autocast(rast.device.type, enabled=False):
        batch, height, width, _ = rast.shape
        attr = _full_precision(attr)
        if _use_numba(kernels, attr, rast):
            return numba_ops.interpolate(attr, rast, tri)
        if attr.ndim == 2:
            attr = attr.expand(batch, -1, -1)
        triangle_ids = rast[..., 3].long() - 1
        hit = triangle_ids >= 0
        b_index, y, x = torch.nonzero(hit, as_tuple=True)
        corner_values = attr[b_index[:, None], tri.long()[triangle_ids[hit]]]  # (N,3,C)
        u, v = rast[b_index, y, x, 0:1], rast[b_index, y, x, 1:2]
        values = (1 - u - v) * corner_values[:, 0] + u * corner_values[:, 1] + v * corner_values[:, 2]
        out = attr.new_zeros(batch, height, width, attr.shape[-1])
        return out.index_put((b_index, y, x), values)


def texture(tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup. tex: (B,Ht,Wt,C) with row 0 at v = 1 (image layout of a UV map whose
    origin is bottom-left); uv: (B,H,W,2) in [0,1]. Returns (B,H,W,C), clamped at the borders."""
    with torch.autocast(uv.device.type, enabled=False):
        grid = _full_precision(torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1))
        sampled = F.grid_sample(_full_precision(tex).permute(0, 3, 1, 2).to(grid.dtype), grid, mode="bilinear",
                                padding_mode="border", align_corners=False)
        return sampled.permute(0, 2, 3, 1)


def antialias(color: torch.Tensor, rast: torch.Tensor, pos: torch.Tensor, tri: torch.Tensor,
              kernels: str = "auto") -> torch.Tensor:
    """Blend colours across silhouette edges. color: (B,H,W,C); rast: from ``rasterize``;
    pos: (B,V,4) clip positions; tri: (T,3). Returns (B,H,W,C).

    A silhouette edge is a mesh edge with one drawn triangle (a boundary, or a neighbour that is
    not drawn) or with drawn triangles facing opposite ways on screen; interior edges of a
    continuous surface are left alone, as nvdiffrast does. For each horizontally or vertically
    adjacent pixel pair with different triangles, the nearer one's triangle ("front") is
    followed along the segment between the two centres to the edge where it ends, at fraction
    t. If that edge is a silhouette edge, the pixel on the far side takes (t - 0.5) of the front
    colour when t > 0.5, and the front pixel takes (0.5 - t) of the other colour when t < 0.5.
    t depends differentiably on the front triangle's vertices.
    """
    with torch.autocast(color.device.type, enabled=False):
        color = _full_precision(color)
        if _use_numba(kernels, color, rast, pos):
            return numba_ops.antialias(color, rast, pos, tri)
        batch, height, width, _ = color.shape
        tri = tri.long()
        screen = ndc_to_pixels(pos[..., :2] / pos[..., 3:4], (height, width))  # (B,V,2), differentiable
        silhouette = _silhouette_edges(screen.detach(), pos[..., 3].detach() > 1e-8, tri)  # (B,T,3)
        ids = rast[..., 3].long() - 1
        depth = rast[..., 2].detach()
        has_silhouette = silhouette.any(dim=-1)
        on_silhouette = torch.where(ids >= 0, has_silhouette.gather(1, ids.clamp_min(0).reshape(batch, -1))
                                    .reshape(ids.shape), False)
        delta = torch.zeros_like(color)
        for axis in (1, 2):  # rows (vertical pairs), then columns (horizontal pairs)
            size = (height, width)[axis - 1]
            first = [slice(None)] * 3
            second = [slice(None)] * 3
            first[axis], second[axis] = slice(0, size - 1), slice(1, size)
            first, second = tuple(first), tuple(second)
            id_a, id_b = ids[first], ids[second]
            a_front = (id_a >= 0) & ((id_b < 0) | (depth[first] < depth[second]))
            candidate = (id_a != id_b) & torch.where(a_front, on_silhouette[first], on_silhouette[second])
            b_index, row, col = torch.nonzero(candidate, as_tuple=True)
            a_is_front = a_front[b_index, row, col]
            step = torch.zeros(len(b_index), 2, dtype=torch.long, device=color.device)
            step[:, 2 - axis] = 1  # (dx, dy) from a to b
            pixel_a = torch.stack([col, row], -1)
            pixel_front = torch.where(a_is_front[:, None], pixel_a, pixel_a + step)
            pixel_other = torch.where(a_is_front[:, None], pixel_a + step, pixel_a)
            front_id = ids[b_index, pixel_front[:, 1], pixel_front[:, 0]]
            corners = screen[b_index[:, None], tri[front_id]]  # (N,3,2)
            t, edge = _exit_fraction(corners, pixel_front.to(color.dtype) + 0.5, pixel_other.to(color.dtype) + 0.5)
            keep = torch.isfinite(t) & silhouette[b_index, front_id, edge]
            t = torch.where(keep, t, torch.full_like(t, 0.5))
            front_color = color[b_index, pixel_front[:, 1], pixel_front[:, 0]]
            other_color = color[b_index, pixel_other[:, 1], pixel_other[:, 0]]
            spill = (t - 0.5)[:, None]
            delta = delta.index_put((b_index, pixel_other[:, 1], pixel_other[:, 0]),
                                    spill.clamp_min(0) * (front_color - other_color), accumulate=True)
            delta = delta.index_put((b_index, pixel_front[:, 1], pixel_front[:, 0]),
                                    (-spill).clamp_min(0) * (other_color - front_color), accumulate=True)
        return color + delta


def _exit_fraction(corners: torch.Tensor, start: torch.Tensor, end: torch.Tensor):
    """Where the segment start -> end leaves the triangle: fraction t (N,) (inf if it does not
    within the segment) and the index (N,) of the edge it crosses (edge k joins corners k, k+1)."""
    area = _cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    orientation = torch.sign(area)[:, None]
    origin = corners
    direction = corners.roll(-1, dims=1) - corners  # edge k: corner k -> k+1
    e_start = orientation * _cross(direction, start[:, None] - origin)
    e_end = orientation * _cross(direction, end[:, None] - origin)
    crossing = (e_start >= 0) & (e_end < 0)
    fraction = e_start / torch.where(crossing, e_start - e_end, torch.ones_like(e_start))
    fraction = torch.where(crossing, fraction, torch.full_like(fraction, float("inf")))
    t, edge = fraction.min(dim=1)
    return t, edge


def _silhouette_edges(screen: torch.Tensor, valid: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(B,T,3) bool: whether edge k (corners k -> k+1) of each triangle is a silhouette edge in
    each image: fewer than two drawn triangles on it, or drawn triangles of both screen windings.
    screen: (B,V,2) pixels; valid: (B,V) w > 0; tri: (T,3) long."""
    edge_of_corner, edge_count = _edge_ids(tri)
    corners = screen[:, tri]  # (B,T,3,2)
    winding = _cross(corners[:, :, 1] - corners[:, :, 0], corners[:, :, 2] - corners[:, :, 0])
    drawn = valid[:, tri].all(dim=-1) & (winding != 0)
    forward = (drawn & (winding > 0)).to(torch.int32)
    batch = screen.shape[0]
    index = edge_of_corner.reshape(1, -1).expand(batch, -1)
    per_corner = lambda flags: flags[:, :, None].expand(-1, -1, 3).reshape(batch, -1)  # noqa: E731
    drawn_count = torch.zeros(batch, edge_count, dtype=torch.int32, device=screen.device)
    drawn_count.scatter_add_(1, index, per_corner(drawn.to(torch.int32)))
    forward_count = torch.zeros_like(drawn_count).scatter_add_(1, index, per_corner(forward))
    drawn_edge, forward_edge = drawn_count.gather(1, index), forward_count.gather(1, index)
    mixed = (forward_edge > 0) & (forward_edge < drawn_edge)
    return ((drawn_edge < 2) | mixed).reshape(batch, -1, 3)


_EDGE_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _edge_ids(tri: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Undirected edge id of each triangle edge (T,3) (edge k joins corners k, k+1), and the
    number of edges. Cached per triangle tensor, since a mesh's topology does not change."""
    key = (tri.data_ptr(), tuple(tri.shape), tri.device, tri._version)
    cached = _EDGE_CACHE.get(key)
    if cached is not None and torch.equal(cached[0], tri):
        return cached[1], cached[2]
    start, end = tri, tri.roll(-1, dims=1)
    vertex_count = int(tri.max()) + 1 if tri.numel() else 1
    packed = torch.minimum(start, end) * vertex_count + torch.maximum(start, end)
    unique, edge_of_corner = torch.unique(packed.reshape(-1), return_inverse=True)
    if len(_EDGE_CACHE) > 16:
        _EDGE_CACHE.clear()
    _EDGE_CACHE[key] = (tri.clone(), edge_of_corner.reshape(tri.shape), unique.numel())
    return edge_of_corner.reshape(tri.shape), unique.numel()


def _screen(pos, height, width):
    w = pos[..., 3]
    valid = w > 1e-8
    safe_w = torch.where(valid, w, torch.ones_like(w))
    ndc = pos[..., :3] / safe_w[..., None]
    return ndc_to_pixels(ndc[..., :2], (height, width)), ndc[..., 2], valid


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]


def _full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 (gradcheck) stay as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _check(pos: torch.Tensor, tri: torch.Tensor) -> None:
    if pos.ndim != 3 or pos.shape[-1] != 4:
        raise ValueError(f"pos must be (B,V,4) clip-space positions, got {tuple(pos.shape)}")
    if tri.ndim != 2 or tri.shape[-1] != 3:
        raise ValueError(f"tri must be (T,3) vertex ids, got {tuple(tri.shape)}")
    if tri.numel() and (int(tri.min()) < 0 or int(tri.max()) >= pos.shape[1]):
        raise ValueError(f"tri indexes vertices outside 0..{pos.shape[1] - 1}")
