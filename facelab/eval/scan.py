"""Scan-to-mesh evaluation in the NoW protocol: the exact distance from points to a triangle mesh,
ICP of a point set onto a surface, and the landmark + ICP aligned scan-to-mesh error (median,
mean, std in the scan's units, mm for NoW). Reading scans lives in :mod:`facelab.eval.scan_io`."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from facelab.eval.metrics import similarity_transform


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator where the denominator is positive, else the numerator itself
    (0 wherever a caller keeps it), so that no inf or NaN enters the forward or backward pass."""
    return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))


def _closest_weights(d1: Tensor, d2: Tensor, ab_ab: Tensor, ac_ac: Tensor, ab_ac: Tensor) -> tuple[Tensor, Tensor]:
    """Weights (v, w) of the closest point a + v ab + w ac of triangle (a, b, c) to p, from
    d1 = ab.ap, d2 = ac.ap and the triangle's edge dot products (all broadcast together):
    Voronoi-region tests on the vertices, edges and interior (Ericson, Real-Time Collision
    Detection, 5.1.5), written with bp = ap - ab and cp = ap - ac."""
    d3, d4, d5, d6 = d1 - ab_ab, d2 - ab_ac, d1 - ab_ac, d2 - ac_ac  # ab.bp, ac.bp, ab.cp, ac.cp
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    total = va + vb + vc
    v, w = _ratio(vb, total), _ratio(vc, total)  # interior
    zero, one = torch.zeros_like(v), torch.ones_like(v)
    on_bc = _ratio(d4 - d3, (d4 - d3) + (d5 - d6))
    # in increasing priority: a later region overrides an earlier one
    regions = (
        ((va <= 0) & (d4 >= d3) & (d5 >= d6), 1 - on_bc, on_bc),  # edge bc
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), zero, _ratio(d2, d2 - d6)),  # edge ac
        ((d6 >= 0) & (d5 <= d6), zero, one),  # vertex c
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), _ratio(d1, d1 - d3), zero),  # edge ab
        ((d3 >= 0) & (d4 <= d3), one, zero),  # vertex b
        ((d1 <= 0) & (d2 <= 0), zero, zero),  # vertex a
    )
    for inside, region_v, region_w in regions:
        v, w = torch.where(inside, region_v, v), torch.where(inside, region_w, w)
    return v, w


def closest_points_on_triangles(points: Tensor, corners: Tensor) -> Tensor:
    """Closest point of each triangle to each point.

    points: (...,3) float; corners: (...,3,3) float, the corners (a, b, c) of each triangle,
    broadcast against points. Returns (...,3). A degenerate (zero-area) triangle yields a point
    on it, not necessarily the closest one."""
    if points.shape[-1] != 3 or corners.shape[-2:] != (3, 3):
        raise ValueError(f"expected points (...,3) and corners (...,3,3), got {tuple(points.shape)} and "
                         f"{tuple(corners.shape)}")
    a, b, c = corners.unbind(-2)
    ab, ac, ap = b - a, c - a, points - a
    v, w = _closest_weights((ab * ap).sum(-1), (ac * ap).sum(-1), (ab * ab).sum(-1), (ac * ac).sum(-1),
                            (ab * ac).sum(-1))
    return a + v[..., None] * ab + w[..., None] * ac


def _triangle_buckets(centroids: Tensor, size: int) -> Tensor:
    """Split triangles into spatially compact groups of at most `size` by recursive splits
    along the widest axis of their centroids, near the median. centroids: (F,3). Returns
    (K,size) triangle ids, K = ceil(F / size), a short group padded by repeating its first id."""
    groups, done = [torch.arange(len(centroids), device=centroids.device)], []
    while groups:
        group = groups.pop()
        if len(group) <= size:
            done.append(torch.cat([group, group[:1].expand(size - len(group))]))
            continue
        points = centroids[group]
        axis = int((points.amax(0) - points.amin(0)).argmax())
        order = group[points[:, axis].argsort()]
        half = size * math.ceil(math.ceil(len(order) / size) / 2)  # whole buckets on the left: few padded
        groups += [order[:half], order[half:]]
    return torch.stack(done)


class _Surface:
    """A triangle mesh prepared for closest-point queries: per-triangle corner a, edges ab, ac
    and their dot products, plus buckets of `bucket_size` nearby triangles with bounding
    spheres (centres (K,3), radii (K,))."""

    def __init__(self, vertices: Tensor, faces: Tensor, bucket_size: int):
        corners = vertices[faces]  # (F,3,3)
        a, ab, ac = corners[:, 0], corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
        dots = torch.stack([ab.square().sum(-1), ac.square().sum(-1), (ab * ac).sum(-1)], dim=-1)
        # one (12,F) table, gathered once per query; coordinate planes keep the arithmetic contiguous
        self.table = torch.cat([a, ab, ac, dots], dim=-1).T.contiguous()
        fixed = corners.detach()
        self.buckets = _triangle_buckets(fixed.mean(dim=1), bucket_size)  # (K,S)
        bucket_corners = fixed[self.buckets].reshape(len(self.buckets), -1, 3)
        self.centres = (bucket_corners.amin(1) + bucket_corners.amax(1)) / 2  # (K,3)
        self.radii = (bucket_corners - self.centres[:, None]).norm(dim=-1).amax(1)  # (K,)

    def bounds(self, points: Tensor) -> Tensor:
        """(n,3) -> (n,K) |p - centre| - radius, a lower bound of the distance from each point
        to any triangle of each bucket (they lie inside the bucket's bounding sphere)."""
        centre_distance = torch.cdist(points.detach(), self.centres, compute_mode="donot_use_mm_for_euclid_dist")
        return centre_distance - self.radii

    def closest(self, points: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """points (n,3), candidates (n,c) triangle ids -> squared distance (n,) and closest
        point (n,3) over the candidates."""
        table = self.table.index_select(1, candidates.reshape(-1)).view(-1, *candidates.shape)  # (12,n,c)
        ap = points.T[:, :, None] - table[0:3]  # (3,n,c)
        ab, ac = table[3:6], table[6:9]
        v, w = _closest_weights((ab * ap).sum(0), (ac * ap).sum(0), table[9], table[10], table[11])
        residual = ap - v * ab - w * ac  # p - closest, computed without cancellation
        squared = residual.square().sum(0)  # (n,c)
        best = squared.detach().argmin(dim=1, keepdim=True)
        offset = residual.gather(2, best.expand(3, -1, -1))[..., 0].T  # (n,3)
        return squared.gather(1, best)[:, 0], points - offset

    def query(self, points: Tensor, chunk: int, buckets: int) -> tuple[Tensor, Tensor]:
        """(N,3) -> distances (N,), closest points (N,3); see point_to_mesh_distance."""
        distances = points.new_empty(len(points))
        closest = points.new_empty(len(points), 3)
        everything = torch.arange(len(points), device=points.device)
        self._resolve(points, everything, min(buckets, len(self.buckets)), chunk * buckets, distances, closest)
        return distances, closest

    def _resolve(self, points: Tensor, todo: Tensor, count: int, budget: int, distances: Tensor,
                 closest: Tensor) -> None:
        """Fill distances[todo], closest[todo] testing the `count` buckets of lowest bound, in
        chunks of budget // count points; points whose answer a further bucket could still beat
        are retried with twice the buckets."""
        total = len(self.buckets)
        rows = max(1, budget // count)
        for start in range(0, len(todo), rows):
            part = todo[start:start + rows]
            order = self.bounds(points[part]).topk(min(count + 1, total), dim=1, largest=False)
            candidates = self.buckets[order.indices[:, :count]].reshape(len(part), -1)
            squared, near = self.closest(points[part], candidates)
            distances[part], closest[part] = squared.clamp_min(1e-30).sqrt(), near  # finite gradient at 0
            if count < total:
                retry = distances[part].detach() > order.values[:, count]  # a further bucket may hold a closer one
                if bool(retry.any()):
                    self._resolve(points, part[retry], min(2 * count, total), budget, distances, closest)


def _surface(vertices: Tensor, faces: Tensor, dtype: torch.dtype | None = None, bucket_size: int = 16) -> _Surface:
    """Check a mesh and prepare it for queries, in dtype (None: the vertices' float dtype)."""
    vertices = torch.as_tensor(vertices)
    faces = torch.as_tensor(faces, device=vertices.device)
    for name, value, letter in (("vertices", vertices, "V"), ("faces", faces, "F")):
        if value.ndim != 2 or value.shape[1] != 3:
            raise ValueError(f"{name} must be ({letter},3), got {tuple(value.shape)}")
    if len(faces) == 0 or faces.is_floating_point() or int(faces.min()) < 0 or int(faces.max()) >= len(vertices):
        raise ValueError(f"faces must be a non-empty integer (F,3) array of vertex ids in 0..{len(vertices) - 1}")
    if dtype is None:
        dtype = vertices.dtype if vertices.is_floating_point() else torch.float32
    return _Surface(vertices.to(dtype), faces.long(), bucket_size)


def point_to_mesh_distance(points: Tensor, vertices: Tensor, faces: Tensor, chunk: int = 2048,
                           bucket_size: int = 16, buckets: int = 8) -> tuple[Tensor, Tensor]:
    """Exact Euclidean distance from each point to the nearest triangle of a mesh.

    points: (N,3) float; vertices: (V,3) float, same units; faces: (F,3) int vertex ids.
    Returns distances (N,) and the closest surface points (N,3), in the promoted float dtype;
    differentiable with respect to points and vertices (the choice of triangle is not).

    Pruning, exact up to rounding: triangles are grouped into compact buckets of `bucket_size`
    (recursive splits of their centroids along the widest axis), each with a bounding sphere,
    so that |p - centre| - radius is a lower bound of the distance from p to any triangle of
    the bucket. Each point is first tested against every triangle of the `buckets` buckets of
    lowest bound; while the best distance found exceeds the bound of the next bucket, it is
    retried with twice as many buckets (at worst all of them). Points go in chunks of `chunk`
    (fewer as the bucket count grows), so a temporary holds about
    chunk * buckets * bucket_size * 3 floats. 50k points on an 18k-triangle face mesh take
    about 1.5 s on one CPU core."""
    points = torch.as_tensor(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be (N,3), got {tuple(points.shape)}")
    if chunk < 1 or bucket_size < 1 or buckets < 1:
        raise ValueError(f"chunk, bucket_size and buckets must be positive, got {chunk}, {bucket_size}, {buckets}")
    vertices = torch.as_tensor(vertices)
    dtype = torch.promote_types(points.dtype, vertices.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float32
    surface = _surface(vertices, faces, dtype, bucket_size)
    return surface.query(points.to(surface.table.device, dtype), chunk, buckets)


# alignment -----------------------------------------------------------------------------------

def icp(source: Tensor, target_vertices: Tensor, target_faces: Tensor,
        init: tuple[Tensor, Tensor, Tensor] | None = None, iterations: int = 50, scale: bool = True,
        trim: float | None = None, tolerance: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Align a point set onto a triangle surface: iterative closest points with a similarity.

    source: (N,3) float points; target_vertices: (V,3), target_faces: (F,3), the surface;
    init: (scale (), rotation (3,3), translation (3,)) starting guess (None: identity), e.g. from
    landmarks; scale: False keeps s = 1 (rigid ICP); trim: None or a fraction in [0,1) of the
    worst correspondences (largest distances) ignored each iteration, for partial overlap;
    tolerance: stop once the mean distance (input units) changes by less. Each iteration pairs
    every moved source point with its closest surface point and refits the whole transform from
    the original source (weighted Umeyama, metrics.similarity_transform).
    Returns scale (), rotation (3,3), translation (3,) float64 with target ~ s R source + t."""
    source = torch.as_tensor(source).double()
    if source.ndim != 2 or source.shape[1] != 3 or len(source) < 3:
        raise ValueError(f"source must be (N,3) with N >= 3, got {tuple(source.shape)}")
    if trim is not None and not 0.0 <= trim < 1.0:
        raise ValueError(f"trim must be a fraction in [0,1) of correspondences to drop, got {trim}")
    surface = _surface(torch.as_tensor(target_vertices).to(source.device), target_faces, torch.float64)
    if init is None:
        s, rotation, translation = source.new_tensor(1.0), torch.eye(3, dtype=torch.float64, device=source.device), \
            source.new_zeros(3)
    else:
        s, rotation, translation = (torch.as_tensor(part).double().to(source.device) for part in init)
        if s.numel() != 1 or rotation.shape != (3, 3) or translation.numel() != 3:
            raise ValueError(f"init must be (scale (), rotation (3,3), translation (3,)), got shapes "
                             f"{tuple(s.shape)}, {tuple(rotation.shape)}, {tuple(translation.shape)}")
        s, translation = s.reshape(()), translation.reshape(3)
    keep = len(source) if trim is None else max(3, math.ceil((1.0 - trim) * len(source)))
    previous = math.inf
    for _ in range(iterations):
        moved = s * source @ rotation.T + translation
        distance, closest = surface.query(moved, 2048, 8)
        weights = torch.ones_like(distance)
        if keep < len(source):
            weights[distance.topk(len(source) - keep).indices] = 0.0  # the worst correspondences
        current = float((weights * distance).sum() / keep)
        if abs(previous - current) < tolerance:
            break
        previous = current
        fit = similarity_transform(source[None], closest[None], weights[None], scale=scale)
        s, rotation, translation = (part[0] for part in fit)
    return s, rotation, translation


def scan_to_mesh_error(scan_points: Tensor, scan_landmarks: Tensor, mesh_vertices: Tensor, mesh_faces: Tensor,
                       mesh_landmarks: Tensor, icp_iterations: int = 50, crop_radius: float | None = None,
                       crop_centre: int | Tensor | None = None, scale: bool = True,
                       trim: float | None = None) -> dict:
    """Scan-to-mesh error of a predicted mesh in the NoW protocol.

    scan_points: (N,3) float, scan units (mm); scan_landmarks: (L,3) scan positions;
    mesh_vertices: (V,3) float, any units and frame; mesh_faces: (F,3) int; mesh_landmarks:
    (L,3) mesh positions corresponding to scan_landmarks, or (L,) int vertex ids.
    icp_iterations: 0 keeps the landmark alignment alone; crop_radius: keep only scan points
    within this distance of crop_centre (an index into scan_landmarks, or a (3,) point), as NoW
    crops scans to the face (facelab.eval.benchmarks.face_crop places NoW's sphere); crop_centre
    is required with crop_radius. scale/trim: as for icp (scale False: rigid ICP after the landmark similarity).

    The mesh is aligned to the scan with the landmark similarity (Umeyama), then refined by ICP
    of the scan points onto the aligned mesh surface, whose inverse moves the mesh; the error is
    the distance from every kept scan point to the final mesh surface. Returns {"median",
    "mean", "std" (population): float, scan units; "distances": (N',) float64; "aligned_vertices":
    (V,3) float64, the mesh in the scan frame; "kept": (N,) bool, the scan points used}."""
    points = torch.as_tensor(scan_points).double()
    scan_landmarks = torch.as_tensor(scan_landmarks).double()
    vertices = torch.as_tensor(mesh_vertices).double()
    mesh_landmarks = torch.as_tensor(mesh_landmarks)
    if not mesh_landmarks.is_floating_point():
        mesh_landmarks = vertices[mesh_landmarks.long()]
    mesh_landmarks = mesh_landmarks.double()
    for name, value in (("scan_points", points), ("scan_landmarks", scan_landmarks), ("mesh_vertices", vertices),
                        ("mesh_landmarks", mesh_landmarks)):
        if value.ndim != 2 or value.shape[1] != 3:
            raise ValueError(f"{name} must be (N,3), got {tuple(value.shape)}")
    if scan_landmarks.shape != mesh_landmarks.shape:
        raise ValueError(f"scan_landmarks {tuple(scan_landmarks.shape)} and mesh_landmarks "
                         f"{tuple(mesh_landmarks.shape)} must correspond one to one")
    kept = torch.ones(len(points), dtype=torch.bool)
    if crop_radius is not None:
        if crop_centre is None:
            raise ValueError("crop_radius needs crop_centre: a scan landmark index (e.g. the nose tip) or a (3,) point")
        is_index = isinstance(crop_centre, (int, np.integer))
        centre = scan_landmarks[int(crop_centre)] if is_index else torch.as_tensor(crop_centre).double()
        kept = (points - centre.reshape(3)).norm(dim=-1) <= crop_radius
        if int(kept.sum()) < 3:
            raise ValueError(f"only {int(kept.sum())} scan points lie within crop_radius={crop_radius} of the centre")
        points = points[kept]
    s, rotation, translation = (part[0] for part in similarity_transform(mesh_landmarks[None], scan_landmarks[None]))
    vertices = s * vertices @ rotation.T + translation
    s, rotation, translation = icp(points, vertices, mesh_faces, iterations=icp_iterations, scale=scale, trim=trim)
    vertices = (vertices - translation) @ rotation / s  # inverse of mesh ~ s R scan + t
    distances, _ = point_to_mesh_distance(points, vertices, mesh_faces)
    return {"median": float(distances.quantile(0.5)), "mean": float(distances.mean()),
            "std": float(distances.std(correction=0)), "distances": distances,
            "aligned_vertices": vertices, "kept": kept}
