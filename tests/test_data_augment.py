"""Augmentation keeps labels on the image: landmarks land where the content moved, flips keep
landmark meanings, masks move with the image, jitter touches the image only."""

from __future__ import annotations

import numpy as np
import pytest

from facelab import assets
from facelab.data.augment import (IRIS_MIRROR, AugmentConfig, Augmenter, dense_mirror_permutation, hflip,
                                  jitter_colour, mirror_permutation, resize, similarity_matrix, warp_affine)
from facelab.facemodel.derive import IBUG_MIRROR_68
from facelab.facemodel.mediapipe import MEDIAPIPE_TO_68
from facelab.facemodel.obj import read_obj_vertices
from tests.test_data_shards import make_sample

ALL_ON = AugmentConfig(flip=True, color_jitter=0.2, max_rotation_deg=10.0, max_scale=0.1, max_shift=0.05)


@pytest.fixture(scope="module")
def dense_perm() -> np.ndarray:
    perm = dense_mirror_permutation()
    if perm is None:
        pytest.skip("asset mediapipe-canonical unavailable")
    return perm


def canonical_face(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The 478 and 68 landmarks of MediaPipe's (mirror-symmetric) canonical face seen frontally,
    centred in a size x size crop; pixel coordinates, y down."""
    try:
        vertices = read_obj_vertices(assets.find("mediapipe/face_model_with_iris.obj", download=False))
    except assets.AssetNotFoundError:
        pytest.skip("MediaPipe face_model_with_iris.obj unavailable")
    points = np.stack([size / 2 + 3.0 * vertices[:, 0], size / 2 - 3.0 * vertices[:, 1]], -1).astype(np.float32)
    return points, points[MEDIAPIPE_TO_68]


def dotted_sample(points: np.ndarray, size: int = 64, sigma: float = 1.5) -> dict:
    """A sample whose image has a Gaussian dot (red channel) centred on each landmark."""
    sample = make_sample(0, size=size)
    centres = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), -1)  # (H,W,2) x,y
    blobs = np.exp(-((centres[:, :, None] - points[None, None]) ** 2).sum(-1) / (2 * sigma**2)).sum(-1)
    sample["image"] = np.zeros((size, size, 3), np.uint8)
    sample["image"][..., 0] = np.clip(np.rint(blobs * 250), 0, 255).astype(np.uint8)
    sample["landmarks"] = np.resize(points, (68, 2)).astype(np.float32)
    return sample


def dot_centre(image: np.ndarray, near: np.ndarray, radius: int = 5) -> np.ndarray:
    """Intensity-weighted centre (continuous pixel coordinates) of the red dot near `near`."""
    x0, y0 = np.floor(near).astype(int) - radius
    window = image[max(y0, 0):y0 + 2 * radius + 1, max(x0, 0):x0 + 2 * radius + 1, 0].astype(np.float64)
    ys, xs = np.mgrid[:window.shape[0], :window.shape[1]]
    return np.array([(window * (xs + max(x0, 0) + 0.5)).sum(), (window * (ys + max(y0, 0) + 0.5)).sum()]) / window.sum()


DOTS = np.array([[20.3, 18.7], [43.1, 21.2], [31.6, 33.4], [17.8, 45.5], [46.2, 44.9]], np.float32)


def test_a_similarity_warp_moves_landmarks_exactly_where_the_image_content_moved():
    sample = dotted_sample(DOTS)
    matrix = similarity_matrix(64, 64, angle_deg=17.0, scale=1.08, shift=(0.04, -0.03))
    warped = warp_affine(sample, matrix)
    for point in warped["landmarks"][: len(DOTS)]:
        np.testing.assert_allclose(dot_centre(warped["image"], point), point, atol=0.05)


def test_resizing_scales_landmarks_with_the_image():
    sample = dotted_sample(DOTS * 2, size=128, sigma=3.0)
    small = resize(sample, 64)
    assert small["image"].shape == (64, 64, 3) and small["mask"].shape == (64, 64)
    for point in small["landmarks"][: len(DOTS)]:
        np.testing.assert_allclose(dot_centre(small["image"], point), point, atol=0.05)


def test_a_flip_moves_landmarks_with_the_image_content():
    flipped = hflip(dotted_sample(DOTS))  # landmarks cycle over the dots; each goes to a mirrored dot
    for point in flipped["landmarks"]:
        np.testing.assert_allclose(dot_centre(flipped["image"], point), point, atol=0.05)


def test_the_mask_and_regions_move_with_the_image():
    sample = make_sample(1, size=64, regions=True)
    disk = ((np.mgrid[:64, :64] + 0.5 - np.array([28.0, 36.0])[:, None, None]) ** 2).sum(0) < 12.0**2
    sample["image"] = np.repeat(disk[..., None] * np.uint8(255), 3, axis=-1)
    sample["mask"] = disk.astype(np.uint8) * 255
    sample["regions"] = disk.astype(np.uint8) * 4
    out = warp_affine(sample, similarity_matrix(64, 64, angle_deg=-12.0, scale=0.93, shift=(-0.05, 0.06)))
    assert set(np.unique(out["mask"])) <= {0, 255} and set(np.unique(out["regions"])) <= {0, 4}
    image_disk, mask_disk = out["image"][..., 0] > 127, out["mask"] > 0
    assert (image_disk & mask_disk).sum() / (image_disk | mask_disk).sum() > 0.97
    assert np.array_equal(out["regions"] > 0, mask_disk)


def test_flipping_twice_restores_the_sample(dense_perm):
    sample = make_sample(2, dense=True, regions=True)
    twice = hflip(hflip(sample))
    for key in ("image", "mask", "regions", "landmarks_conf"):
        np.testing.assert_array_equal(twice[key], sample[key])
    for key in ("landmarks", "dense_landmarks"):
        np.testing.assert_allclose(twice[key], sample[key], atol=1e-5)


def test_a_flip_keeps_landmark_meanings_on_a_symmetric_face(dense_perm):
    dense, landmarks = canonical_face()
    sample = make_sample(3, size=64, dense=True)
    sample["landmarks"], sample["dense_landmarks"] = landmarks, dense
    flipped = hflip(sample)
    # a mirror-symmetric frontal face is its own mirror image: every point keeps its place
    np.testing.assert_allclose(flipped["landmarks"], landmarks, atol=1e-4)
    np.testing.assert_allclose(flipped["dense_landmarks"], dense, atol=1e-4)
    # and on any face: point 36 (right eye, outer corner) goes where the mirrored 45 was
    sample["landmarks"] = landmarks + np.random.default_rng(0).normal(0, 2, landmarks.shape).astype(np.float32)
    flipped = hflip(sample)
    np.testing.assert_allclose(flipped["landmarks"][36], [64 - sample["landmarks"][45, 0], sample["landmarks"][45, 1]])
    right_eye, left_eye = flipped["landmarks"][36:42, 0].mean(), flipped["landmarks"][42:48, 0].mean()
    assert right_eye < left_eye  # the subject's right eye still appears on the image's left
    np.testing.assert_array_equal(flipped["landmarks_conf"], sample["landmarks_conf"][IBUG_MIRROR_68])


def test_the_dense_mirror_permutation_pairs_every_mediapipe_point_with_its_mirror_image(dense_perm):
    try:
        with_iris = read_obj_vertices(assets.find("mediapipe/face_model_with_iris.obj", download=False))
    except assets.AssetNotFoundError:
        pytest.skip("MediaPipe face_model_with_iris.obj unavailable")
    np.testing.assert_array_equal(dense_perm, mirror_permutation(with_iris))
    np.testing.assert_array_equal(dense_perm[dense_perm], np.arange(478))
    assert np.array_equal(dense_perm[468:], IRIS_MIRROR) and dense_perm[1] == 1  # nose tip is its own mirror
    with pytest.raises(ValueError, match="not mirror-symmetric"):
        mirror_permutation(with_iris + np.random.default_rng(0).normal(0, 0.5, with_iris.shape))


def test_colour_jitter_changes_the_image_only():
    sample = make_sample(4, dense=True, regions=True)
    np.testing.assert_array_equal(jitter_colour(sample)["image"], sample["image"])
    out = jitter_colour(sample, brightness=1.2, contrast=0.9, saturation=0.8)
    assert out["image"].dtype == np.uint8 and out["image"].mean() > sample["image"].mean()
    for key in ("mask", "regions", "landmarks", "dense_landmarks", "landmarks_conf"):
        assert out[key] is sample[key]
    # brightness, then contrast about the mean grey, then saturation about each pixel's grey
    image = sample["image"].astype(np.float64) * 1.2
    grey = image @ np.array([0.299, 0.587, 0.114])
    mean = grey.mean()
    image, grey = (image - mean) * 0.9 + mean, (grey[..., None] - mean) * 0.9 + mean
    expected = np.clip((image - grey) * 0.8 + grey, 0, 255)
    assert np.abs(out["image"] - expected).max() < 1.0  # rounding (in single precision) only


def test_the_augmenter_is_fixed_by_its_generator():
    sample = make_sample(5, regions=True)
    augmenter = Augmenter(ALL_ON, image_size=24)
    first = augmenter(sample, np.random.default_rng(7))
    again = augmenter(sample, np.random.default_rng(7))
    other = augmenter(sample, np.random.default_rng(8))
    assert first["image"].shape == (24, 24, 3)
    for key in ("image", "mask", "regions", "landmarks"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["image"], other["image"])


def test_samples_with_ground_truth_are_only_resized():
    sample = make_sample(6, ground_truth=True)
    out = Augmenter(ALL_ON, image_size=16)(sample, np.random.default_rng(0))
    expected = resize(sample, 16)
    for key in ("image", "mask", "landmarks"):
        np.testing.assert_array_equal(out[key], expected[key])
    assert out["params"] is sample["params"] and out["verts"] is sample["verts"]
    augmented = Augmenter(AugmentConfig(color_jitter=0.3, ground_truth=True))(sample, np.random.default_rng(0))
    assert not np.array_equal(augmented["image"], sample["image"])


def test_a_group_gets_one_augmentation_for_all_its_frames():
    single = make_sample(7, regions=True)
    group = {key: np.stack([value] * 3) for key, value in single.items() if isinstance(value, np.ndarray)}
    group["meta"] = [single["meta"]] * 3
    out = Augmenter(ALL_ON, image_size=24)(group, np.random.default_rng(1))
    assert out["image"].shape == (3, 24, 24, 3) and out["landmarks"].shape == (3, 68, 2)
    for key in ("image", "mask", "regions", "landmarks"):
        assert all(np.array_equal(out[key][k], out[key][0]) for k in range(3))
    assert not np.array_equal(out["landmarks"][0], resize(single, 24)["landmarks"])
