"""The synthetic corpus: exact ground truth, determinism, groups, the command and the default build."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facelab.data import schema, synth
from facelab.data.detect import TEMPLATE_5, alignment_points, apply_transform, fit_similarity, skin_mask
from facelab.data.shards import read_index
from facelab.render import MeshRenderer
from facelab.render.camera import PerspectiveCamera, euler_to_matrix, perspective
from facelab.render.rasterize import visible_triangles

SIZE = 64


def read_samples(root: Path) -> list[dict]:
    """Every sample of a shard folder, decoded (and so validated) through the schema."""
    samples = []
    for shard in read_index(root)["shards"]:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(root / shard["name"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        samples += [schema.decode(members[key]) for key in sorted(members)]
    return samples


def write(tmp_path: Path, model, name: str = "out", n: int = 3, **kwargs) -> list[dict]:
    config = kwargs.pop("config", None) or synth.SynthConfig.from_preset("default", image_size=SIZE)
    synth.write_corpus(tmp_path / name, n, config, face_model=model, progress=False, **kwargs)
    return read_samples(tmp_path / name)


def stacked(samples: list[dict], key: str) -> torch.Tensor:
    return torch.from_numpy(np.stack([s["params"][key] for s in samples]))


def test_landmarks_and_vertices_are_recomputed_exactly_from_the_stored_parameters(tmp_path, lite_model):
    samples = write(tmp_path, lite_model, n=4)
    params = {key: stacked(samples, key) for key in samples[0]["params"]}
    with torch.no_grad():
        verts = lite_model(params["shape"], params["expression"])
        args = (euler_to_matrix(params["rotation"]), params["translation"], params["focal"][:, 0], params["principal"])
        landmarks, _ = perspective(lite_model.landmarks(verts), *args)
        dense, _ = perspective(lite_model.dense_landmarks(verts), *args)
    stored = {key: torch.from_numpy(np.stack([sample[key] for sample in samples]))
              for key in ("verts", "landmarks", "dense_landmarks")}
    torch.testing.assert_close(stored["verts"], verts, atol=1e-4, rtol=0)
    torch.testing.assert_close(stored["landmarks"], landmarks, atol=1e-3, rtol=0)
    torch.testing.assert_close(stored["dense_landmarks"], dense, atol=1e-3, rtol=0)
    assert all(float(s["landmarks_conf"].min()) == 1.0 for s in samples)
    inside = (landmarks >= 0) & (landmarks <= SIZE)
    assert bool(inside.all()), "the default framing keeps every landmark in the crop"


def test_visible_mouth_labels_equal_the_rendered_coverage_of_the_labelled_triangles(tmp_path, lite_model):
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, mouth_label="visible")
    samples = write(tmp_path, lite_model, n=3, config=config)
    params = {key: stacked(samples, key) for key in samples[0]["params"]}
    renderer = synth.SynthRenderer(lite_model, SIZE, mouth_label="visible")
    with torch.no_grad():  # the rasterizer's plain torch z-buffer, the reference of the compiled one
        verts = lite_model(params["shape"], params["expression"])
        full = torch.cat([verts, *renderer._fan_vertices(verts)], dim=1)
        camera = PerspectiveCamera(euler_to_matrix(params["rotation"]), params["translation"], params["focal"][:, 0],
                                   params["principal"], synth.ZNEAR, synth.ZFAR)
        ids = visible_triangles(camera.to_clip(full, (SIZE, SIZE)), renderer.triangles, SIZE, SIZE, "torch")
    labels = torch.where(ids >= 0, renderer.labels[ids.clamp_min(0)], 0).numpy()
    skin = np.isin(labels, [schema.REGION_LABELS["skin"], schema.REGION_LABELS["lips"]])
    np.testing.assert_array_equal(np.stack([s["regions"] for s in samples]), labels)
    np.testing.assert_array_equal(np.stack([s["mask"] for s in samples]), skin.astype(np.uint8) * 255)
    assert 0.2 < skin.mean() < 0.9
    for name in ("brows", "eyes", "lips", "mouth_interior"):  # every region is drawn somewhere
        assert (labels == schema.REGION_LABELS[name]).any(), name


MOUTH = schema.REGION_LABELS["mouth_interior"]


def open_mouths_turned_away(lite_model, n: int = 4) -> tuple[dict, dict, dict]:
    """Parameters and renders (mouth_label projected, visible) of open mouths on heads turned
    35 degrees, so that the near lip hides part of the mouth gap."""
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, yaw_deg=(35.0, 35.0), pitch_deg=(0.0, 0.0),
                                           roll_deg=(0.0, 0.0), expression_active=0.0)
    params = synth.sample_parameters(lite_model, config, synth.generator_for(6, 0, 0), n)
    params["expression"][:, lite_model.expression_names.index("jawOpen")] = 0.6
    projected = synth.SynthRenderer(lite_model, SIZE).render(params)
    visible = synth.SynthRenderer(lite_model, SIZE, mouth_label="visible").render(params)
    return params, projected, visible


def pixel_centres_inside(polygon: np.ndarray, size: int) -> np.ndarray:
    """(size,size) bool: the pixel centres (+0.5) inside a closed polygon (L,2) px, even-odd rule."""
    x, y = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    inside = np.zeros((size, size), bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
    return inside


def test_projected_mouth_interior_is_the_inner_lip_polygon_drawn_over_the_lips(lite_model):
    params, projected, visible = open_mouths_turned_away(lite_model)
    with torch.no_grad():  # the inner-lip loop projected as detect.draw_regions fills it on photos
        verts = lite_model(params["shape"], params["expression"])
        rims, _ = synth.SynthRenderer(lite_model, SIZE).camera(params).project(verts[:, lite_model.mouth_loop])
    polygons = np.stack([pixel_centres_inside(rim, SIZE) for rim in rims.numpy()])
    mouth = projected["regions"] == MOUTH
    assert polygons.sum((1, 2)).min() > 30, "the jaw is open"
    assert (mouth != polygons).sum((1, 2)).max() <= 2, "only pixel centres on the polygon's edge may differ"
    hidden = mouth & (visible["regions"] == schema.REGION_LABELS["lips"])
    assert hidden.sum((1, 2)).min() >= 5, "the lip in front of the gap is drawn over"
    # elsewhere the depth-tested labels stay, with the lip triangles of the inner rim as lips
    lips_not_mouth = np.where(visible["regions"] == MOUTH, schema.REGION_LABELS["lips"], visible["regions"])
    np.testing.assert_array_equal(projected["regions"][~mouth], lips_not_mouth[~mouth])


def test_the_mouth_label_changes_labels_only(tmp_path, lite_model):
    projected = write(tmp_path, lite_model, "projected", n=3, seed=4)
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, mouth_label="visible")
    visible = write(tmp_path, lite_model, "visible", n=3, seed=4, config=config)
    for a, b in zip(projected, visible):
        for key in ("image", "landmarks", "dense_landmarks", "verts"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    regions = np.stack([sample["regions"] for sample in projected])
    assert (regions != np.stack([sample["regions"] for sample in visible])).any()
    masks = np.stack([sample["mask"] for sample in projected])
    assert (regions == MOUTH).any() and not masks[regions == MOUTH].any(), "the mouth interior leaves the mask"
    np.testing.assert_array_equal(masks, np.stack([skin_mask(labels) for labels in regions]))


def test_the_projected_mouth_leaves_the_skin_mask(lite_model):
    _, projected, visible = open_mouths_turned_away(lite_model)
    mouth = projected["regions"] == MOUTH
    assert not projected["mask"][mouth].any() and visible["mask"][mouth].any()
    np.testing.assert_array_equal(projected["mask"], np.stack([skin_mask(labels) for labels in projected["regions"]]))


def test_the_fast_render_matches_mesh_renderer_vertex_shading(lite_model):
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, background="black")
    params = synth.sample_parameters(lite_model, config, synth.generator_for(5, 0, 0), 3)
    renderer = synth.SynthRenderer(lite_model, SIZE)
    fast = renderer.render(params)
    with torch.no_grad():
        verts = lite_model(params["shape"], params["expression"])
        full = torch.cat([verts, *renderer._fan_vertices(verts)], dim=1)
        camera = renderer.camera(params)
        in_camera = torch.einsum("bij,bvj->bvi", camera.rotation, full) + camera.translation[:, None]
        albedo = torch.cat([lite_model.albedo(params["albedo"]).clamp(0, 1), renderer.fan_albedo.expand(3, -1, -1)], 1)
        specular = torch.cat([lite_model.specular(params["albedo"]).mean(-1, keepdim=True).clamp_min(0),
                              renderer.fan_specular.expand(3, -1, -1)], 1) * params["specular_scale"][:, :, None]
        reference = MeshRenderer((SIZE, SIZE), backend="torch", shading="vertex", kernels="torch")(
            camera.to_clip(full, (SIZE, SIZE)), in_camera, renderer.triangles, params["sh"], albedo=albedo,
            specular=specular, light_position=params["light_position"], view_position=torch.zeros(3, 3),
            shininess=params["shininess"][:, 0])
    expected = (reference.image.permute(0, 2, 3, 1).clamp(0, 1) * 255).numpy()
    difference = np.abs(fast["image"].astype(np.float32) - expected)
    assert difference.mean() < 1.5, "interpolating display colour in screen space stays within ~1 level"
    assert np.percentile(difference, 99) < 12


def test_same_seed_gives_identical_samples_whatever_the_workers(tmp_path, lite_model):
    first = write(tmp_path, lite_model, "a", n=5, seed=7, batch_size=2, workers=1)
    second = write(tmp_path, lite_model, "b", n=5, seed=7, batch_size=2, workers=2)
    for a, b in zip(first, second):
        for key in ("image", "mask", "regions", "landmarks", "landmarks_conf", "dense_landmarks", "verts"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a["meta"] == b["meta"]
        for key in a["params"]:
            np.testing.assert_array_equal(a["params"][key], b["params"][key], err_msg=key)
    other = write(tmp_path, lite_model, "c", n=5, seed=8)
    assert not np.array_equal(first[0]["params"]["shape"], other[0]["params"]["shape"])


def test_batch_size_changes_only_float_rounding(tmp_path, lite_model):
    small = write(tmp_path, lite_model, "a", n=5, seed=7, batch_size=2)
    large = write(tmp_path, lite_model, "b", n=5, seed=7, batch_size=5)
    for a, b in zip(small, large):
        for key in a["params"]:  # drawn per chunk of 64 frames, not per batch
            np.testing.assert_array_equal(a["params"][key], b["params"][key], err_msg=key)
        np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=1e-4)
        # a pixel centre within rounding (~1e-5 px) of an edge where colour jumps (a silhouette,
        # an eye fan's rim) may flip triangle; every other pixel stays within one level
        changed = np.abs(a["image"].astype(int) - b["image"]).max(-1) > 1
        assert changed.mean() < 1e-3
        assert (a["mask"] != b["mask"]).mean() < 1e-3


def test_clip_frames_share_identity_and_move_linearly_within_bounds(tmp_path, lite_model):
    config = synth.SynthConfig.from_preset("default", image_size=48)
    clips = write(tmp_path, lite_model, n=2, mode="clips", group_size=4, config=config)
    assert read_index(tmp_path / "out")["kind"] == "clips" and read_index(tmp_path / "out")["group_size"] == 4
    for clip in clips:
        params = clip["params"]
        for key in ("shape", "albedo", "focal", "specular_scale", "shininess"):
            assert np.ptp(params[key], axis=0).max() == 0, f"{key} changes within a clip"
        step = np.diff(params["rotation"], axis=0)  # radians per frame
        np.testing.assert_allclose(step, step[:1].repeat(3, 0), atol=1e-5)  # linear: constant velocity
        widths = np.deg2rad([np.ptp(config.pitch_deg), np.ptp(config.yaw_deg), np.ptp(config.roll_deg)])
        assert np.all(np.abs(step[0]) <= config.clip_pose_motion * widths / 3 + 1e-6)
        assert np.abs(step).max() > 0 and np.ptp(params["expression"], axis=0).max() > 0
        assert [meta["frame"] for meta in clip["meta"]] == [0, 1, 2, 3]
        assert len({meta["clip"] for meta in clip["meta"]}) == 1 and clip["image"].shape == (4, 48, 48, 3)
        moved = np.abs(np.diff(clip["landmarks"], axis=0)).max()
        assert 0 < moved < 0.25 * 48, "the face moves, without jumping across the crop"
    assert clips[0]["meta"][0]["identity"] != clips[1]["meta"][0]["identity"]


def test_identity_groups_share_identity_and_albedo_and_vary_the_rest(tmp_path, lite_model):
    groups = write(tmp_path, lite_model, n=2, mode="identities", group_size=3)
    for group in groups:
        params = group["params"]
        assert np.ptp(params["shape"], axis=0).max() == 0 and np.ptp(params["albedo"], axis=0).max() == 0
        for key in ("rotation", "expression", "sh", "focal"):
            assert np.ptp(params[key], axis=0).max() > 0, f"{key} does not vary within an identity group"
        assert len({meta["identity"] for meta in group["meta"]}) == 1


def test_box_framing_centres_the_landmark_box_at_the_requested_size(lite_model):
    config = synth.SynthConfig.from_preset("default", image_size=200, framing="box", face_offset=0.0,
                                           face_size=(0.6, 0.6))
    params = synth.sample_parameters(lite_model, config, synth.generator_for(1, 0, 0), 16)
    with torch.no_grad():
        landmarks, _ = synth.SynthRenderer(lite_model, 200).camera(params).project(
            lite_model.landmarks(lite_model(params["shape"], params["expression"])))
    low, high = landmarks.amin(1), landmarks.amax(1)
    torch.testing.assert_close((low + high) / 2, torch.full((16, 2), 100.0), atol=0.5, rtol=0)
    torch.testing.assert_close((high - low).amax(-1), torch.full((16,), 120.0), atol=0.5, rtol=0)


def preprocessor_alignment(samples: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What FacePreprocessor would do to each stored crop: its five points (n,5,2) px, the
    scale of the similarity it would fit (n,) and how far that moves the template centroid (n,) px."""
    points = np.stack([alignment_points(sample["dense_landmarks"]) for sample in samples])
    template = TEMPLATE_5 * SIZE
    fits = [fit_similarity(five, template) for five in points]
    scales = np.array([np.hypot(*fit[:, 0]) for fit in fits])
    centroid = template.mean(0)
    moved = np.array([np.linalg.norm(apply_transform(fit, centroid) - centroid) for fit in fits])
    return points, scales, moved


def test_template_framing_puts_the_five_alignment_points_on_the_template(tmp_path, lite_model):
    # no jitter, no roll (FacePreprocessor's rotation is left in: the roll stands in for its jitter)
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, face_offset=0.0, template_scale=(1.0, 1.0),
                                           yaw_deg=(-20.0, 20.0), pitch_deg=(-15.0, 15.0), roll_deg=(0.0, 0.0),
                                           expression_active=0.0)
    assert config.framing == "template"
    points, scales, moved = preprocessor_alignment(write(tmp_path, lite_model, n=6, config=config))
    # FacePreprocessor would leave these crops as they are: no scale, no shift (solved exactly) ...
    np.testing.assert_allclose(scales, 1.0, atol=1e-4)
    assert moved.max() < 0.01
    # ... and the points sit on the template up to what no similarity absorbs: the parallax of
    # the nose tip and the face's own proportions (frontal mean face: 0.8% of the crop on average,
    # at most 1.6%; these poses: 1.5% on average, at most 6.7% over 1024 draws)
    error = np.linalg.norm(points - TEMPLATE_5 * SIZE, axis=-1) / SIZE
    assert error.mean() < 0.03 and error.max() < 0.08


def test_template_framing_gives_the_landmark_box_of_real_aligned_crops(tmp_path, lite_model):
    samples = write(tmp_path, lite_model, n=8)  # the default: template framing with its jitter
    landmarks = np.stack([sample["landmarks"] for sample in samples]) / SIZE
    low, high = landmarks.min(1), landmarks.max(1)
    centre, size = ((low + high) / 2).mean(0), (high - low).max(-1).mean()
    # FacePreprocessor's crops of real photos: box centre y ~0.60, size ~0.57 (box framing: 0.50,
    # 0.63); this corpus: 0.578 and 0.594 over 256 draws, standard errors ~0.01 over 8
    assert abs(centre[0] - 0.5) < 0.03 and 0.55 < centre[1] < 0.62
    assert abs(size - 0.57) < 0.05
    config = synth.SynthConfig.from_preset("default", image_size=SIZE)
    _, scales, moved = preprocessor_alignment(samples)
    low_scale, high_scale = config.template_scale
    assert np.all((1 / high_scale - 1e-3 < scales) & (scales < 1 / low_scale + 1e-3)), "the jitter's range"
    assert moved.max() < config.face_offset * SIZE * np.sqrt(2) / low_scale + 0.05
    assert scales.std() > 0 and moved.min() > 0


def test_switching_the_framing_moves_only_the_camera(lite_model):
    def draw(**settings) -> dict[str, torch.Tensor]:
        config = synth.SynthConfig.from_preset("default", image_size=SIZE, **settings)
        return synth.sample_parameters(lite_model, config, synth.generator_for(4, 0, 0), 6)

    box, template, again = draw(framing="box"), draw(framing="template"), draw()
    for name, value in template.items():
        assert torch.equal(value, again[name]), f"{name}: same seed, other values"
        moved = not torch.equal(value, box[name])
        assert moved == (name in ("translation", "light_position")), name


def test_template_framing_moves_linearly_within_a_clip(lite_model):
    config = synth.SynthConfig.from_preset("default", image_size=SIZE, clip_framing_motion=1.0)
    params = synth.sample_parameters(lite_model, config, synth.generator_for(3, 0, 0), 2, "clips", 5)
    with torch.no_grad():
        dense, _ = synth.SynthRenderer(lite_model, SIZE).camera(params).project(
            lite_model.dense_landmarks(lite_model(params["shape"], params["expression"])))
    centroids = np.stack([alignment_points(points).mean(0) for points in dense.numpy()]).reshape(2, 5, 2)
    step = np.diff(centroids, axis=1)  # the template's centroid follows the offset latent
    np.testing.assert_allclose(step, step[:, :1].repeat(4, 1), atol=1e-3)
    assert np.abs(step).max() > 0.01


def test_inversefacenet_preset_draws_the_papers_ranges():
    from facelab.facemodel import load_face_model

    model = load_face_model("ict-face-lite", expression_space="pca")
    config = synth.SynthConfig.from_preset("inversefacenet", image_size=64)
    assert config.framing == "box" and config.face_size == (0.9, 0.9), "the spec's landmark-box crop"
    params = synth.sample_parameters(model, config, synth.generator_for(0, 0, 0), 512)
    degrees = torch.rad2deg(params["rotation"]).abs().amax(0)
    assert bool((degrees <= torch.tensor([40.0, 40.0, 15.0]) + 1e-3).all())
    assert bool((degrees > torch.tensor([35.0, 35.0, 13.0])).all()), "the ranges are used in full"
    sh = params["sh"]
    assert torch.equal(sh[:, 0], sh[:, 1]) and torch.equal(sh[:, 0], sh[:, 2]), "monochrome light"
    assert 0.6 <= float(sh[:, :, 0].min()) and float(sh[:, :, 0].max()) <= 1.2
    assert float(sh[:, :, 1:].abs().max()) <= 0.2
    assert float(params["specular_scale"].abs().max()) == 0.0
    codes = params["expression"]
    assert float(codes[:, 1:].abs().max()) <= 1.5
    assert abs(float(codes[:, 0].mean().abs()) - 0.6) < 0.15, "code 0 carries the shift"
    assert abs(float(params["shape"].std()) - 1.0) < 0.05


def test_self_occluded_landmarks_are_flagged_but_keep_their_projection(lite_model):
    def occluded(yaw: float) -> np.ndarray:
        config = synth.SynthConfig.from_preset("default", image_size=80, yaw_deg=(yaw, yaw), pitch_deg=(0, 0),
                                               roll_deg=(0, 0), expression_active=0.0)
        params = synth.sample_parameters(lite_model, config, synth.generator_for(2, 0, 0), 3)
        return synth.SynthRenderer(lite_model, 80).render(params)["landmarks_occluded"]

    assert not occluded(0.0).any()
    turned = occluded(50.0)  # the face turns to the viewer's right: its left jaw line goes behind
    assert turned[:, 12:17].all() and not turned[:, 0:8].any()


def test_photo_backgrounds_fill_the_uncovered_pixels(tmp_path, lite_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("red.png", (255, 0, 0)), ("blue.jpg", (0, 0, 255))):
        Image.new("RGB", (40, 30), colour).save(folder / name)
    samples = write(tmp_path, lite_model, n=4, backgrounds=folder)
    for sample in samples:
        corners = sample["image"][[0, 0, -1], [0, -1, 0]].astype(int)  # top corners and bottom left
        uncovered = sample["regions"][[0, 0, -1], [0, -1, 0]] == 0
        pure = np.abs(corners - [255, 0, 0]).max(1) <= 3
        pure |= np.abs(corners - [0, 0, 255]).max(1) <= 3
        assert pure[uncovered].all()


def test_cli_writes_the_requested_count_with_a_progress_bar(tmp_path, capsys):
    from facelab.cli import main

    out = tmp_path / "cli"
    assert main(["data", "synth", "--out", str(out), "--n", "3", "--image-size", "32", "--seed", "3",
                 "--set", "yaw_deg=[-10, 10]"]) == 0
    captured = capsys.readouterr()
    assert "3/3" in captured.err and "synth" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["count"] == 3
    index = read_index(out)
    assert index["count"] == 3 and index["info"]["complete"] and index["info"]["settings"]["seed"] == 3
    assert index["info"]["settings"]["config"]["yaw_deg"] == [-10, 10]
    assert len(read_samples(out)) == 3


@pytest.mark.parametrize("arguments, message", [
    (["--n", "0"], "at least 1"),
    (["--n", "2", "--mode", "clips", "--group-size", "1"], "group size"),
    (["--n", "2", "--set", "yaw=[0,1]"], "unknown synth setting"),
    (["--n", "2", "--set", "background=photos"], "--backgrounds"),
    (["--n", "2", "--backgrounds", "/nonexistent/folder"], "does not exist"),
    (["--n", "2", "--seed", "-1"], "non-negative"),
    (["--n", "2", "--set", "yaw_deg=30"], "expected a range"),
    (["--n", "2", "--set", "mouth_label=depth"], "mouth_label"),
])
def test_cli_rejects_bad_arguments_with_a_clear_message(tmp_path, capsys, arguments, message):
    from facelab.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "bad"), "--image-size", "32", *arguments]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_write_over_existing_shards(tmp_path, capsys, lite_model):
    write(tmp_path, lite_model, "taken", n=1)
    from facelab.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "taken"), "--n", "1", "--image-size", "32"]) == 2
    assert "already holds shards" in capsys.readouterr().err


def test_ensure_corpus_builds_train_and_held_out_test_once(tmp_path):
    data = {"image_size": 32, "synth": {"n_train": 3, "n_test": 2, "seed": 1, "batch_size": 4}}
    root = synth.ensure_corpus(tmp_path / "corpus", data, progress=False)
    train, test = read_index(root / "train"), read_index(root / "test")
    assert (train["count"], test["count"]) == (3, 2)
    assert test["info"]["settings"]["seed"] == synth.SYNTH_DEFAULTS["test_seed"] != train["info"]["settings"]["seed"]
    stamp = (root / "train" / "index.json").stat().st_mtime_ns
    synth.ensure_corpus(root, data, progress=False)  # complete and matching: kept
    assert (root / "train" / "index.json").stat().st_mtime_ns == stamp
    other_data = {**data, "synth": {**data["synth"], "seed": 2}}
    other_seed = synth.ensure_corpus(tmp_path / "other", other_data, progress=False)
    test_a, test_b = read_samples(root / "test"), read_samples(other_seed / "test")
    np.testing.assert_array_equal(test_a[0]["image"], test_b[0]["image"])  # the benchmark ignores the train seed
    with pytest.raises(ValueError, match="image_size"):
        synth.ensure_corpus(root, {**data, "image_size": 48}, progress=False)
    index = json.loads((root / "test" / "index.json").read_text())
    index["info"]["complete"] = False  # as after an interrupted build
    (root / "test" / "index.json").write_text(json.dumps(index))
    synth.ensure_corpus(root, data, progress=False)
    assert read_index(root / "test")["info"]["complete"]
    with pytest.raises(ValueError, match="test_seed"):
        synth.corpus_settings({"synth": {"seed": 5, "test_seed": 5}})
    index = json.loads((root / "train" / "index.json").read_text())
    del index["info"]["settings"]["config"]["mouth_label"]  # as written before the setting existed
    (root / "train" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="mouth_label: None there, 'projected' asked"):
        synth.ensure_corpus(root, data, progress=False)
