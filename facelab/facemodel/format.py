"""facelab's face-model file: one ``.npz`` of arrays plus a ``meta`` JSON string.

Arrays (V vertices, T triangles, K shape, E expression, A albedo modes; mm, float32 unless said):

=====================  ============  ==========================================================
mean                   (V,3)         neutral mean shape, model space (+y up, +z out of the face)
shape_basis            (K,V,3)       identity modes scaled so coefficients are N(0,1)
expression_basis       (E,V,3)       blendshapes (meta.expression_kind) or PCA modes
expression_names       (E,) str
albedo_mean            (V,3)         linear RGB in [0,1]
albedo_basis           (A,V,3)       N(0,1) coefficients
specular_mean          (V,3)         optional, with specular_basis (A,V,3): one coefficient
specular_basis         (A,V,3)       vector drives both albedo bases
albedo_mode_names      (A,) str
triangles              (T,3) int32   counter-clockwise seen from outside
uv                     (Vt,2)        texture coordinates, origin bottom-left, [0,1]
uv_triangles           (T,3) int32   uv ids per triangle corner
landmarks_68           (68,) int64   iBUG 68 vertex ids
mirror                 (V,) int64    mirror partner of each vertex (an involution)
region_<name>          (V,) bool     region masks; meta.disjoint_regions partition the vertices
mouth_loop             (L,) int64    inner-lip boundary loop (the mouth patch's rim)
dense_triangles        (478,) int32  MediaPipe points as triangle + barycentric; dense_valid
dense_barycentric      (478,3)       (478,) bool is False for points with no surface (iris)
dense_valid            (478,) bool
parent_ids             (V,) int64    coarse levels: id of each vertex in the parent level
upsample_{rows,cols,weights}         coarse levels: sparse (V_parent,V) barycentric up-sampling
=====================  ============  ==========================================================

meta: name, level, region, parent, licence, source, units ("mm"), expression_kind, albedo
(a sentence saying what the albedo model is), disjoint_regions, overlapping_regions,
format_version, converter_version.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
REQUIRED = {
    "mean": 2, "shape_basis": 3, "expression_basis": 3, "albedo_mean": 2, "albedo_basis": 3,
    "triangles": 2, "landmarks_68": 1, "mirror": 1,
}
REQUIRED_META = ("name", "licence", "source", "units", "expression_kind")


class FaceModelFormatError(ValueError):
    """A face-model file that does not follow the format; the message names the file and key."""


def save_model(path: str | Path, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Validate and write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    meta = {**meta, "format_version": FORMAT_VERSION}
    validate(arrays, meta, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".npz.partial")
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez_compressed(stream, meta=np.asarray(json.dumps(meta, sort_keys=True)), **arrays)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; a cache file is shared like any other
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_model(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and validate a face-model file -> (arrays, meta)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"face model {path} does not exist; build it with `facelab assets build`")
    with np.load(path, allow_pickle=False) as archive:
        if "meta" not in archive.files:
            raise FaceModelFormatError(f"{path}: no 'meta' entry; not a facelab face model")
        meta = json.loads(str(archive["meta"]))
        arrays = {key: archive[key] for key in archive.files if key != "meta"}
    validate(arrays, meta, str(path))
    return arrays, meta


def validate(arrays: dict[str, np.ndarray], meta: dict, origin: str) -> None:
    """Check keys, ranks and the shapes that must agree; raise FaceModelFormatError naming them."""
    for key, rank in REQUIRED.items():
        if key not in arrays:
            raise FaceModelFormatError(f"{origin}: missing array {key!r}")
        if arrays[key].ndim != rank:
            raise FaceModelFormatError(f"{origin}: {key!r} has rank {arrays[key].ndim}, expected {rank}")
    for key in REQUIRED_META:
        if key not in meta:
            raise FaceModelFormatError(f"{origin}: meta lacks {key!r}")
    num_vertices = len(arrays["mean"])
    for key in ("shape_basis", "expression_basis", "albedo_basis", "specular_basis"):
        if key in arrays and arrays[key].shape[1:] != (num_vertices, 3):
            raise FaceModelFormatError(f"{origin}: {key!r} has shape {arrays[key].shape}, expected (*, {num_vertices}, 3)")
    if "specular_basis" in arrays and len(arrays["specular_basis"]) != len(arrays["albedo_basis"]):
        raise FaceModelFormatError(f"{origin}: specular and albedo bases need the same number of modes")
    if arrays["triangles"].max() >= num_vertices or arrays["triangles"].min() < 0:
        raise FaceModelFormatError(f"{origin}: 'triangles' index outside 0..{num_vertices - 1}")
    if arrays["mirror"].shape != (num_vertices,):
        raise FaceModelFormatError(f"{origin}: 'mirror' must have one entry per vertex")
    if arrays["landmarks_68"].shape != (68,):
        raise FaceModelFormatError(f"{origin}: 'landmarks_68' must hold 68 vertex ids")
