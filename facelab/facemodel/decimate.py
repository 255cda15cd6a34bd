"""Vertex-subset decimation that keeps mirror symmetry, and barycentric up-sampling.

A coarse level keeps a subset of the fine level's vertices (half-edge collapses: a vertex
merges into a neighbour that stays where it is), so every per-vertex basis of the coarse level
is an exact restriction of the fine one. Collapses are chosen by quadric error plus an
edge-length term (which keeps triangles even) and are applied in mirrored pairs (u -> v together
with mirror(u) -> mirror(v)), so the kept set is closed under the mirror map and every level has
an exact one. Boundary vertices only slide along their boundary; locked vertices (landmarks)
never go. The up-sampling matrix maps coarse values back to the fine vertices through the
barycentric coordinates of each fine vertex's closest point on the coarse mesh; the same
machinery builds the mesh hierarchy of the graph-convolution decoders.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .geometry import edge_counts, project_to_surface

MIN_NORMAL_COSINE = 0.3  # a collapse may not turn any triangle by more than ~73 degrees
MIN_QUALITY = 0.15  # 4*sqrt(3)*area / sum(edge^2): 1 for equilateral, 0 for degenerate
LENGTH_WEIGHT = 0.05  # weight of the squared edge length (mm^2) next to the quadric error


@dataclass
class Decimation:
    """kept: (Vc,) sorted fine-vertex ids; triangles: (Tc,3) int32 indexing kept;
    upsample: (Vf,Vc) sparse CSR matrix with rows summing to 1 (barycentric weights)."""

    kept: np.ndarray
    triangles: np.ndarray
    upsample: sp.csr_matrix


def decimate(vertices: np.ndarray, triangles: np.ndarray, target_vertices: int,
             mirror: np.ndarray | None = None, locked: np.ndarray | None = None) -> Decimation:
    """Reduce a triangle mesh to about `target_vertices` vertices (within one mirrored pair).

    vertices: (V,3); triangles: (T,3) consistently oriented; mirror: (V,) involution or None;
    locked: vertex ids that must survive. Raises if no more valid collapses exist before the target.
    """
    collapser = _Collapser(np.asarray(vertices, np.float64), np.asarray(triangles, np.int64),
                           mirror, locked)
    collapser.run(target_vertices)
    kept = np.flatnonzero(collapser.alive_vertex)
    remap = np.full(len(vertices), -1, np.int64)
    remap[kept] = np.arange(len(kept))
    coarse_triangles = remap[collapser.triangles[collapser.alive_triangle]].astype(np.int32)
    return Decimation(kept, coarse_triangles, upsampling_matrix(vertices, kept, coarse_triangles))


def upsampling_matrix(vertices: np.ndarray, kept: np.ndarray, coarse_triangles: np.ndarray) -> sp.csr_matrix:
    """(Vf,Vc) matrix of barycentric weights of each fine vertex's closest point on the coarse
    mesh; kept vertices map to themselves exactly."""
    tri, bary, _ = project_to_surface(vertices, vertices[kept], coarse_triangles)
    rows = np.repeat(np.arange(len(vertices)), 3)
    cols = coarse_triangles[tri].reshape(-1)
    weights = bary.reshape(-1)
    self_rows = np.zeros(len(vertices), bool)
    self_rows[kept] = True
    keep = ~self_rows[rows]
    rows = np.concatenate([rows[keep], kept])
    cols = np.concatenate([cols[keep], np.arange(len(kept))])
    weights = np.concatenate([weights[keep], np.ones(len(kept))])
    return sp.csr_matrix((weights, (rows, cols)), shape=(len(vertices), len(kept)))


class _Collapser:
    def __init__(self, vertices, triangles, mirror, locked):
        self.positions = vertices
        self.triangles = triangles.copy()
        self.mirror = np.arange(len(vertices)) if mirror is None else np.asarray(mirror)
        self.alive_vertex = np.zeros(len(vertices), bool)
        self.alive_vertex[np.unique(triangles)] = True
        self.alive_triangle = np.ones(len(triangles), bool)
        self.locked = np.zeros(len(vertices), bool)
        if locked is not None:
            self.locked[np.asarray(locked)] = True
            self.locked[self.mirror[np.asarray(locked)]] = True
        self.incident: list[set[int]] = [set() for _ in range(len(vertices))]
        for tri_id, tri in enumerate(triangles):
            for vertex in tri:
                self.incident[vertex].add(tri_id)
        counts = edge_counts(triangles)
        self.boundary_edges = {edge for edge, count in counts.items() if count == 1}
        self.boundary = np.zeros(len(vertices), bool)
        for a, b in self.boundary_edges:
            self.boundary[[a, b]] = True
        self.quadrics = self._initial_quadrics()
        self.stamp = np.zeros(len(vertices), np.int64)
        self.heap: list = []

    def _initial_quadrics(self) -> np.ndarray:
        corners = self.positions[self.triangles]
        normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        areas = np.linalg.norm(normals, axis=1, keepdims=True)
        normals = normals / np.maximum(areas, 1e-12)
        planes = np.concatenate([normals, -np.einsum("td,td->t", normals, corners[:, 0])[:, None]], 1)
        per_face = np.einsum("ti,tj->tij", planes, planes) * areas[:, :, None]
        quadrics = np.zeros((len(self.positions), 4, 4))
        for column in range(3):
            np.add.at(quadrics, self.triangles[:, column], per_face)
        # Boundary edges add a heavy plane through the edge, perpendicular to its triangle, so the
        # outline and the eye and mouth openings keep their shape.
        for a, b in self.boundary_edges:
            (tri_id,) = self.incident[a] & self.incident[b]
            normal = normals[tri_id]
            along = self.positions[b] - self.positions[a]
            side = np.cross(along, normal)
            side /= max(np.linalg.norm(side), 1e-12)
            plane = np.append(side, -side @ self.positions[a])
            weight = 10.0 * float(along @ along)
            quadrics[[a, b]] += weight * np.outer(plane, plane)
        return quadrics

    def neighbours(self, vertex: int) -> set[int]:
        return {int(v) for t in self.incident[vertex] for v in self.triangles[t]} - {vertex}

    def cost(self, source: int, target: int) -> float:
        point = np.append(self.positions[target], 1.0)
        quadric = self.quadrics[source] + self.quadrics[target]
        length = self.positions[target] - self.positions[source]
        return float(point @ quadric @ point + LENGTH_WEIGHT * length @ length)

    def push_around(self, vertex: int) -> None:
        for other in self.neighbours(vertex):
            for source, target in ((vertex, other), (other, vertex)):
                if self.locked[source]:
                    continue
                pair_cost = self.cost(source, target)
                mirrored = (self.mirror[source], self.mirror[target])
                if mirrored != (source, target):
                    pair_cost += self.cost(*mirrored)
                heapq.heappush(self.heap, (pair_cost, source, target, self.stamp[source], self.stamp[target]))

    def run(self, target_vertices: int) -> None:
        for vertex in np.flatnonzero(self.alive_vertex):
            self.push_around(int(vertex))
        alive = int(self.alive_vertex.sum())
        while alive > target_vertices:
            if not self.heap:
                raise RuntimeError(f"decimation stopped at {alive} vertices (target {target_vertices}): "
                                   "no valid collapse left")
            _, source, target, stamp_s, stamp_t = heapq.heappop(self.heap)
            if not (self.alive_vertex[source] and self.alive_vertex[target]):
                continue
            if stamp_s != self.stamp[source] or stamp_t != self.stamp[target]:
                continue
            mirrored_source, mirrored_target = int(self.mirror[source]), int(self.mirror[target])
            on_axis = mirrored_source == source
            if on_axis != (mirrored_target == target) or mirrored_source == target:
                continue  # would break symmetry
            if not self.valid(source, target):
                continue
            undo = self.collapse(source, target)
            if not on_axis:
                if not (self.alive_vertex[mirrored_source] and self.alive_vertex[mirrored_target]
                        and self.valid(mirrored_source, mirrored_target)):
                    self.restore(undo)
                    continue
                self.collapse(mirrored_source, mirrored_target)
                alive -= 1
            alive -= 1
            touched = {target, mirrored_target}
            for vertex in touched:
                self.stamp[vertex] += 1
                for other in self.neighbours(vertex):
                    self.stamp[other] += 1
            for vertex in touched | {n for v in touched for n in self.neighbours(v)}:
                self.push_around(vertex)

    def valid(self, source: int, target: int) -> bool:
        if self.locked[source]:
            return False
        shared = self.incident[source] & self.incident[target]
        if not shared:
            return False  # not an edge any more
        edge = (min(source, target), max(source, target))
        if self.boundary[source] and edge not in self.boundary_edges:
            return False  # boundary vertices only slide along the boundary
        if self.boundary[source] and self.boundary[target] and edge not in self.boundary_edges:
            return False
        opposite = {int(v) for t in shared for v in self.triangles[t]} - {source, target}
        if self.neighbours(source) & self.neighbours(target) != opposite:
            return False  # link condition: the collapse would pinch the surface
        for tri_id in self.incident[source] - shared:
            corners = self.positions[self.triangles[tri_id]]
            before = _normal(corners)
            moved = corners.copy()
            moved[self.triangles[tri_id] == source] = self.positions[target]
            after = _normal(moved)
            if before @ after < MIN_NORMAL_COSINE * np.linalg.norm(before) * np.linalg.norm(after):
                return False
            if _quality(moved) < MIN_QUALITY:
                return False
        return True

    def collapse(self, source: int, target: int) -> dict:
        """Merge source into target; returns what `restore` needs to undo it."""
        shared = self.incident[source] & self.incident[target]
        undo = {"source": source, "target": target, "removed": list(shared),
                "moved": list(self.incident[source] - shared), "quadric": self.quadrics[target].copy(),
                "boundary_edges": set(self.boundary_edges)}
        for tri_id in shared:
            self.alive_triangle[tri_id] = False
            for vertex in self.triangles[tri_id]:
                self.incident[vertex].discard(tri_id)
        for tri_id in undo["moved"]:
            self.triangles[tri_id][self.triangles[tri_id] == source] = target
            self.incident[target].add(tri_id)
        self.incident[source] = set()
        self.alive_vertex[source] = False
        self.quadrics[target] = self.quadrics[target] + self.quadrics[source]
        if self.boundary[source]:
            self.boundary_edges = {
                (min(a if a != source else target, b if b != source else target),
                 max(a if a != source else target, b if b != source else target))
                for a, b in self.boundary_edges if {a, b} != {source, target}
            }
        return undo

    def restore(self, undo: dict) -> None:
        source, target = undo["source"], undo["target"]
        for tri_id in undo["moved"]:
            self.triangles[tri_id][self.triangles[tri_id] == target] = source
            self.incident[target].discard(tri_id)
            self.incident[source].add(tri_id)
        for tri_id in undo["removed"]:
            self.alive_triangle[tri_id] = True
            for vertex in self.triangles[tri_id]:
                self.incident[vertex].add(tri_id)
        self.alive_vertex[source] = True
        self.quadrics[target] = undo["quadric"]
        self.boundary_edges = undo["boundary_edges"]


def _normal(corners: np.ndarray) -> np.ndarray:
    return np.cross(corners[1] - corners[0], corners[2] - corners[0])


def _quality(corners: np.ndarray) -> float:
    area = 0.5 * np.linalg.norm(_normal(corners))
    squared = sum(float(np.sum((corners[i] - corners[(i + 1) % 3]) ** 2)) for i in range(3))
    return 4.0 * np.sqrt(3.0) * area / max(squared, 1e-12)
