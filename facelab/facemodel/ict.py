"""The ICT Face Model Light (ICT-FaceKit, MIT licence): its published facts and raw arrays.

Vertex ids and ranges come from the ICT-FaceKit README (0-based). The raw-array layout is the one
of the asset ``ict-facekit/ict_face_model_light.npz`` (units cm, nothing cropped):

- ``neutral`` (26719,3); ``id_basis`` (100,26719,3) and ``exp_basis`` (53,26719,3), offsets from
  the neutral mesh; ``exp_names`` (53,); ``vt`` (Vt,2); ``faces_v``/``faces_vt`` (F,4) int32 with
  -1 padding triangles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .obj import read_obj, read_obj_vertices

UPSTREAM_REPOSITORY = "ICT-VGL/ICT-FaceKit"
UPSTREAM_COMMIT = "da5f95a607f5e6b37755b38d3385d7f2853732e5"
LICENCE = "MIT (ICT-FaceKit, USC Institute for Creative Technologies)"
NUM_VERTICES = 26719
NUM_IDENTITY = 100
NUM_EXPRESSION = 53

# Multi-PIE / iBUG 68 landmark vertex ids (ICT-FaceKit README).
LANDMARKS_68 = (
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272, 4088,
    3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942, 4857, 1140,
    2075, 1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756, 3721, 3725, 3732,
    5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841, 5702, 5711, 5533, 6216,
    6207, 6470, 5517, 5966,
)
# Extended jawline candidates (17 per side, README), for sliding-contour methods.
RIGHT_EXTENDED_JAWLINE = (
    1280, 1278, 1275, 1272, 1248, 12, 820, 1834, 1902, 243, 844, 781, 1673, 2199, 801, 1447, 800,
)
LEFT_EXTENDED_JAWLINE = (
    3041, 3661, 3042, 4390, 3880, 3022, 3085, 2484, 4102, 4036, 3061, 2253, 3466, 3490, 3493, 3496,
    3498,
)
# Inclusive vertex-id and polygon-id ranges of the croppable regions (README).
REGION_VERTICES = {"face": (0, 9408), "narrow_face": (0, 6705)}
REGION_POLYGONS = {"face": (0, 9229), "narrow_face": (0, 6559)}
RAW_KEYS = ("neutral", "id_basis", "exp_basis", "exp_names", "vt", "faces_v", "faces_vt")


def load_raw(path: str | Path) -> dict[str, np.ndarray]:
    """Load the raw-array npz and check its layout; errors name the file and the offending key."""
    path = Path(path)
    with np.load(path) as archive:
        missing = [key for key in RAW_KEYS if key not in archive.files]
        if missing:
            raise ValueError(f"{path}: not an ICT raw-array file, missing keys {missing}")
        raw = {key: archive[key] for key in RAW_KEYS}
    if raw["neutral"].shape != (NUM_VERTICES, 3):
        raise ValueError(f"{path}: 'neutral' has shape {raw['neutral'].shape}, expected ({NUM_VERTICES}, 3)")
    return raw


def raw_arrays_from_obj_folder(folder: str | Path, identities: int | None = None,
                               expressions: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read the upstream ``FaceXModel/`` OBJ folder into the raw-array layout.

    folder must hold ``generic_neutral_mesh.obj``, ``vertex_indices.json`` (its "expressions" list
    names the expression OBJs) and ``identityNNN.obj``. ``identities`` limits how many identity
    files are read (None: every ``identity*.obj`` present); ``expressions`` picks expression names
    (None: the full list of vertex_indices.json). A missing expression file is an error.
    """
    folder = Path(folder)
    neutral_mesh = read_obj(folder / "generic_neutral_mesh.obj")
    neutral = neutral_mesh.vertices
    names = expressions or json.loads((folder / "vertex_indices.json").read_text())["expressions"]
    identity_files = sorted(folder.glob("identity[0-9][0-9][0-9].obj"))[:identities]

    def offsets(files: list[Path]) -> np.ndarray:
        stack = np.zeros((len(files), *neutral.shape), np.float32)
        for index, file in enumerate(files):
            vertices = read_obj_vertices(file)
            if vertices.shape != neutral.shape:
                raise ValueError(f"{file}: {len(vertices)} vertices, the neutral mesh has {len(neutral)}")
            stack[index] = vertices - neutral
        return stack

    expression_files = [folder / f"{name}.obj" for name in names]
    absent = [file.name for file in expression_files if not file.exists()]
    if absent:
        raise FileNotFoundError(f"{folder}: expression OBJs missing: {absent[:5]}{'...' if len(absent) > 5 else ''}")
    return {
        "neutral": neutral,
        "id_basis": offsets(identity_files),
        "exp_basis": offsets(expression_files),
        "exp_names": np.asarray(names),
        "vt": neutral_mesh.uvs,
        "faces_v": _pad4(neutral_mesh.faces_v),
        "faces_vt": _pad4(neutral_mesh.faces_vt),
    }


def crop(raw: dict[str, np.ndarray], region: str = "face") -> dict[str, np.ndarray]:
    """Cut a region out of the raw arrays, triangulate its quads and convert cm to mm.

    Returns ``mean`` (V,3), ``shape_basis`` (K,V,3), ``expression_basis`` (E,V,3), ``triangles``
    (T,3) int32, ``uv`` (Vt,2) float32 and ``uv_triangles`` (T,3) int32 (UV ids compacted to the
    ones the region uses), ``expression_names`` (E,). Triangles are wound counter-clockwise seen
    from outside (+z at the nose tip).
    """
    if region not in REGION_VERTICES:
        raise ValueError(f"unknown region {region!r}; valid: {sorted(REGION_VERTICES)}")
    last_vertex = REGION_VERTICES[region][1]
    last_polygon = REGION_POLYGONS[region][1]
    polygons_v = raw["faces_v"][: last_polygon + 1]
    polygons_vt = raw["faces_vt"][: last_polygon + 1]
    if polygons_v.max() > last_vertex:
        raise ValueError(f"region {region!r}: its polygons reference vertices beyond id {last_vertex}")
    triangles, uv_triangles = _triangulate(polygons_v), _triangulate(polygons_vt)
    used_uv, uv_triangles = np.unique(uv_triangles, return_inverse=True)
    millimetres = 10.0
    return {
        "mean": raw["neutral"][: last_vertex + 1] * millimetres,
        "shape_basis": raw["id_basis"][:, : last_vertex + 1] * millimetres,
        "expression_basis": raw["exp_basis"][:, : last_vertex + 1] * millimetres,
        "expression_names": np.asarray(raw["exp_names"]),
        "triangles": triangles.astype(np.int32),
        "uv": raw["vt"][used_uv].astype(np.float32),
        "uv_triangles": uv_triangles.reshape(-1, 3).astype(np.int32),
    }


def _triangulate(polygons: np.ndarray) -> np.ndarray:
    """Split quads (a,b,c,d) into (a,b,c) and (a,c,d); triangles (d = -1) pass through."""
    quads = polygons[:, 3] >= 0
    first = polygons[:, :3]
    second = polygons[quads][:, [0, 2, 3]]
    return np.concatenate([first, second], axis=0)


def _pad4(faces: np.ndarray) -> np.ndarray:
    if faces.shape[1] >= 4:
        return faces[:, :4].astype(np.int32)
    return np.pad(faces, ((0, 0), (0, 4 - faces.shape[1])), constant_values=-1).astype(np.int32)
