"""Vertex-subset decimation on a synthetic mirror-symmetric surface, independent of the assets."""

from __future__ import annotations

import numpy as np

from facelab.facemodel.decimate import decimate
from facelab.facemodel.derive import mirror_map
from facelab.facemodel.geometry import boundary_loops, edge_counts


def dome(n: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """A symmetric height field z = 30 - r^2/40 on a (n,n) grid over [-30,30]^2 mm."""
    xs = np.linspace(-30, 30, n)
    x, y = np.meshgrid(xs, xs)
    vertices = np.stack([x.ravel(), y.ravel(), 30 - (x.ravel() ** 2 + y.ravel() ** 2) / 40], axis=1)
    ids = np.arange(n * n).reshape(n, n)
    a, b, c, d = ids[:-1, :-1].ravel(), ids[:-1, 1:].ravel(), ids[1:, 1:].ravel(), ids[1:, :-1].ravel()
    # split each cell along the diagonal that keeps the grid mirror-symmetric in x
    left = x[:-1, :-1].ravel() < 0
    triangles = np.concatenate([
        np.stack([a, b, c], 1)[left], np.stack([a, c, d], 1)[left],
        np.stack([a, b, d], 1)[~left], np.stack([b, c, d], 1)[~left],
    ])
    return vertices, triangles


def test_decimation_keeps_a_mirror_closed_subset_with_locked_vertices():
    vertices, triangles = dome()
    mirror = mirror_map(vertices)
    locked = np.array([0, 480, 15])  # a corner, the centre, the top middle
    result = decimate(vertices, triangles, target_vertices=240, mirror=mirror, locked=locked)
    kept = set(result.kept.tolist())
    assert abs(len(kept) - 240) <= 1
    assert {int(mirror[v]) for v in kept} == kept
    assert set(locked.tolist()) | {int(mirror[v]) for v in locked} <= kept
    # a manifold disc: every edge used once or twice, one boundary loop
    assert set(edge_counts(result.triangles).values()) <= {1, 2}
    assert len(boundary_loops(result.triangles)) == 1
    # orientation kept: every coarse triangle faces up like the dome
    corners = vertices[result.kept][result.triangles]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    assert (normals[:, 2] > 0).all()


def test_upsampling_is_exact_on_kept_vertices_and_close_elsewhere():
    vertices, triangles = dome()
    result = decimate(vertices, triangles, target_vertices=300, mirror=mirror_map(vertices))
    upsampled = result.upsample @ vertices[result.kept]
    np.testing.assert_allclose(upsampled[result.kept], vertices[result.kept], atol=1e-9)
    np.testing.assert_allclose(result.upsample.sum(axis=1), 1.0, atol=1e-9)
    assert np.linalg.norm(upsampled - vertices, axis=1).max() < 0.5  # mm on a gently curved dome
