"""Mesh export: OBJ and PLY files read back to what was written, and bad inputs refused by name."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from facelab.facemodel.obj import read_obj
from facelab.viz.mesh import write_obj, write_ply


def _mesh(seed: int = 0):
    """A closed octahedron (6 vertices, 8 triangles) with a separate UV layout (one uv per corner)."""
    generator = np.random.default_rng(seed)
    vertices = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.float32)
    vertices = vertices * 37.25 + generator.normal(0, 3, (6, 3)).astype(np.float32)  # mm-scale, irregular
    triangles = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    uv = generator.uniform(0, 1, (24, 2)).astype(np.float32)
    uv_triangles = np.arange(24).reshape(8, 3)[:, ::-1].copy()  # any ids, unrelated to the vertex ids
    colors = generator.uniform(0, 1, (6, 3))
    return vertices, triangles, uv, uv_triangles, colors


def _obj_vertex_colors(path) -> np.ndarray:
    rows = [line.split()[1:] for line in path.read_text().splitlines() if line.startswith("v ")]
    return np.array(rows, float)[:, 3:]


def _read_ply(path):
    """An independent reader for the binary little-endian layout: header, then fixed-size records."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element")}
    types = {"float": "<f4", "uchar": "u1"}
    fields = [(line.split()[-1], types[line.split()[1]]) for line in header
              if line.startswith("property") and "list" not in line]
    vertices = np.frombuffer(data, dtype=fields, count=counts["vertex"], offset=end)
    face_dtype = [("count", "u1"), ("ids", "<i4", (3,))]
    faces = np.frombuffer(data, dtype=face_dtype, count=counts["face"], offset=end + vertices.nbytes)
    assert end + vertices.nbytes + faces.nbytes == len(data), "trailing or missing bytes"
    return [name for name, _ in fields], vertices, faces


def test_obj_round_trip_keeps_vertices_faces_uvs_and_colours(tmp_path):
    vertices, triangles, uv, uv_triangles, colors = _mesh()
    path = write_obj(tmp_path / "mesh.obj", vertices, triangles, uv=uv, uv_triangles=uv_triangles, colors=colors)
    mesh = read_obj(path)
    np.testing.assert_allclose(mesh.vertices, vertices, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(mesh.faces_v, triangles)  # same order and winding
    np.testing.assert_allclose(mesh.uvs, uv, atol=1e-6)
    np.testing.assert_array_equal(mesh.faces_vt, uv_triangles)
    np.testing.assert_allclose(_obj_vertex_colors(path), colors, atol=1e-5)


def test_obj_accepts_tensors_and_writes_normals_without_uvs(tmp_path):
    vertices, triangles, *_ = _mesh(1)
    normals = vertices / np.linalg.norm(vertices, axis=1, keepdims=True)
    path = write_obj(tmp_path / "mesh.obj", torch.from_numpy(vertices), torch.from_numpy(triangles), normals=normals)
    lines = path.read_text().splitlines()
    face_lines = [line for line in lines if line.startswith("f ")]
    assert len(face_lines) == 8 and all("//" in line for line in face_lines)  # v//vn: no texture index
    written = np.array([line.split()[1:] for line in lines if line.startswith("vn ")], float)
    np.testing.assert_allclose(written, normals, atol=1e-5)
    mesh = read_obj(path)
    np.testing.assert_array_equal(mesh.faces_v, triangles)
    assert (mesh.faces_vt == -1).all() and len(mesh.uvs) == 0
    assert _obj_vertex_colors(path).shape == (6, 0)  # no colour columns when none are given


def test_ply_round_trip_keeps_float32_vertices_byte_colours_and_triangles(tmp_path):
    vertices, triangles, _, _, colors = _mesh(2)
    names, records, faces = _read_ply(write_ply(tmp_path / "mesh.ply", vertices, triangles, colors=colors))
    assert names == ["x", "y", "z", "red", "green", "blue"]
    np.testing.assert_array_equal(np.stack([records["x"], records["y"], records["z"]], axis=1), vertices)
    levels = np.stack([records["red"], records["green"], records["blue"]], axis=1)
    np.testing.assert_array_equal(levels, np.round(colors * 255))
    assert (faces["count"] == 3).all()
    np.testing.assert_array_equal(faces["ids"], triangles)


def test_ply_without_colours_has_only_positions(tmp_path):
    vertices, triangles, *_ = _mesh(3)
    names, records, faces = _read_ply(write_ply(tmp_path / "mesh.ply", vertices, triangles))
    assert names == ["x", "y", "z"] and len(records) == 6 and len(faces) == 8


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "vertices": m["vertices"][:, :2]}, "vertices: expected shape"),
    (lambda m: {**m, "triangles": m["triangles"][:, :2]}, "triangles: expected shape"),
    (lambda m: {**m, "triangles": m["triangles"] + 1}, "triangles: ids must lie in 0..5"),
    (lambda m: {**m, "triangles": m["triangles"] - 1}, "triangles: ids must lie in 0..5"),
    (lambda m: {**m, "triangles": m["triangles"].astype(np.float32)}, "triangles: expected integer ids"),
    (lambda m: {**m, "uv_triangles": None}, "uv and uv_triangles come together"),
    (lambda m: {**m, "uv_triangles": m["uv_triangles"][:7]}, "uv_triangles has 7 rows but triangles has 8"),
    (lambda m: {**m, "uv_triangles": m["uv_triangles"] + 1}, "uv_triangles: ids must lie in 0..23"),
    (lambda m: {**m, "colors": m["colors"] * 2}, "colors: expected display RGB in [0,1]"),
    (lambda m: {**m, "colors": m["colors"][:5]}, "colors: expected shape (6,3)"),
    (lambda m: {**m, "vertices": np.where(np.arange(6)[:, None] == 2, np.nan, m["vertices"])}, "1 rows hold NaN"),
])
def test_obj_refuses_bad_inputs_by_name_and_writes_nothing(tmp_path, change, message):
    vertices, triangles, uv, uv_triangles, colors = _mesh()
    arguments = change({"vertices": vertices, "triangles": triangles, "uv": uv, "uv_triangles": uv_triangles,
                        "colors": colors})
    with pytest.raises(ValueError, match=re.escape(message)):
        write_obj(tmp_path / "mesh.obj", **arguments)
    assert not (tmp_path / "mesh.obj").exists()


def test_ply_refuses_out_of_range_triangles(tmp_path):
    vertices, triangles, *_ = _mesh()
    with pytest.raises(ValueError, match=r"triangles: ids must lie in 0\.\.5"):
        write_ply(tmp_path / "mesh.ply", vertices, np.where(triangles == 5, 6, triangles))
    assert not (tmp_path / "mesh.ply").exists()
