"""`facelab reconstruct`: photos -> params.json, meshes and overlays, with skips and exit codes.

The checkpoint is the untrained `specular_checkpoint` (64 px): its zero head predicts the mean face
at the default pose, centred in the aligned crop, whatever the photo. So the tests check the
geometry chain (crop -> photo, model space) and the bookkeeping, not the network's accuracy.
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import pytest
import torch

from facelab.data.detect import apply_transform, invert_transform, warp_image
from facelab.data.prep import read_image
from facelab.facemodel.obj import read_obj
from facelab.reconstruct import Reconstructor, add_cli, find_images, paste_render, reconstruct
from facelab.viz.grid import HEADER_HEIGHT, SEPARATOR

CELL = 256  # relit.png / expression.png cells (DISPLAY_SIZE; the crop is 64 px)


@pytest.fixture(scope="module")
def photo_run(specular_checkpoint, faces_dir, tmp_path_factory):
    """reconstruct() on image_0010.png with --relight: (report, its output folder)."""
    out = tmp_path_factory.mktemp("recon")
    report = reconstruct(faces_dir / "image_0010.png", specular_checkpoint, out, relight=True, progress=False)
    return report, out / "image_0010"


@pytest.fixture(scope="module")
def method(specular_checkpoint):
    from facelab.methods import load_method

    return load_method(str(specular_checkpoint))


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="facelab")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reconstruct", *argv])
    return args.func(args)


def _read_pts(path) -> np.ndarray:
    """iBUG .pts: a header, then the points between braces, one 'x y' per line (1-based pixels)."""
    text = path.read_text()
    return np.array(text[text.index("{") + 1:text.index("}")].split(), float).reshape(-1, 2)


def _cell(grid: np.ndarray, column: int) -> np.ndarray:
    left = column * (CELL + SEPARATOR)
    return grid[HEADER_HEIGHT:HEADER_HEIGHT + CELL, left:left + CELL].astype(np.float64)


def test_a_photo_gives_params_meshes_and_overlay(photo_run, method):
    report, folder = photo_run
    assert report.exit_code == 0 and report.written == [folder] and not report.skipped
    for name in ("params.json", "mesh.obj", "mesh.ply", "overlay.png", "relit.png"):
        assert (folder / name).is_file(), name
    model = method.face_model
    mesh = read_obj(folder / "mesh.obj")
    assert len(mesh.vertices) == model.num_vertices
    assert len(mesh.uvs) == len(model.uv) and (mesh.faces_vt >= 0).all()
    np.testing.assert_array_equal(mesh.faces_vt, model.uv_triangles.numpy())
    np.testing.assert_array_equal(mesh.faces_v, model.triangles.numpy())
    # model space, not posed: a zero head's face is the model's mean (mm, +y up)
    np.testing.assert_allclose(mesh.vertices, model.mean.numpy(), atol=1e-3)
    header = (folder / "mesh.ply").read_bytes()[:400].decode("ascii", "replace")
    assert f"element vertex {model.num_vertices}" in header and "property uchar red" in header
    record = json.loads((folder / "params.json").read_text())
    assert record["method"] == "specular" and record["image_size"] == 64
    assert record["checkpoint"].endswith("specular.ckpt") and np.array(record["to_original"]).shape == (2, 3)
    for group, zeros in method.mean_params(1).items():
        assert len(record["params"][group]) == zeros.shape[1], group


def test_predicted_landmarks_land_on_the_face_in_photo_pixels(photo_run, faces_dir):
    record = json.loads((photo_run[1] / "params.json").read_text())
    predicted, detected = np.array(record["landmarks_68"]), np.array(record["detected_landmarks_68"])
    x, y, width, height = record["detector"]["box"]
    # The untrained model draws the frontal mean face at the template's framing; on this
    # three-quarter view its far jaw contour reaches 31% of the box width beyond the box, so the
    # box is grown by 35% a side. A broken crop -> photo mapping misses by hundreds of pixels.
    margin = 0.35
    assert (predicted[:, 0] > x - margin * width).all() and (predicted[:, 0] < x + (1 + margin) * width).all()
    assert (predicted[:, 1] > y - margin * height).all() and (predicted[:, 1] < y + (1 + margin) * height).all()
    low, high = predicted.min(axis=0), predicted.max(axis=0)
    overlap = np.prod(np.clip(np.minimum(high, [x + width, y + height]) - np.maximum(low, [x, y]), 0, None))
    union = np.prod(high - low) + width * height - overlap
    assert overlap / union > 0.5  # measured 0.70
    # Against the photo's own annotation (iBUG order, 1-based pixels: +0.5 would shift by half a pixel)
    truth = _read_pts(faces_dir / "image_0010.pts")
    size = np.sqrt(width * height)
    assert np.linalg.norm(detected - truth, axis=1).mean() < 0.05 * size  # FaceMesh: measured 0.024
    assert np.linalg.norm(predicted - truth, axis=1).mean() < 0.2 * size  # the mean face: measured 0.13


def test_the_mesh_projected_with_the_exported_camera_lands_in_the_face_box(photo_run, method):
    """The acceptance check: load mesh.obj, project its 68 landmark vertices with params.json's
    camera and crop-to-photo similarity, and find them on the detected face; they must also agree
    with the method's own projected landmarks (one camera, not two)."""
    record = json.loads((photo_run[1] / "params.json").read_text())
    camera = record["camera"]
    assert camera["projection"].startswith("perspective")
    mesh = read_obj(photo_run[1] / "mesh.obj")
    assert len(mesh.vertices) == method.face_model.num_vertices
    points = mesh.vertices[method.face_model.landmarks_68.numpy()].astype(np.float64)
    rotation, translation = np.array(camera["rotation"]), np.array(camera["translation"])
    posed = camera["scale"] * points @ rotation.T + translation
    depth = -posed[:, 2]
    crop = np.stack([camera["principal"][0] + camera["focal"] * posed[:, 0] / depth,
                     camera["principal"][1] - camera["focal"] * posed[:, 1] / depth], axis=1)
    photo = apply_transform(np.array(record["to_original"]), crop)
    np.testing.assert_allclose(photo, np.array(record["landmarks_68"]), atol=1e-2)
    x, y, width, height = record["detector"]["box"]
    centre = photo.mean(axis=0)
    assert x < centre[0] < x + width and y < centre[1] < y + height
    # the frontal mean face on this three-quarter view overhangs the box (see the test above)
    margin = 0.35
    assert (photo[:, 0] > x - margin * width).all() and (photo[:, 0] < x + (1 + margin) * width).all()
    assert (photo[:, 1] > y - margin * height).all() and (photo[:, 1] < y + (1 + margin) * height).all()


def test_overlay_changes_the_photo_only_over_the_face(photo_run, faces_dir):
    record = json.loads((photo_run[1] / "params.json").read_text())
    photo = read_image(faces_dir / "image_0010.png")
    overlay = read_image(photo_run[1] / "overlay.png")
    assert overlay.shape == photo.shape
    changed = np.abs(overlay.astype(int) - photo.astype(int)).max(axis=2) > 2
    rows, columns = np.nonzero(changed)
    x, y, width, height = record["detector"]["box"]
    assert x < columns.mean() < x + width and y < rows.mean() < y + height
    # nothing changes outside the crop's footprint in the photo, grown by one crop pixel (bilinear
    # upsampling fades the render's edge pixels out over half a crop pixel beyond the crop)
    to_original = np.array(record["to_original"])
    corners = apply_transform(to_original, np.array([[0, 0], [64, 0], [64, 64], [0, 64]], float))
    footprint = np.zeros(photo.shape[:2], np.uint8)
    cv2.fillPoly(footprint, [np.round(corners - 0.5).astype(np.int32)], 1)
    crop_pixel = int(np.ceil(np.linalg.norm(to_original[:, 0])))  # photo pixels per crop pixel
    footprint = cv2.dilate(footprint, np.ones((2 * crop_pixel + 1,) * 2, np.uint8))
    assert not (changed & (footprint == 0)).any()


def test_paste_render_puts_crop_pixels_back_where_they_came_from():
    # A smooth photo, cropped by a rotated similarity at 1/4 scale (64 px over 256, as a real crop
    # is upsampled into a photo) and pasted back at full opacity: the round trip returns the photo
    # up to interpolation error (measured 1.3); a missing half-pixel shift gives 6.5.
    height, width = 300, 400
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    photo = np.stack([128 + 100 * np.sin(2 * np.pi * xx / 60) * np.cos(2 * np.pi * yy / 70),
                      128 + 80 * np.cos(2 * np.pi * (xx + yy) / 90), np.full_like(xx, 60.0)], axis=2)
    photo = np.round(photo).astype(np.uint8)
    angle, scale = 0.3, 0.25
    to_crop = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0.0],
                        [scale * np.sin(angle), scale * np.cos(angle), 0.0]])
    to_crop[:, 2] = 32 - to_crop[:, :2] @ [200.0, 150.0]  # photo (200,150) -> crop centre
    crop = torch.from_numpy(warp_image(photo, to_crop, 64)).permute(2, 0, 1).float() / 255
    pasted = paste_render(np.zeros_like(photo), crop, torch.ones(1, 64, 64), invert_transform(to_crop), opacity=1.0)
    inside = np.linalg.norm(np.stack([xx - 200, yy - 150], axis=2), axis=2) < 90  # well inside the footprint
    error = np.abs(pasted.astype(float) - photo.astype(float))[inside]
    assert error.mean() < 3.0
    assert (pasted[np.linalg.norm(np.stack([xx - 200, yy - 150], axis=2), axis=2) > 190] == 0).all()  # outside


def test_relit_png_is_brighter_on_the_side_the_key_light_comes_from(photo_run):
    grid = read_image(photo_run[1] / "relit.png")
    assert grid.shape == (HEADER_HEIGHT + CELL, 5 * CELL + 4 * SEPARATOR, 3)  # input, predicted, left, right, top

    def left_minus_right(column: int) -> float:
        cell = _cell(grid, column).mean(axis=2)
        return cell[80:200, 70:128].mean() - cell[80:200, 128:186].mean()  # image halves over the face

    assert left_minus_right(2) > 15 and left_minus_right(3) < -15  # measured +43 and -38
    assert abs(left_minus_right(1)) < 5  # the predicted light (ambient) on the symmetric mean face


def test_find_images_reads_image_suffixes_and_names_outputs_uniquely(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "a.png", "b.PNG", "notes.txt", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    photos, ignored = find_images(tmp_path)
    assert [(file.name, name) for file, name in photos] == [("a.jpg", "a"), ("a.png", "a_png"), ("b.PNG", "b")]
    assert ignored == [str(tmp_path / "notes.txt")]
    photos, _ = find_images([tmp_path, tmp_path / "notes.txt"], recursive=True)
    assert [name for _, name in photos][-2:] == ["sub/c", "notes"]  # a file named on its own is always read


def test_a_folder_with_a_broken_file_and_a_faceless_image_reports_both_and_exits_1(
        tmp_path, specular_checkpoint, faces_dir, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.jpg").write_text("not a photo")
    cv2.imwrite(str(folder / "grey.png"), np.full((240, 320, 3), 128, np.uint8))
    (folder / "readme.txt").write_text("ignored: no image suffix")
    out = tmp_path / "out"
    code = _cli([str(folder), str(faces_dir / "takeo.ppm"), "--ckpt", str(specular_checkpoint), "--out", str(out),
                 "--quiet"])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"skipped {folder / 'grey.png'}: no_face" in printed
    assert f"skipped {folder / 'notes.jpg'}: corrupt" in printed
    summary = printed.strip().splitlines()[-1]
    assert summary.startswith("3 images, 1 faces written, 2 skipped (corrupt 1, no_face 1)")
    assert "1 non-image files ignored (.txt 1)" in summary and "2 of 3 inputs failed" in summary
    assert sorted(path.name for path in out.iterdir()) == ["takeo"]
    assert (out / "takeo" / "mesh.obj").is_file()


@pytest.mark.parametrize("content", [None, b"\x00 not a torch file", "not a facelab checkpoint"])
def test_a_bad_checkpoint_exits_2_naming_the_file(tmp_path, faces_dir, capsys, content):
    ckpt = tmp_path / "bad.ckpt"
    if isinstance(content, bytes):
        ckpt.write_bytes(content)
    elif content is not None:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    code = _cli([str(faces_dir / "takeo.ppm"), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert str(ckpt) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_input_exits_2_naming_it(tmp_path, specular_checkpoint, capsys):
    missing = tmp_path / "nowhere.jpg"
    assert _cli([str(missing), "--ckpt", str(specular_checkpoint), "--out", str(tmp_path / "out")]) == 2
    assert f"{missing}: no such file or folder" in capsys.readouterr().err


def test_expression_transfer_opens_the_jaw_and_leaves_the_eyes(method, faces_dir, tmp_path):
    code = torch.zeros(1, method.face_model.num_expression)
    code[0, method.face_model.expression_names.index("jawOpen")] = 1.0
    reconstructor = Reconstructor(method, checkpoint="fixture")
    try:
        reconstructor.set_expression(code, None, "jaw")
        report = reconstructor.run([(faces_dir / "takeo.ppm", "takeo")], tmp_path, progress=False)
    finally:
        reconstructor.close()
    assert report.exit_code == 0
    grid = read_image(tmp_path / "takeo" / "expression.png")  # input, reconstruction, jaw expression
    difference = np.abs(_cell(grid, 1) - _cell(grid, 2)).mean(axis=2)
    assert difference[40:90].mean() < 0.5  # forehead and brows (rows 0.16..0.35 of the crop): measured 0.05
    assert difference[175:215].mean() > 5  # the lips, parted (rows 0.68..0.84): measured 8


def test_help_names_every_output_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _cli(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("params.json", "mesh.obj", "mesh.ply", "overlay.png", "relit.png", "expression.png",
                   "MODEL space", "Exit status", "--relight", "--expression-from", "--batch-size", "--recursive"):
        assert needle in text, needle


def test_an_expression_source_without_a_face_is_a_usage_error(tmp_path, specular_checkpoint, faces_dir, capsys):
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.full((240, 320, 3), 128, np.uint8))
    code = _cli([str(faces_dir / "takeo.ppm"), "--ckpt", str(specular_checkpoint), "--out", str(tmp_path / "out"),
                 "--expression-from", str(grey), "--quiet"])
    assert code == 2
    assert f"--expression-from {grey}: no_face" in capsys.readouterr().err


def test_bench_reconstruct_reports_photos_per_second_and_stage_shares(tmp_path, faces_dir, lite_model, capsys):
    from facelab.cli import main

    out = tmp_path / "reconstruct.json"
    code = main(["bench", "reconstruct", "--images", str(faces_dir), "--batch-sizes", "4", "--repeats", "1",
                 "--warmup", "0", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert results["image_size"] == 64 and results["photos"] == 8 and results["checkpoint"].startswith("untrained")
    (case,) = results["cases"]
    # every face of every photo: the group photos add faces (breakingbad, einstein, fr_two_people)
    assert case["batch_size"] == 4 and case["photos"] == 8 and case["faces"] > 8
    total = case["timings"]["total"]["median_s"]
    assert abs(case["images_per_second"] - 8 / total) < 0.01 * case["images_per_second"] + 0.01
    assert abs(sum(case["share"].values()) - 1) < 0.01 and set(case["share"]) == {"detect", "network", "export"}


def test_bare_command_uses_the_newest_run_and_writes_under_runs(specular_checkpoint, faces_dir, tmp_path,
                                                                monkeypatch, capsys):
    """`facelab reconstruct photo.png` after `make train`: the newest last.ckpt, runs/reconstruct/."""
    import os
    import shutil

    monkeypatch.chdir(tmp_path)
    assert _cli([str(faces_dir / "takeo.ppm"), "--quiet"]) == 2  # no run yet: a usage error that says so
    assert "no --ckpt given" in capsys.readouterr().err
    for name, age in (("older", 100), ("newer", 0)):
        folder = tmp_path / "runs" / name / "checkpoints"
        folder.mkdir(parents=True)
        shutil.copy(specular_checkpoint, folder / "last.ckpt")
        stamp = os.path.getmtime(folder / "last.ckpt") - age
        os.utime(folder / "last.ckpt", (stamp, stamp))
    assert _cli([str(faces_dir / "takeo.ppm"), "--quiet"]) == 0
    assert "runs/newer/checkpoints/last.ckpt" in capsys.readouterr().err
    written = tmp_path / "runs" / "reconstruct" / "takeo"
    assert {"params.json", "mesh.obj", "mesh.ply", "overlay.png"} <= {p.name for p in written.iterdir()}


def test_every_face_of_a_group_photo_gets_its_own_folder(specular_checkpoint, faces_dir, tmp_path):
    """fr_two_people.jpg: two faces, the larger in OUT/<name>/, the other in OUT/<name>_face2/, on
    different parts of the photo; --faces largest keeps the first alone."""
    photo = faces_dir / "fr_two_people.jpg"
    report = reconstruct(photo, specular_checkpoint, tmp_path / "all", progress=False)
    assert report.exit_code == 0 and len(report.written) == 2
    first, second = (json.loads((tmp_path / "all" / name / "params.json").read_text())
                     for name in ("fr_two_people", "fr_two_people_face2"))
    box_a, box_b = np.array(first["detector"]["box"]), np.array(second["detector"]["box"])
    assert box_a[2] * box_a[3] >= box_b[2] * box_b[3]  # largest first
    centre_a, centre_b = box_a[:2] + box_a[2:] / 2, box_b[:2] + box_b[2:] / 2
    assert np.linalg.norm(centre_a - centre_b) > max(box_a[2], box_b[2])  # two faces, not one twice
    for record in (first, second):
        x, y, width, height = record["detector"]["box"]
        centre = np.array(record["landmarks_68"]).mean(axis=0)
        assert x < centre[0] < x + width and y < centre[1] < y + height
    largest = reconstruct(photo, specular_checkpoint, tmp_path / "one", progress=False, all_faces=False)
    assert [p.name for p in largest.written] == ["fr_two_people"]
