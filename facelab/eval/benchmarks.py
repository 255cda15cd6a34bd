"""The three benchmarks behind ``facelab eval``: a candidate (a trained checkpoint, or the mean
face of one) is run over a benchmark's samples and scored with :mod:`facelab.eval.metrics`.

- ``synthetic``: the held-out split of a synthetic corpus (exact ground truth). Vertex error
  after similarity and after rigid alignment (mm), landmark NME (AFLW2000 box normalisation, %)
  and px, photometric error of the render inside the face mask, silhouette IoU, and, when the
  method's face model is the corpus's, albedo error (per-channel gain fitted) and lighting error
  (irradiance over the front hemisphere).
- ``aflw2000``: photos in the AFLW2000-3D layout (``imageNNNNN.jpg`` + ``.mat`` with
  ``pt3d_68`` and ``Pose_Para``). Faces are found and aligned by the data layer (YuNet +
  FaceMesh, as ``facelab data prep`` does) rather than cropped from the annotation, so a photo
  whose face is not found counts as a failure and is left out of the means (the count is
  reported). 2D and 3D 68-point NME by yaw bin and their balanced mean.
- ``scan``: photos with a 3D scan each (``NAME.jpg|png`` + ``NAME.obj|ply`` + a landmark sidecar,
  see :func:`facelab.eval.scan_io.read_scan`): the NoW protocol, scan-to-mesh distance after a
  landmark similarity and ICP refinement; median, mean and std in mm.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from facelab.eval import metrics

log = logging.getLogger(__name__)

BENCHES = ("synthetic", "aflw2000", "scan")
#: Scan-landmark layouts the scan benchmark accepts, by landmark count: the iBUG-68 index of each
#: scan landmark in order, and the positions in that list of the subject's right and left outer
#: eye corners and of the nose bottom (iBUG 33), which place the face crop. 7 is NoW's layout
#: (the four eye corners right to left, nose bottom, right and left mouth corner).
SCAN_LAYOUTS = {5: ([36, 45, 33, 48, 54], (0, 1, 2)),
                7: ([36, 39, 42, 45, 33, 48, 54], (0, 3, 4)),
                68: (list(range(68)), (36, 45, 33))}
#: NoW's face crop: a sphere around the point `CROP_TOWARD_EYES` of the way from the nose bottom
#: to the outer eye corners' midpoint, of radius `CROP_RADIUS_FACTOR` x the mean of the outer-eye
#: distance and the nose length (that midpoint to the nose bottom).
CROP_TOWARD_EYES, CROP_RADIUS_FACTOR = 0.3, 1.4


@dataclass
class Candidate:
    """What is evaluated: a method's predictions, or (``mean_face``) its zero head's (the mean
    shape at the default pose and light), the baseline every table carries."""

    name: str
    method: Any  # a FaceReconMethod in eval mode
    mean_face: bool = False
    checkpoint: str | None = None

    @torch.no_grad()
    def __call__(self, images: Tensor) -> dict[str, Any]:
        """The full prediction (parameters, geometry, renders) for (B,3,S,S) crops."""
        return self.method.reconstruct(self.params(images))

    @torch.no_grad()
    def params(self, images: Tensor) -> dict[str, Tensor]:
        """The predicted parameter groups alone (no decode, no render)."""
        if self.mean_face:
            return {k: v.to(self.method.device) for k, v in self.method.mean_params(len(images)).items()}
        return self.method.encode(images.to(self.method.device))

    @property
    def image_size(self) -> int:
        return int(self.method.image_size)


@dataclass
class Scores:
    """Per-sample metric values, summed as they come (NaN values are left out of the mean and
    counted), plus any values kept whole for a later summary (``kept``)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    kept: dict[str, list] = field(default_factory=dict)

    def add(self, name: str, values: Tensor | Sequence[float]) -> None:
        for value in (values.detach().double().flatten().tolist() if isinstance(values, Tensor) else values):
            if value is None or not math.isfinite(value):
                continue
            self.sums[name] = self.sums.get(name, 0.0) + float(value)
            self.counts[name] = self.counts.get(name, 0) + 1

    def keep(self, name: str, values: Tensor | Sequence[float]) -> None:
        self.kept.setdefault(name, []).extend(values.detach().double().flatten().tolist()
                                              if isinstance(values, Tensor) else list(values))

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / self.counts[name] for name in self.sums}


# --- synthetic ----------------------------------------------------------------------------------------
def synthetic_split(data: str | Path) -> Path:
    """The shard folder of a synthetic benchmark: `data` itself when it holds an index.json,
    else its ``test`` split (a corpus root)."""
    root = Path(data)
    for folder in (root, root / "test"):
        if (folder / "index.json").is_file():
            return folder
    raise FileNotFoundError(f"{root}: no synthetic shards (expected {root}/index.json or {root}/test/index.json); "
                            "build a corpus with `facelab data synth` or train once, which builds the default one")


def default_synthetic_data(method: Any) -> Path:
    """The held-out split of the corpus the method's run config names (built if missing)."""
    from facelab.data.datamodules import build_datamodule

    datamodule = build_datamodule(method.cfg.data, seed=int(method.cfg.get("seed", 0)), rank=0, world_size=1)
    datamodule.prepare_data()
    return datamodule.root / "test"


def synthetic_batches(split: Path, image_size: int, batch_size: int, limit: int | None = None) -> Iterator[dict]:
    """Batches of the split, resized to the candidate's crop size (no augmentation)."""
    from facelab.data.augment import AugmentConfig, Augmenter
    from facelab.data.datamodules import GroupTransform
    from facelab.data.stream import ShardStream, StreamLoader

    transform = GroupTransform(Augmenter(AugmentConfig(), image_size), None, True, False)
    stream = ShardStream(split, epoch_length=None, batch_size=batch_size, transform=transform, rank=0, world_size=1)
    if stream.group_size is not None:
        raise ValueError(f"{split} holds groups of {stream.group_size} frames ({stream.kind}); bench=synthetic reads "
                         "single images: build one with `facelab data synth --mode images`")
    loader = StreamLoader(stream, num_workers=0)
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(batch["image"]) > limit:
            keep = limit - seen
            batch = _head(batch, keep)
        seen += len(batch["image"])
        yield batch


def _head(batch: Mapping[str, Any], count: int) -> dict:
    def cut(value):
        if isinstance(value, Tensor):
            return value[:count]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return value[:count]
        return value

    return {k: cut(v) for k, v in batch.items()}


def corpus_settings(split: Path) -> tuple[str | None, int | None]:
    """(face model name, crop size) the corpus was rendered with, from its index."""
    from facelab.data.shards import read_index

    config = read_index(split).get("info", {}).get("settings", {}).get("config") or {}
    size = config.get("image_size")
    return config.get("face_model"), int(size) if size else None


def score_synthetic(candidate: Candidate, batch: Mapping[str, Any], scores: Scores, same_model: bool,
                    corpus_size: int | None = None) -> dict:
    """Adds one batch's synthetic metrics to `scores`; returns the candidate's output.

    same_model: the candidate's face model is the corpus's (vertex, albedo errors comparable);
    corpus_size: the corpus's crop size, in whose pixels ``landmark_error_px`` is reported
    whatever the candidate's crop size (None: the candidate's)."""
    device = candidate.method.device
    out = candidate(batch["image"])
    image = batch["image"].to(device)
    truth_landmarks = batch["landmarks"].to(device).float()
    landmarks = out["landmarks"].float()
    scores.add("landmark_nme_pct", 100 * metrics.nme_aflw2000(landmarks, truth_landmarks))
    to_corpus_px = (corpus_size or candidate.image_size) / candidate.image_size
    scores.add("landmark_error_px", to_corpus_px * metrics.landmark_error(landmarks, truth_landmarks))
    verts = batch.get("verts")
    if verts is not None and verts.shape[1:] == out["vertices"].shape[1:]:
        verts = verts.to(device).float()
        scores.add("vertex_error_mm", metrics.aligned_vertex_error(out["vertices"].float(), verts, "similarity"))
        scores.add("vertex_error_rigid_mm", metrics.aligned_vertex_error(out["vertices"].float(), verts, "rigid"))
    mask = batch["mask"].to(device) * out["coverage"]
    scores.add("photometric_error", metrics.photometric_error(image, out["render"].float(), mask))
    regions = batch.get("regions")
    if regions is not None:
        silhouette = (regions.to(device) != 0).float()
        scores.add("mask_iou", metrics.mask_iou(out["coverage"][:, 0], silhouette))
    params = batch.get("params") or {}
    gain = None
    model = candidate.method.face_model
    predicted = vertex_albedo(candidate.method, out)
    if same_model and predicted is not None and "albedo" in params and params["albedo"].shape[-1] == model.num_albedo:
        truth = model.albedo(params["albedo"].to(device).float()).clamp(0, 1)  # the corpus clamps it
        scores.add("albedo_error", metrics.albedo_error(predicted.float(), truth, align="scale"))
        gain = albedo_gain(predicted.float(), truth)
    if "sh" in params and "sh" in out:
        # albedo x g under light / g renders the same image: the light is compared with the
        # albedo's fitted gain undone, so one ambiguity is not counted twice
        light = out["sh"].float() if gain is None else out["sh"].float() / gain[..., None]
        scores.add("lighting_error", metrics.lighting_error(light, params["sh"].to(device).float()))
    return out


def albedo_gain(predicted: Tensor, target: Tensor) -> Tensor:
    """(B,3) least-squares gain per image and channel taking predicted (B,V,3) albedo to target."""
    return (predicted * target).sum(dim=1) / predicted.square().sum(dim=1).clamp_min(1e-12)


def vertex_albedo(method: Any, out: Mapping[str, Any]) -> Tensor | None:
    """(B,V,3) linear per-vertex albedo of a prediction: the method's own ``vertex_albedo`` output,
    or its face model's albedo of the predicted codes; None when it predicts neither."""
    if "vertex_albedo" in out:
        return out["vertex_albedo"]
    codes = out.get("albedo")
    if isinstance(codes, Tensor) and codes.ndim == 2 and hasattr(method.face_model, "albedo"):
        return method.face_model.albedo(codes)
    return None


# --- AFLW2000-3D ----------------------------------------------------------------------------------------
#: AFLW2000-3D's annotations come from MATLAB fitting, whose first pixel's centre is (1, 1);
#: facelab's is (0.5, 0.5), so x and y move by -0.5 (about 0.3% NME on a 150-px face).
MATLAB_PIXEL_OFFSET = 0.5


@dataclass
class AflwSample:
    name: str
    crop: dict  # FacePreprocessor output (image, landmarks, meta["to_original"], ...)
    landmarks_3d: np.ndarray  # (68,3) photo pixels, +z toward the camera
    yaw_deg: float


def read_aflw2000(data: str | Path, image_size: int, limit: int | None = None,
                  progress: bool = True) -> tuple[list[AflwSample], dict[str, str]]:
    """Detected and aligned crops of an AFLW2000-3D folder with their annotations (``pt3d_68`` in
    facelab's pixel convention, yaw from ``Pose_Para``), and the photos that gave none ({file
    name: reason}). A .jpg without its .mat, or a .mat without pt3d_68 or Pose_Para, is a
    failure with that reason, not a crash."""
    import scipy.io
    from tqdm import tqdm

    from facelab.data.detect import FacePreprocessor, FaceSkipped
    from facelab.data.prep import read_image

    root = Path(data)
    photos = sorted(p for p in root.glob("*.jpg")) if root.is_dir() else []
    if not photos:
        raise FileNotFoundError(f"{root}: no AFLW2000-3D photos (expected imageNNNNN.jpg with imageNNNNN.mat beside "
                                "each); pass data=PATH to the AFLW2000-3D folder")
    if limit is not None:
        photos = photos[:limit]
    samples, failures = [], {}
    preprocess = FacePreprocessor(size=image_size)
    try:
        for photo in tqdm(photos, desc=f"aflw2000 @{image_size}px", unit="photo", disable=not progress):
            annotation = photo.with_suffix(".mat")
            try:
                values = scipy.io.loadmat(annotation)
                points, pose = np.asarray(values["pt3d_68"], np.float64), np.asarray(values["Pose_Para"], np.float64)
            except FileNotFoundError:
                failures[photo.name] = f"no annotation {annotation.name}"
                continue
            except (KeyError, ValueError, OSError) as error:
                failures[photo.name] = f"unreadable annotation {annotation.name}: {error}"
                continue
            if points.shape != (3, 68) or pose.size < 3:
                failures[photo.name] = f"{annotation.name}: pt3d_68 {points.shape}, expected (3, 68)"
                continue
            try:
                crop = preprocess(read_image(photo))
            except FaceSkipped as skipped:
                failures[photo.name] = skipped.reason + (f" ({skipped.detail})" if skipped.detail else "")
                continue
            points = points.T.copy()
            points[:, :2] -= MATLAB_PIXEL_OFFSET
            samples.append(AflwSample(photo.name, crop, points, math.degrees(float(pose.flat[1]))))
    finally:
        preprocess.close()
    return samples, failures


def photo_landmarks_3d(candidate: Candidate, out: Mapping[str, Any],
                       to_original: Tensor) -> tuple[Tensor, Tensor | None]:
    """Predicted 68 landmarks in photo pixels: (B,68,2) and (B,68,3) with z in pixel units
    (+z toward the camera), or None for the latter when the method has no ``posed_vertices``.
    x, y are the projected landmarks mapped through the crop's similarity; z is the posed
    landmark depth times a pixels-per-mm factor fitted between the posed (x, -y) and the
    projections, so any camera model gives image-scaled depth."""
    model = candidate.method.face_model
    crop = out["landmarks"].double()  # (B,68,2)
    affine = to_original.to(crop)  # (B,2,3)
    photo = torch.einsum("bij,blj->bli", affine[:, :, :2], crop) + affine[:, None, :, 2]
    posed = out.get("posed_vertices")
    if posed is None:  # no 3D prediction in the camera frame: no 3D NME rather than a flat one
        return photo, None
    points = model.landmarks(posed).double()
    flat = torch.stack([points[..., 0], -points[..., 1]], dim=-1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    target = crop - crop.mean(dim=1, keepdim=True)
    px_per_mm = (centred * target).sum(dim=(1, 2)) / centred.square().sum(dim=(1, 2)).clamp_min(1e-12)
    photo_scale = torch.linalg.det(affine[:, :, :2]).abs().sqrt()
    depth = (points[..., 2] * (px_per_mm * photo_scale)[:, None])[..., None]
    return photo, torch.cat([photo, depth], dim=-1)


def score_aflw2000(candidate: Candidate, samples: Sequence[AflwSample], batch_size: int, scores: Scores,
                   progress: bool = True) -> None:
    from tqdm import tqdm

    for start in tqdm(range(0, len(samples), batch_size), desc=candidate.name, unit="batch", disable=not progress):
        chunk = samples[start:start + batch_size]
        images = torch.stack([torch.from_numpy(s.crop["image"]).permute(2, 0, 1).float() / 255 for s in chunk])
        to_original = torch.tensor(np.stack([np.asarray(s.crop["meta"]["to_original"]) for s in chunk]))
        out = candidate(images)
        photo_2d, photo_3d = photo_landmarks_3d(candidate, out, to_original)
        truth = torch.tensor(np.stack([s.landmarks_3d for s in chunk]))
        scores.keep("nme_2d", metrics.nme_aflw2000(photo_2d, truth[..., :2]))
        if photo_3d is not None:
            scores.keep("nme_3d", metrics.nme_aflw2000(photo_3d, truth))
        scores.keep("yaw_deg", [s.yaw_deg for s in chunk])


def summarise_aflw2000(scores: Scores, failures: Mapping[str, str]) -> dict[str, Any]:
    yaw = torch.tensor(scores.kept.get("yaw_deg", []), dtype=torch.float64)
    result: dict[str, Any] = {}
    for kind in ("nme_2d", "nme_3d"):
        if kind not in scores.kept:
            continue
        values = torch.tensor(scores.kept[kind], dtype=torch.float64)
        binned = metrics.nme_by_yaw(values * 100, yaw) if len(values) else {}
        for key, value in binned.items():
            if key != "counts":
                result[f"{kind}_pct {key}"] = value
        result[f"{kind}_counts"] = binned.get("counts", {})
    result["evaluated"] = len(yaw)
    result["failed"] = len(failures)
    return result


# --- scans (NoW style) -----------------------------------------------------------------------------------
@dataclass
class ScanSample:
    name: str
    photo: Path
    scan: Path


def find_scans(data: str | Path, limit: int | None = None) -> list[ScanSample]:
    from facelab.data.prep import IMAGE_EXTENSIONS

    root = Path(data)
    samples = []
    for photo in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if root.is_dir() else []:
        scans = [photo.with_suffix(s) for s in (".obj", ".ply") if photo.with_suffix(s).is_file()]
        if scans:
            samples.append(ScanSample(photo.stem, photo, scans[0]))
    if not samples:
        raise FileNotFoundError(f"{root}: no photo/scan pairs (expected NAME.jpg|png beside NAME.obj|ply and a "
                                "landmark sidecar such as NAME.pp or NAME_landmarks.txt); pass data=PATH")
    return samples[:limit] if limit is not None else samples


def face_crop(landmarks: Tensor) -> tuple[Tensor, float]:
    """NoW's face crop of a scan from its landmarks (a SCAN_LAYOUTS layout): (centre (3,), radius)."""
    right_eye, left_eye, nose = (landmarks[i] for i in SCAN_LAYOUTS[len(landmarks)][1])
    eyes = (right_eye + left_eye) / 2
    centre = nose + CROP_TOWARD_EYES * (eyes - nose)
    radius = CROP_RADIUS_FACTOR * float((right_eye - left_eye).norm() + (eyes - nose).norm()) / 2
    return centre, radius


def score_scans(candidate: Candidate, samples: Sequence[ScanSample], scores: Scores,
                crops: Callable[[ScanSample], dict], progress: bool = True) -> tuple[dict, dict[str, str]]:
    """NoW protocol per sample: the predicted neutral face (expression codes at the zero head's,
    as NoW scores identity shape) against the scan cropped to the face. Every scan point's
    distance goes into `scores` (kept, pooled over scans as NoW reports them). Returns ({name:
    {median, mean, std}} per scored sample, {name: reason} for those that could not be scored)."""
    from tqdm import tqdm

    from facelab.data.detect import FaceSkipped
    from facelab.eval.scan import scan_to_mesh_error
    from facelab.eval.scan_io import read_scan

    failures, per_sample = {}, {}
    method = candidate.method
    model = method.face_model
    for sample in tqdm(samples, desc=candidate.name, unit="scan", disable=not progress):
        try:
            crop = crops(sample)
            scan = read_scan(sample.scan)
            if scan.landmarks is None or len(scan.landmarks) not in SCAN_LAYOUTS:
                raise ValueError(f"{sample.scan.name}: needs 5, 7 (NoW) or 68 landmarks, found "
                                 f"{0 if scan.landmarks is None else len(scan.landmarks)}")
            image = torch.from_numpy(crop["image"]).permute(2, 0, 1).float()[None] / 255
            params = dict(candidate.params(image))
            params["expression"] = method.mean_params(1)["expression"].to(params["expression"])
            with torch.no_grad():
                vertices = method.decode(params)["vertices"][0].double().cpu()
            scan_landmarks = torch.as_tensor(np.asarray(scan.landmarks), dtype=torch.float64)
            centre, radius = face_crop(scan_landmarks)
            mesh_landmarks = model.landmarks(vertices[None])[0][SCAN_LAYOUTS[len(scan_landmarks)][0]]
            result = scan_to_mesh_error(torch.as_tensor(np.asarray(scan.points), dtype=torch.float64), scan_landmarks,
                                        vertices, model.triangles.cpu(), mesh_landmarks, crop_radius=radius,
                                        crop_centre=centre)
        except FaceSkipped as skipped:
            failures[sample.name] = skipped.reason
            continue
        except ValueError as error:  # a garbled scan or sidecar, too few points in the crop
            failures[sample.name] = str(error)
            continue
        per_sample[sample.name] = {key: float(result[key]) for key in ("median", "mean", "std")}
        scores.keep("distances", result["distances"])
    return per_sample, failures


def summarise_scans(scores: Scores, per_sample: Mapping[str, dict], failures: Mapping[str, str]) -> dict[str, Any]:
    """Median, mean and std (mm) of every scan point's distance, pooled over the scans (NoW's
    cumulative statistics, not a mean of per-scan figures)."""
    result: dict[str, Any] = {}
    distances = np.asarray(scores.kept.get("distances", []), dtype=np.float64)
    if len(distances):
        result.update(scan_median_mm=float(np.median(distances)), scan_mean_mm=float(distances.mean()),
                      scan_std_mm=float(distances.std()))
    result["evaluated"] = len(per_sample)
    result["failed"] = len(failures)
    return result
