"""Quantities the converter derives from a face mesh and its 68 landmark vertices: the mirror
map, the region masks and the inner-mouth loop. They only need the mean shape, so they work for
any model in facelab's format (ICT, BFM, FLAME) whose model space follows the conventions:
+x to the subject's left, +y up, +z out of the face, millimetres.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from .geometry import boundary_loops, vertex_normals

# iBUG 68: the index of each landmark's mirror partner (a horizontal flip of the face).
IBUG_MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 16, -1))  # brows
    + [27, 28, 29, 30, 35, 34, 33, 32, 31]  # nose bridge, nostrils
    + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)

# Regions that partition the face (every vertex in exactly one) and descriptive ones that overlap.
DISJOINT_REGIONS = ("skin", "brows", "eyes", "lips", "inner_mouth", "nostrils")
OVERLAPPING_REGIONS = ("nose", "jaw_contour")


def mirror_map(vertices: np.ndarray, tolerance_mm: float = 1.0) -> np.ndarray:
    """Vertex id of each vertex's mirror image under x -> -x, as an exact involution.

    Nearest neighbours of the reflected mean give the map; vertices where that is not mutual
    are matched by a minimum-cost assignment. Raises when a matched pair lies further apart than
    `tolerance_mm` (the mesh is not symmetric enough for a mirror map).
    """
    reflected = vertices * np.array([-1.0, 1.0, 1.0])
    distance, mirror = cKDTree(vertices).query(reflected)
    ids = np.arange(len(vertices))
    unsure = ids[mirror[mirror] != ids]
    if len(unsure):
        cost = np.linalg.norm(reflected[unsure][:, None] - vertices[unsure][None], axis=-1)
        rows, cols = linear_sum_assignment(cost)
        mirror[unsure[rows]] = unsure[cols]
        distance[unsure[rows]] = cost[rows, cols]
    if not np.array_equal(mirror[mirror], ids):
        raise ValueError("the mirror map is not an involution; is the mesh left-right symmetric?")
    if distance.max() > tolerance_mm:
        raise ValueError(f"mirror partners up to {distance.max():.2f} mm apart (> {tolerance_mm} mm)")
    return mirror.astype(np.int64)


def inner_mouth_loop(triangles: np.ndarray, vertices: np.ndarray, landmarks_68: np.ndarray) -> np.ndarray:
    """The boundary loop that forms the lips' inner contour: of all boundary loops of the mesh,
    the one nearest to the inner-lip landmarks 60..67 (vertex ids, in loop order)."""
    inner_lips = vertices[landmarks_68[60:68]]
    loops = boundary_loops(triangles)
    if not loops:
        raise ValueError("the mesh has no boundary loop, so no open mouth to close")

    def distance(loop: np.ndarray) -> float:
        return float(cKDTree(vertices[loop]).query(inner_lips)[0].mean())

    return min(loops, key=distance)


def region_masks(vertices: np.ndarray, triangles: np.ndarray, landmarks_68: np.ndarray,
                 mouth_loop: np.ndarray, mirror: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Boolean (V,) masks of the face regions, from landmark polygons in the frontal (x,y)
    projection of the mean shape, restricted to front-facing vertices where needed.

    Partition (DISJOINT_REGIONS): eyes (eye contours, dilated 2 mm), brows (a 5 mm band along
    the brow landmarks), inner_mouth (the lips' inner contour loop and what lies inside the
    inner-lip polygon), lips (inside the outer-lip polygon), nostrils (downward-facing vertices
    under the nose), skin (all the rest). Overlapping: nose (bridge to alae), jaw_contour (within
    6 mm of the 17 jaw landmarks' polyline). With a mirror map every mask is made symmetric
    (a vertex is in a region when it or its mirror partner is).
    """
    landmarks = vertices[landmarks_68]
    planar, planar_landmarks = vertices[:, :2], landmarks[:, :2]
    normals = vertex_normals(vertices, triangles)
    front = normals[:, 2] > 0.0

    def polygon(ids, dilate: float = 0.0) -> np.ndarray:
        ring = planar_landmarks[list(ids)]
        return _inside_polygon(planar, ring) | (_distance_to_polyline(planar, ring, closed=True) <= dilate)

    eyes = (polygon(range(36, 42), 2.0) | polygon(range(42, 48), 2.0)) & front
    brows = (
        (_distance_to_polyline(planar, planar_landmarks[17:22]) <= 5.0)
        | (_distance_to_polyline(planar, planar_landmarks[22:27]) <= 5.0)
    ) & front
    inner_mouth = polygon(range(60, 68), 0.5)
    inner_mouth[mouth_loop] = True
    lips = polygon(range(48, 60), 1.0)
    nose_tip_y = landmarks[33, 1]
    below_nose = (np.abs(vertices[:, 0]) <= np.abs(landmarks[35, 0] - landmarks[31, 0]) / 2 + 4.0) & (
        vertices[:, 1] <= landmarks[30, 1]) & (vertices[:, 1] >= nose_tip_y - 4.0)
    nostrils = below_nose & (normals[:, 1] < -0.5)
    half_width = abs(landmarks[35, 0] - landmarks[31, 0]) / 2 + 5.0
    nose = (np.abs(vertices[:, 0] - landmarks[27, 0]) <= np.interp(
        vertices[:, 1], [nose_tip_y, landmarks[27, 1]], [half_width, 8.0])) & (
        vertices[:, 1] <= landmarks[27, 1] + 2.0) & (vertices[:, 1] >= nose_tip_y - 4.0) & (
        vertices[:, 2] >= landmarks[[31, 35], 2].min() - 6.0)
    jaw = _distance_to_polyline(vertices, landmarks[0:17]) <= 6.0

    def symmetric(mask: np.ndarray) -> np.ndarray:
        return mask if mirror is None else mask | mask[mirror]

    masks: dict[str, np.ndarray] = {}
    taken = np.zeros(len(vertices), bool)
    for name, mask in [("eyes", eyes), ("brows", brows), ("inner_mouth", inner_mouth),
                       ("lips", lips), ("nostrils", nostrils)]:
        masks[name] = symmetric(mask) & ~taken  # earlier regions win where dilations overlap
        taken |= masks[name]
    masks["skin"] = ~taken
    masks["nose"] = symmetric(nose)
    masks["jaw_contour"] = symmetric(jaw)
    return masks


def _inside_polygon(points: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """Even-odd rule: points (N,2) inside the closed polygon ring (M,2)."""
    inside = np.zeros(len(points), bool)
    x, y = points[:, 0], points[:, 1]
    for (x1, y1), (x2, y2) in zip(ring, np.roll(ring, -1, axis=0)):
        crosses = (y1 > y) != (y2 > y)
        x_cross = x1 + (y - y1) * (x2 - x1) / np.where(y2 != y1, y2 - y1, 1e-12)
        inside ^= crosses & (x < x_cross)
    return inside


def _distance_to_polyline(points: np.ndarray, polyline: np.ndarray, closed: bool = False) -> np.ndarray:
    """Distance from each point (N,D) to the nearest segment of a polyline (M,D)."""
    ends = np.roll(polyline, -1, axis=0) if closed else polyline[1:]
    starts = polyline if closed else polyline[:-1]
    best = np.full(len(points), np.inf)
    for start, end in zip(starts, ends):
        segment = end - start
        t = np.clip((points - start) @ segment / max(segment @ segment, 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.linalg.norm(points - (start + t[:, None] * segment), axis=1))
    return best
