"""Dense landmarks: the 478 MediaPipe FaceMesh points embedded on a face model's surface, and
the map from those points to the 68 iBUG landmarks.

The embedding registers MediaPipe's canonical face mesh (Apache-2.0, 468 vertices, 1:1 with
FaceMesh's landmarks) to the model's mean shape: a similarity on the inner-face landmarks, then a
smooth non-rigid deformation (Laplacian-regularised, pulled to the surface and to the 68
landmark vertices), then each point is projected to its closest surface point (triangle +
barycentric). The 10 iris points (468..477) have no counterpart on a face mesh without eyeballs:
they are embedded at the eye-opening centre projected to the eyelid rim and flagged invalid.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .geometry import adjacency, project_to_surface, similarity_transform

NUM_DENSE = 478
NUM_CANONICAL = 468

# FaceMesh point index for each iBUG 68 landmark (jaw, brows, nose, eyes, lips; subject's right
# side first, as in iBUG). Jaw points follow FaceMesh's face oval, which lies inside the iBUG jaw
# contour: the registration below pulls them onto it.
MEDIAPIPE_TO_68 = np.array([
    127, 234, 132, 58, 172, 150, 149, 148, 152, 377, 378, 379, 397, 288, 361, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
])
# FaceMesh eye contours (upper and lower lid), used to place the iris points.
RIGHT_EYE_RING = np.array([33, 246, 161, 160, 159, 158, 157, 173, 133, 155, 154, 153, 145, 144, 163, 7])
LEFT_EYE_RING = np.array([263, 466, 388, 387, 386, 385, 384, 398, 362, 382, 381, 380, 374, 373, 390, 249])


def embed_dense_landmarks(
    canonical: np.ndarray,
    canonical_triangles: np.ndarray,
    vertices: np.ndarray,
    triangles: np.ndarray,
    landmarks_68: np.ndarray,
    iterations: int = 12,
) -> dict[str, np.ndarray]:
    """Embed the MediaPipe points on a mesh.

    canonical: (468,3) canonical FaceMesh vertices (any unit); canonical_triangles: (F,3);
    vertices: (V,3) mm, model space; triangles: (T,3); landmarks_68: (68,) vertex ids.
    Returns ``dense_triangles`` (478,) int32, ``dense_barycentric`` (478,3) float32,
    ``dense_valid`` (478,) bool, and ``dense_registered`` (468,3): the registered canonical points
    before projection (so callers can measure how far the registration left them from the surface).
    """
    canonical = np.asarray(canonical, np.float64)
    vertices = np.asarray(vertices, np.float64)
    inner_face = np.arange(17, 68)  # the jaw contour differs between the two conventions
    scale, rotation, translation = similarity_transform(
        canonical[MEDIAPIPE_TO_68[inner_face]], vertices[landmarks_68[inner_face]]
    )
    points = canonical @ (scale * rotation).T + translation
    points = _register(points, canonical_triangles, vertices, triangles, landmarks_68, iterations)
    tri, bary, _ = project_to_surface(points, vertices, triangles)

    iris = []
    for ring in (RIGHT_EYE_RING, LEFT_EYE_RING):
        iris += [points[ring].mean(axis=0)] * 5
    iris_tri, iris_bary, _ = project_to_surface(np.asarray(iris), vertices, triangles)
    return {
        "dense_triangles": np.concatenate([tri, iris_tri]).astype(np.int32),
        "dense_barycentric": np.concatenate([bary, iris_bary]).astype(np.float32),
        "dense_valid": np.arange(NUM_DENSE) < NUM_CANONICAL,
        "dense_registered": points.astype(np.float32),
    }


def _register(points, point_triangles, vertices, triangles, landmarks_68, iterations):
    """Non-rigid ICP of a small mesh onto a surface: per iteration solve, per coordinate,
    min w_s |L d|^2 + w_c |p + d - c|^2 + w_l |p_k + d_k - l_k|^2 with c the current closest
    surface points and l the 68 landmark targets; the smoothness weight decays over iterations."""
    count = len(points)
    graph = adjacency(np.asarray(point_triangles), count)
    degree = np.asarray(graph.sum(axis=1)).ravel()
    laplacian = sp.diags(degree) - graph  # umbrella operator; its null space is translation
    select = sp.csr_matrix(
        (np.ones(68), (np.arange(68), MEDIAPIPE_TO_68)), shape=(68, count)
    )
    targets = vertices[landmarks_68]
    current = points.copy()
    for step in range(iterations):
        smooth = 50.0 * 0.6**step + 1.0
        tri, bary, _ = project_to_surface(current, vertices, triangles)
        closest = np.einsum("nk,nkd->nd", bary, vertices[triangles[tri]])
        system = (smooth * laplacian.T @ laplacian + sp.identity(count) + 20.0 * select.T @ select).tocsc()
        rhs = smooth * laplacian.T @ laplacian @ points + closest + 20.0 * select.T @ targets
        solve = spla.factorized(system)
        current = np.stack([solve(rhs[:, axis]) for axis in range(3)], axis=1)
    return current


def dense_points(vertices: np.ndarray, triangles: np.ndarray, dense_triangles: np.ndarray,
                 dense_barycentric: np.ndarray) -> np.ndarray:
    """Positions of embedded points: vertices (V,3), triangles (T,3), ids (N,), barycentrics (N,3) -> (N,3)."""
    return np.einsum("nk,nkd->nd", dense_barycentric, vertices[triangles[dense_triangles]])
