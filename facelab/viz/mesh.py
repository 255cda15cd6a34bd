"""Mesh export: Wavefront OBJ (positions, UVs, per-vertex colours, normals) and binary PLY.

Inputs may be numpy arrays or tensors (any device; they are copied to the CPU):

    vertices:     (V,3) float, any unit (facelab's meshes are mm, model space, +y up)
    triangles:    (T,3) int, 0-based vertex ids, counter-clockwise seen from the front
    uv:           (Vt,2) float, texture coordinates, origin bottom-left, [0,1] (the OBJ convention,
                  and the face model's ``uv`` buffer)
    uv_triangles: (T,3) int, 0-based ids into ``uv``, one row per row of ``triangles``
    colors:       (V,3) float in [0,1], display RGB (gamma-encoded, not linear)
    normals:      (V,3) float, per-vertex unit normals

OBJ has no colour record; the common extension ``v x y z r g b`` (MeshLab, Blender, Open3D read
it) carries per-vertex colours. OBJ indices are 1-based; the files written here use absolute ones.
Every check happens before the file is opened, so a bad input leaves no partial file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["write_obj", "write_ply"]


def write_obj(path: str | Path, vertices, triangles, uv=None, uv_triangles=None, colors=None,
              normals=None) -> Path:
    """Write a triangle mesh as OBJ; faces are ``f v/vt/vn`` with whichever parts are given.

    uv and uv_triangles come together or not at all. Raises ValueError naming the argument whose
    shape, dtype or index range is wrong. Returns the path."""
    vertices = _float_array(vertices, "vertices", 3)
    triangles = _index_array(triangles, "triangles", len(vertices))
    if (uv is None) != (uv_triangles is None):
        raise ValueError("uv and uv_triangles come together: pass both (texture coordinates and the "
                         "triangles that index them) or neither")
    if uv is not None:
        uv = _float_array(uv, "uv", 2)
        uv_triangles = _index_array(uv_triangles, "uv_triangles", len(uv))
        if len(uv_triangles) != len(triangles):
            raise ValueError(f"uv_triangles has {len(uv_triangles)} rows but triangles has {len(triangles)}: "
                             "they must describe the same triangles, row by row")
    if colors is not None:
        colors = _colors(colors, len(vertices))
    if normals is not None:
        normals = _float_array(normals, "normals", 3, rows=len(vertices))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="ascii", newline="\n") as handle:
        handle.write(f"# facelab mesh: {len(vertices)} vertices, {len(triangles)} triangles\n")
        if colors is None:
            np.savetxt(handle, vertices, fmt="v %.7g %.7g %.7g")
        else:
            np.savetxt(handle, np.concatenate([vertices, colors], axis=1), fmt="v %.7g %.7g %.7g %.6g %.6g %.6g")
        if uv is not None:
            np.savetxt(handle, uv, fmt="vt %.7g %.7g")
        if normals is not None:
            np.savetxt(handle, normals, fmt="vn %.6g %.6g %.6g")
        corners = [triangles + 1]  # each (T,3); interleaved into v/vt/vn per corner below
        if uv is not None:
            corners.append(uv_triangles + 1)
        if normals is not None:
            corners.append(triangles + 1)  # per-vertex normals share the vertex ids
        if uv is not None and normals is not None:
            corner = "%d/%d/%d"
        elif uv is not None:
            corner = "%d/%d"
        elif normals is not None:
            corner = "%d//%d"
        else:
            corner = "%d"
        columns = np.stack(corners, axis=2).reshape(len(triangles), 3 * len(corners))  # corner by corner
        np.savetxt(handle, columns, fmt="f " + " ".join([corner] * 3))
    return path


def write_ply(path: str | Path, vertices, triangles, colors=None) -> Path:
    """Write a triangle mesh as binary little-endian PLY: float32 x y z, optional uchar red green
    blue (colours in [0,1] rounded to 0..255), faces as ``list uchar int vertex_indices``.

    Raises ValueError on a bad shape or index range. Returns the path."""
    vertices = _float_array(vertices, "vertices", 3)
    triangles = _index_array(triangles, "triangles", len(vertices))
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if colors is not None:
        colors = _colors(colors, len(vertices))
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex_records = np.empty(len(vertices), dtype=fields)
    for axis, name in enumerate("xyz"):
        vertex_records[name] = vertices[:, axis]
    if colors is not None:
        levels = np.round(colors * 255).astype(np.uint8)
        for channel, name in enumerate(("red", "green", "blue")):
            vertex_records[name] = levels[:, channel]
    face_records = np.empty(len(triangles), dtype=[("count", "u1"), ("ids", "<i4", (3,))])
    face_records["count"] = 3
    face_records["ids"] = triangles

    header = ["ply", "format binary_little_endian 1.0", "comment facelab mesh",
              f"element vertex {len(vertices)}", "property float x", "property float y", "property float z"]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(triangles)}", "property list uchar int vertex_indices", "end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        handle.write(vertex_records.tobytes())
        handle.write(face_records.tobytes())
    return path


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _float_array(value, name: str, columns: int, rows: int | None = None) -> np.ndarray:
    array = _numpy(value)
    if array.ndim != 2 or array.shape[1] != columns or (rows is not None and len(array) != rows):
        wanted = f"({rows if rows is not None else 'N'},{columns})"
        raise ValueError(f"{name}: expected shape {wanted}, got {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"{name}: expected real numbers, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: {int((~np.isfinite(array)).any(axis=1).sum())} rows hold NaN or infinity")
    return array.astype(np.float64)


def _index_array(value, name: str, count: int) -> np.ndarray:
    array = _numpy(value)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (T,3) of vertex ids, got {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected integer ids, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= count):
        raise ValueError(f"{name}: ids must lie in 0..{count - 1} (0-based), found {array.min()}..{array.max()}")
    return array.astype(np.int64)


def _colors(value, count: int) -> np.ndarray:
    colors = _float_array(value, "colors", 3, rows=count)
    if colors.size and (colors.min() < 0 or colors.max() > 1):
        raise ValueError(f"colors: expected display RGB in [0,1], found {colors.min():.3g}..{colors.max():.3g} "
                         "(clamp, and gamma-encode linear albedo, first)")
    return colors
