"""Minimal Wavefront OBJ reading: vertex positions, texture coordinates and polygons.

Only what face-model files use: ``v``, ``vt`` and ``f`` records with ``v``, ``v/vt`` or ``v/vt/vn``
corners. Polygons of mixed size are padded with -1 to the largest size in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ObjMesh:
    """A polygon mesh as read from an OBJ file.

    vertices: (V,3) float32; uvs: (Vt,2) float32 (may be empty);
    faces_v, faces_vt: (F,N) int32, 0-based, -1 pads polygons with fewer than N corners
    (faces_vt is all -1 where the file gives no texture indices).
    """

    vertices: np.ndarray
    uvs: np.ndarray
    faces_v: np.ndarray
    faces_vt: np.ndarray


def read_obj(path: str | Path) -> ObjMesh:
    """Read an OBJ file; raises ValueError naming the file and line on malformed records."""
    path = Path(path)
    vertices: list[str] = []
    uvs: list[str] = []
    faces: list[list[str]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("v "):
                vertices.append(line[2:])
            elif line.startswith("vt "):
                uvs.append(line[3:])
            elif line.startswith("f "):
                faces.append(line[2:].split())
    if not vertices:
        raise ValueError(f"{path}: no 'v' records; is this an OBJ mesh?")
    try:
        vertex_array = np.loadtxt(vertices, dtype=np.float64, ndmin=2)[:, :3].astype(np.float32)
        uv_array = (
            np.loadtxt(uvs, dtype=np.float64, ndmin=2)[:, :2].astype(np.float32)
            if uvs
            else np.zeros((0, 2), np.float32)
        )
    except ValueError as error:
        raise ValueError(f"{path}: malformed 'v' or 'vt' record ({error})") from None
    corners = max((len(face) for face in faces), default=3)
    faces_v = np.full((len(faces), corners), -1, np.int32)
    faces_vt = np.full((len(faces), corners), -1, np.int32)
    for row, face in enumerate(faces):
        for column, corner in enumerate(face):
            parts = corner.split("/")
            faces_v[row, column] = _index(parts[0], len(vertex_array), path)
            if len(parts) > 1 and parts[1]:
                faces_vt[row, column] = _index(parts[1], len(uv_array), path)
    return ObjMesh(vertex_array, uv_array, faces_v, faces_vt)


def read_obj_vertices(path: str | Path) -> np.ndarray:
    """Only the (V,3) float32 vertex positions of an OBJ file (fast path for blendshape folders)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        rows = [line[2:] for line in handle if line.startswith("v ")]
    if not rows:
        raise ValueError(f"{path}: no 'v' records; is this an OBJ mesh?")
    return np.loadtxt(rows, dtype=np.float64, ndmin=2)[:, :3].astype(np.float32)


def _index(token: str, count: int, path: Path) -> int:
    value = int(token)
    index = value - 1 if value > 0 else count + value  # OBJ allows negative (relative) indices
    if not 0 <= index < count:
        raise ValueError(f"{path}: face index {value} out of range (1..{count})")
    return index
