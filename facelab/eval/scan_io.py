"""Reading 3D scans for evaluation: .obj and .ply (ASCII and binary) meshes or point clouds, with
their landmarks from a sidecar file (plain text, .npy, or a MeshLab picked-points .pp as the NoW
challenge ships them)."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facelab.facemodel.obj import read_obj

#: Landmark sidecar names tried next to a scan ``<stem>.<ext>``, in this order.
LANDMARK_SIDECARS = ("{stem}.lmk.txt", "{stem}_landmarks.txt", "{stem}.npy", "{stem}.pp")
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


@dataclass
class Scan:
    """A scan as read from disk.

    points: (N,3) float64, the scan's units (mm for NoW); faces: (F,3) int64 vertex ids
    (polygons fan-triangulated) or None for a point cloud; landmarks: (L,3) float64 in the
    sidecar file's order, or None when the scan has no sidecar."""

    points: np.ndarray
    faces: np.ndarray | None
    landmarks: np.ndarray | None


# reading -------------------------------------------------------------------------------------

def read_scan(path: str | Path, landmarks_path: str | Path | None = None) -> Scan:
    """Read a scan (.obj or .ply: ASCII, binary little- or big-endian) and its landmarks.

    Landmarks come from landmarks_path or else from the first sidecar of LANDMARK_SIDECARS that
    exists next to the scan (see read_landmarks). OBJ positions go through
    facelab.facemodel.obj.read_obj, i.e. float32 precision (1e-5 mm at face scale). Raises
    ValueError naming the file when it is missing or not a readable mesh."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such scan file; expected an .obj or .ply mesh")
    suffix = path.suffix.lower()
    if suffix not in (".obj", ".ply"):
        raise ValueError(f"{path}: unknown scan format {suffix!r}; expected an .obj or .ply mesh")
    try:
        points, polygons = _read_obj(path) if suffix == ".obj" else _read_ply(path.read_bytes())
    except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as error:
        message = str(error).replace(f"{path}: ", "")
        raise ValueError(f"{path}: not a readable {suffix[1:].upper()} mesh ({message})") from None
    faces = _fan_triangulate(polygons, len(points), path) if polygons is not None and len(polygons) else None
    if landmarks_path is None:
        stem = path.with_suffix("")
        found = [path.with_name(name.format(stem=stem.name)) for name in LANDMARK_SIDECARS]
        landmarks_path = next((candidate for candidate in found if candidate.is_file()), None)
    landmarks = read_landmarks(landmarks_path) if landmarks_path is not None else None
    return Scan(points, faces, landmarks)


def read_landmarks(path: str | Path) -> np.ndarray:
    """(L,3) float64 landmarks from a text file (L rows of x y z), an .npy array (L,3) or a
    MeshLab picked-points .pp file (<point x= y= z= .../> elements, file order, the NoW
    challenge's format). Raises ValueError naming the file when it is missing or garbled."""
    path = Path(path)
    expected = "L rows of 'x y z' (.txt), an (L,3) array (.npy) or MeshLab <point x= y= z=/> elements (.pp)"
    if not path.is_file():
        raise ValueError(f"{path}: no such landmark file; expected {expected}")
    try:
        if path.suffix.lower() == ".npy":
            landmarks = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".pp":
            points = ElementTree.parse(path).getroot().iter("point")
            landmarks = np.array([[float(point.attrib[axis]) for axis in "xyz"] for point in points])
        else:
            landmarks = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except (ValueError, KeyError, OSError, ElementTree.ParseError) as error:
        raise ValueError(f"{path}: not a readable landmark file ({error}); expected {expected}") from None
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 2 or landmarks.shape[1] != 3 or len(landmarks) == 0 or not np.isfinite(landmarks).all():
        raise ValueError(f"{path}: got landmarks of shape {landmarks.shape} (or non-finite values); "
                         f"expected {expected}")
    return landmarks


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    mesh = read_obj(path)
    if mesh.vertices.shape[1] != 3:
        raise ValueError("'v' records need x y z")
    return mesh.vertices.astype(np.float64), mesh.faces_v.astype(np.int64)


def _read_ply(data: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """PLY bytes -> vertices (N,3) float64 and polygons (F,K) int64 padded with -1 (or None)."""
    marker = data.find(b"end_header")
    if not data.startswith(b"ply") or marker < 0:
        raise ValueError("no 'ply ... end_header' header")
    body = data.index(b"\n", marker) + 1
    elements: list[tuple[str, int, list[tuple]]] = []
    encoding = None
    for line in data[:marker].decode("ascii").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if words[1] not in _PLY_FORMATS:
                raise ValueError(f"format {words[1]!r}; expected one of {', '.join(_PLY_FORMATS)}")
            encoding = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and words[1] == "list":
            elements[-1][2].append((words[4], _PLY_TYPES[words[2]], _PLY_TYPES[words[3]]))
        elif words[0] == "property":
            elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))
    if encoding is None:
        raise ValueError("no 'format' line in the header")
    if encoding == "ascii":
        tables = _ply_ascii(data[body:].decode("ascii").split(), elements)
    else:
        tables = _ply_binary(data, body, elements, _PLY_FORMATS[encoding])
    if "vertex" not in tables:
        raise ValueError("no 'element vertex'")
    vertex = tables["vertex"]
    points = np.stack([np.asarray(vertex[axis], np.float64) for axis in "xyz"], axis=1)
    face = tables.get("face", {})
    rows = face.get("vertex_indices", face.get("vertex_index"))
    if rows is None:
        return points, None
    width = max((len(row) for row in rows), default=3)
    polygons = np.full((len(rows), width), -1, np.int64)
    for index, row in enumerate(rows):
        polygons[index, :len(row)] = row
    return points, polygons


def _ply_ascii(tokens: list[str], elements) -> dict[str, dict]:
    """Whitespace tokens of an ASCII PLY body -> {element: {property: values or lists}}."""
    tables, position = {}, 0
    for name, count, properties in elements:
        columns = {prop[0]: [] for prop in properties}
        if all(len(prop) == 2 for prop in properties):  # scalars only: one reshape
            size = count * len(properties)
            if position + size > len(tokens):
                raise ValueError(f"element {name} is truncated: expected {count} rows of {len(properties)} values")
            values = np.asarray(tokens[position:position + size], np.float64).reshape(count, len(properties))
            columns = {prop[0]: values[:, column] for column, prop in enumerate(properties)}
            position += size
        else:
            for _ in range(count):
                for prop in properties:
                    if len(prop) == 3:
                        length = int(tokens[position])
                        columns[prop[0]].append([int(value) for value in tokens[position + 1:position + 1 + length]])
                        position += 1 + length
                    else:
                        columns[prop[0]].append(float(tokens[position]))
                        position += 1
        tables[name] = columns
    return tables


def _ply_binary(data: bytes, offset: int, elements, order: str) -> dict[str, dict]:
    """A binary PLY body from data[offset:], byte order "<" or ">" -> {element: {property: ...}}."""
    tables = {}
    for name, count, properties in elements:
        lists = [prop for prop in properties if len(prop) == 3]
        if not lists:
            dtype = np.dtype([(prop[0], order + prop[1]) for prop in properties])
            table = np.frombuffer(data, dtype, count, offset)
            tables[name] = {prop[0]: table[prop[0]] for prop in properties}
            offset += dtype.itemsize * count
            continue
        # fast path: every list as long as the first one (all triangles, say); checked below
        first_length = int(np.frombuffer(data, order + lists[0][1], 1, offset)[0]) if count else 0
        fields = []
        for prop in properties:
            fields += [(prop[0] + "#", order + prop[1]), (prop[0], order + prop[2], (first_length,))] \
                if len(prop) == 3 else [(prop[0], order + prop[1])]
        dtype = np.dtype(fields)
        if len(lists) == 1 and offset + dtype.itemsize * count <= len(data):
            table = np.frombuffer(data, dtype, count, offset)
            if (table[lists[0][0] + "#"] == first_length).all():
                tables[name] = {prop[0]: table[prop[0]] for prop in properties}
                offset += dtype.itemsize * count
                continue
        columns = {prop[0]: [] for prop in properties}
        for _ in range(count):  # mixed polygon sizes: row by row
            for prop in properties:
                value = np.frombuffer(data, order + prop[1], 1, offset)[0]
                offset += np.dtype(prop[1]).itemsize
                if len(prop) == 3:
                    columns[prop[0]].append(np.frombuffer(data, order + prop[2], int(value), offset))
                    offset += np.dtype(prop[2]).itemsize * int(value)
                else:
                    columns[prop[0]].append(value)
        tables[name] = columns
    return tables


def _fan_triangulate(polygons: np.ndarray, vertex_count: int, path: Path) -> np.ndarray:
    """(F,K) polygons padded with -1 -> (T,3) triangles (v0, vi, vi+1), polygon order kept."""
    polygons = np.asarray(polygons, np.int64)
    if polygons.shape[1] < 3 or (polygons[:, :3] < 0).any():
        raise ValueError(f"{path}: a face has fewer than 3 corners")
    if polygons.max() >= vertex_count or (polygons < -1).any():
        raise ValueError(f"{path}: a face refers to a vertex outside 0..{vertex_count - 1}")
    corner = np.arange(1, polygons.shape[1] - 1)
    triangles = np.stack([np.broadcast_to(polygons[:, :1], (len(polygons), len(corner))),
                          polygons[:, corner], polygons[:, corner + 1]], axis=-1)  # (F,K-2,3)
    return triangles[triangles[..., 2] >= 0].reshape(-1, 3)
