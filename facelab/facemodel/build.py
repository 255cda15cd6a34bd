"""Build facelab face models from the ICT raw arrays and cache them.

``ict-face`` is the converted face region (about 9.4k vertices); ``ict-face-lite`` keeps a
mirror-closed quarter of its vertices (vertex-subset decimation), so its bases are exact
restrictions of the full ones. Built files live in ``<cache>/models/`` under a name that
includes a hash of the inputs and the converter version, so a new converter or a new asset
rebuilds instead of reusing a stale file. ``facelab assets build`` runs this.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from . import albedo, derive, ict, mediapipe
from .decimate import decimate, upsampling_matrix
from .format import load_model, save_model
from .geometry import project_to_surface
from .obj import read_obj

CONVERTER_VERSION = 3
LEVELS = {"ict-face": None, "ict-face-lite": 4}  # name -> vertex reduction factor
REGIONS = tuple(ict.REGION_VERTICES)
ALBEDO_DESCRIPTION = (
    "declared prior, not data: region tones + global tone axes + mesh-Laplacian eigenvectors "
    "(see facelab.facemodel.albedo)"
)
log = logging.getLogger(__name__)


def convert_ict(raw: dict[str, np.ndarray], canonical_path: str | Path, region: str = "face",
                name: str = "ict-face") -> tuple[dict[str, np.ndarray], dict]:
    """Raw ICT arrays -> facelab format at full resolution (see format.py for the keys)."""
    arrays = ict.crop(raw, region)
    vertices, triangles = arrays["mean"].astype(np.float64), arrays["triangles"]
    landmarks = np.asarray(ict.LANDMARKS_68, np.int64)
    arrays["landmarks_68"] = landmarks
    arrays["mirror"] = derive.mirror_map(vertices)
    arrays["mouth_loop"] = derive.inner_mouth_loop(triangles, vertices, landmarks)
    regions = derive.region_masks(vertices, triangles, landmarks, arrays["mouth_loop"], arrays["mirror"])
    arrays.update({f"region_{key}": mask for key, mask in regions.items()})
    canonical = read_obj(canonical_path)
    dense = mediapipe.embed_dense_landmarks(canonical.vertices, canonical.faces_v[:, :3], vertices,
                                            triangles, landmarks)
    arrays.update({key: value for key, value in dense.items() if key != "dense_registered"})
    arrays.update(albedo.albedo_prior(vertices, triangles, regions))
    meta = {
        "name": name, "level": "full", "region": region, "parent": None,
        "licence": ict.LICENCE + "; dense landmark embedding from MediaPipe's canonical mesh (Apache-2.0)",
        "source": f"github.com/{ict.UPSTREAM_REPOSITORY}@{ict.UPSTREAM_COMMIT} FaceXModel",
        "units": "mm", "expression_kind": "blendshape", "albedo": ALBEDO_DESCRIPTION,
        "disjoint_regions": list(derive.DISJOINT_REGIONS),
        "overlapping_regions": list(derive.OVERLAPPING_REGIONS),
        "converter_version": CONVERTER_VERSION,
    }
    return arrays, meta


def coarsen(arrays: dict[str, np.ndarray], meta: dict, factor: int, name: str) -> tuple[dict[str, np.ndarray], dict]:
    """A coarse level of a full model: keep about 1/factor of the vertices (mirror-closed, the 68
    landmarks always kept); per-vertex arrays are restricted, topology-derived ones recomputed."""
    vertices = arrays["mean"].astype(np.float64)
    target = int(round(len(vertices) / factor))
    result = decimate(vertices, arrays["triangles"], target, mirror=arrays["mirror"],
                      locked=arrays["landmarks_68"])
    kept = result.kept
    remap = np.full(len(vertices), -1, np.int64)
    remap[kept] = np.arange(len(kept))
    coarse: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key in ("mean", "albedo_mean", "specular_mean") or key.startswith("region_"):
            coarse[key] = value[kept]
        elif key in ("shape_basis", "expression_basis", "albedo_basis", "specular_basis"):
            coarse[key] = value[:, kept]
        elif key in ("expression_names", "albedo_mode_names"):
            coarse[key] = value
    coarse["triangles"] = result.triangles
    coarse["landmarks_68"] = remap[arrays["landmarks_68"]]
    coarse["mirror"] = remap[arrays["mirror"][kept]]
    coarse["uv"], coarse["uv_triangles"] = _coarse_uvs(arrays, kept, result.triangles)
    coarse_vertices = vertices[kept]
    coarse["mouth_loop"] = derive.inner_mouth_loop(result.triangles, coarse_vertices, coarse["landmarks_68"])
    coarse["region_inner_mouth"] = coarse["region_inner_mouth"] | np.isin(np.arange(len(kept)), coarse["mouth_loop"])
    coarse["region_lips"] &= ~coarse["region_inner_mouth"]
    dense = mediapipe.dense_points(vertices, arrays["triangles"], arrays["dense_triangles"],
                                   arrays["dense_barycentric"])
    tri, bary, _ = project_to_surface(dense, coarse_vertices, result.triangles)
    coarse["dense_triangles"], coarse["dense_barycentric"] = tri.astype(np.int32), bary.astype(np.float32)
    coarse["dense_valid"] = arrays["dense_valid"]
    coarse["parent_ids"] = kept
    upsample = result.upsample.tocoo()
    coarse["upsample_rows"], coarse["upsample_cols"] = upsample.row.astype(np.int64), upsample.col.astype(np.int64)
    coarse["upsample_weights"] = upsample.data.astype(np.float32)
    return coarse, {**meta, "name": name, "level": f"1/{factor}", "parent": meta["name"]}


def _coarse_uvs(arrays, kept, coarse_triangles):
    """UV ids for the coarse triangles. Seam vertices carry several UVs; per triangle the
    combination with the shortest UV perimeter is the one on a single side of the seam."""
    options: list[set[int]] = [set() for _ in range(len(arrays["mean"]))]
    for corner in range(3):
        for vertex, uv_id in zip(arrays["triangles"][:, corner], arrays["uv_triangles"][:, corner]):
            options[vertex].add(int(uv_id))
    uv = arrays["uv"]
    chosen = np.zeros(coarse_triangles.shape, np.int64)
    for row, tri in enumerate(kept[coarse_triangles]):
        best, best_length = None, np.inf
        for a in options[tri[0]]:
            for b in options[tri[1]]:
                for c in options[tri[2]]:
                    corners = uv[[a, b, c]]
                    length = np.linalg.norm(corners - np.roll(corners, 1, axis=0), axis=1).sum()
                    if length < best_length:
                        best, best_length = (a, b, c), length
        chosen[row] = best
    used, compact = np.unique(chosen, return_inverse=True)
    return uv[used], compact.reshape(-1, 3).astype(np.int32)


def model_path(name: str = "ict-face-lite", region: str = "face") -> Path:
    """Where the built model for these inputs lives in the cache (it may not exist yet)."""
    from facelab import assets

    _check(name, region)
    digest = hashlib.sha256()
    for asset in ("ict-model", "mediapipe-canonical"):
        path = assets.find(asset)
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    digest.update(f"converter{CONVERTER_VERSION}".encode())
    suffix = "" if region == "face" else f"-{region}"
    return assets.cache_dir() / "models" / f"{name}{suffix}-{digest.hexdigest()[:12]}.npz"


def build_face_model(name: str = "ict-face-lite", force: bool = False, region: str = "face") -> Path:
    """Build (or reuse) a face model in the cache and return its path."""
    from facelab import assets

    path = model_path(name, region)
    if path.exists() and not force:
        return path
    factor = LEVELS[name]
    if factor is None:
        log.info("converting the ICT face model (%s region) to %s", region, path)
        raw = ict.load_raw(assets.find("ict-model"))
        arrays, meta = convert_ict(raw, assets.find("mediapipe-canonical"), region, name)
    else:
        full_name = next(level for level, reduction in LEVELS.items() if reduction is None)
        full_arrays, full_meta = load_model(build_face_model(full_name, force=False, region=region))
        log.info("decimating %s by %d (about 20 s)", full_name, factor)
        arrays, meta = coarsen(full_arrays, full_meta, factor, name)
    return save_model(path, arrays, meta)


def _check(name: str, region: str) -> None:
    if name not in LEVELS:
        raise ValueError(f"unknown face model {name!r}; valid: {sorted(LEVELS)}")
    if region not in REGIONS:
        raise ValueError(f"unknown face region {region!r}; valid: {list(REGIONS)}")


__all__ = ["build_face_model", "model_path", "convert_ict", "coarsen", "upsampling_matrix"]
