"""Mesh utilities shared by the converters: edges, boundary loops, normals, Laplacians and
closest points on triangles. Plain numpy/scipy on one mesh (no batch dimension).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals. vertices: (V,3); triangles: (T,3) -> (V,3)."""
    corners = vertices[triangles]
    face_normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normals = np.zeros_like(vertices, dtype=np.float64)
    for column in range(3):
        np.add.at(normals, triangles[:, column], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def edge_counts(triangles: np.ndarray) -> dict[tuple[int, int], int]:
    """Number of triangles using each undirected edge (keys sorted (low, high))."""
    edges = np.sort(triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    return {(int(a), int(b)): int(c) for (a, b), c in zip(unique, counts)}


def boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """Closed loops of boundary edges (edges used by exactly one triangle), each an array of
    vertex ids in order, following the triangles' orientation. Raises on a non-manifold boundary."""
    directed = triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    counts = edge_counts(triangles)
    successor: dict[int, int] = {}
    for a, b in directed:
        if counts[(min(a, b), max(a, b))] == 1:
            if int(a) in successor:
                raise ValueError(f"vertex {a} has two outgoing boundary edges: non-manifold boundary")
            successor[int(a)] = int(b)
    loops = []
    while successor:
        start = next(iter(successor))
        loop, vertex = [start], successor.pop(start)
        while vertex != start:
            loop.append(vertex)
            vertex = successor.pop(vertex)
        loops.append(np.asarray(loop, dtype=np.int64))
    return loops


def adjacency(triangles: np.ndarray, num_vertices: int) -> sp.csr_matrix:
    """Symmetric 0/1 vertex adjacency matrix (V,V)."""
    edges = triangles[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    data = np.ones(len(edges) * 2)
    rows = np.concatenate([edges[:, 0], edges[:, 1]])
    cols = np.concatenate([edges[:, 1], edges[:, 0]])
    matrix = sp.coo_matrix((data, (rows, cols)), shape=(num_vertices, num_vertices)).tocsr()
    matrix.data[:] = 1.0
    return matrix


def cotangent_laplacian(vertices: np.ndarray, triangles: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Cotangent stiffness matrix L (V,V), positive semi-definite, and lumped (barycentric)
    vertex areas (V,). The generalised problem L x = lambda M x gives the mesh's vibration modes."""
    corners = vertices[triangles].astype(np.float64)
    num_vertices = len(vertices)
    rows, cols, weights = [], [], []
    areas = np.zeros(num_vertices)
    double_area = np.linalg.norm(
        np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1
    )
    for corner in range(3):
        i, j, k = corner, (corner + 1) % 3, (corner + 2) % 3
        edge_a = corners[:, j] - corners[:, i]
        edge_b = corners[:, k] - corners[:, i]
        cot = np.einsum("td,td->t", edge_a, edge_b) / np.maximum(double_area, 1e-12)
        # the angle at corner i weighs the opposite edge (j,k)
        rows += [triangles[:, j], triangles[:, k]]
        cols += [triangles[:, k], triangles[:, j]]
        weights += [0.5 * cot, 0.5 * cot]
        np.add.at(areas, triangles[:, i], double_area / 6.0)
    off = sp.coo_matrix(
        (-np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
        shape=(num_vertices, num_vertices),
    ).tocsr()
    laplacian = off - sp.diags(np.asarray(off.sum(axis=1)).ravel())
    return laplacian.tocsr(), areas


def closest_points_on_triangles(points: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closest point on each triangle to each point, vectorised.

    points: (N,3); corners: (N,3,3) one triangle per point.
    Returns barycentric coordinates (N,3) of the closest points and their squared distances (N,).
    """
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    ab, ac, ap = b - a, c - a, points - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp, cp = points - b, points - c
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    bary = np.zeros((len(points), 3))
    denominator = va + vb + vc
    safe = np.where(np.abs(denominator) > 1e-30, denominator, 1.0)
    bary[:, 1], bary[:, 2] = vb / safe, vc / safe
    bary[:, 0] = 1.0 - bary[:, 1] - bary[:, 2]
    # Regions outside the triangle, from the most specific (vertices) to edges; later masks win.
    edge_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    t = (d4 - d3) / np.where(edge_bc, (d4 - d3) + (d5 - d6), 1.0)
    bary[edge_bc] = np.stack([np.zeros_like(t), 1 - t, t], 1)[edge_bc]
    edge_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    t = d2 / np.where(edge_ac, d2 - d6, 1.0)
    bary[edge_ac] = np.stack([1 - t, np.zeros_like(t), t], 1)[edge_ac]
    edge_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    t = d1 / np.where(edge_ab, d1 - d3, 1.0)
    bary[edge_ab] = np.stack([1 - t, t, np.zeros_like(t)], 1)[edge_ab]
    for corner, mask in enumerate([(d1 <= 0) & (d2 <= 0), (d3 >= 0) & (d4 <= d3), (d6 >= 0) & (d5 <= d6)]):
        bary[mask] = np.eye(3)[corner]
    closest = np.einsum("nk,nkd->nd", bary, corners)
    return bary, np.sum((closest - points) ** 2, axis=1)


def project_to_surface(
    points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, candidates: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of a triangle mesh for each query point.

    Candidate triangles are those incident to the `candidates` nearest vertices, which is exact
    for reasonably uniform meshes and queries near the surface.
    Returns triangle ids (N,), barycentrics (N,3) and distances (N,).
    """
    points = np.asarray(points, np.float64)
    vertices = np.asarray(vertices, np.float64)
    incident = [[] for _ in range(len(vertices))]
    for tri_id, tri in enumerate(triangles):
        for vertex in tri:
            incident[vertex].append(tri_id)
    _, nearest = cKDTree(vertices).query(points, k=min(candidates, len(vertices)))
    nearest = np.atleast_2d(nearest)
    best_tri = np.zeros(len(points), np.int64)
    best_bary = np.zeros((len(points), 3))
    best_dist = np.full(len(points), np.inf)
    pairs_point, pairs_tri = [], []
    for index, row in enumerate(nearest):
        tris = {t for vertex in row for t in incident[vertex]}
        pairs_point += [index] * len(tris)
        pairs_tri += list(tris)
    pairs_point, pairs_tri = np.asarray(pairs_point), np.asarray(pairs_tri)
    bary, dist2 = closest_points_on_triangles(points[pairs_point], vertices[triangles[pairs_tri]])
    order = np.lexsort((dist2, pairs_point))
    first = np.unique(pairs_point[order], return_index=True)[1]
    chosen = order[first]
    best_tri[pairs_point[chosen]] = pairs_tri[chosen]
    best_bary[pairs_point[chosen]] = bary[chosen]
    best_dist[pairs_point[chosen]] = np.sqrt(dist2[chosen])
    return best_tri, best_bary, best_dist


def similarity_transform(source: np.ndarray, target: np.ndarray, weights: np.ndarray | None = None):
    """Least-squares similarity (scale s, rotation R, translation t) with target ~ s R source + t
    (Umeyama). source, target: (N,3). Returns (s, R (3,3), t (3,))."""
    weights = np.ones(len(source)) if weights is None else np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    mean_s = weights @ source
    mean_t = weights @ target
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = (centred_t * weights[:, None]).T @ centred_s
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(3)
    sign[2] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rotation = u @ np.diag(sign) @ vt
    variance = weights @ np.sum(centred_s**2, axis=1)
    scale = float(np.sum(singular * sign) / variance)
    translation = mean_t - scale * rotation @ mean_s
    return scale, rotation, translation


def _dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x, y)
