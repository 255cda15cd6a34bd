"""``facelab eval``: option parsing, the synthetic and AFLW2000-3D benchmarks end to end, and
the comparison table."""

from __future__ import annotations

import json

import pytest

from facelab import cli
from facelab.eval import run
from facelab.eval.run import EvalUsageError, evaluate, parse_options


def test_options_are_checked_with_the_valid_keys_named(tmp_path):
    with pytest.raises(EvalUsageError, match="no checkpoint"):
        parse_options(["bench=synthetic"])
    with pytest.raises(EvalUsageError, match="KEY one of ckpt, bench"):
        parse_options(["ckpt=a.ckpt", "benchmark=aflw2000"])
    with pytest.raises(EvalUsageError, match="valid: synthetic, aflw2000, scan"):
        parse_options(["ckpt=a.ckpt", "bench=now"])
    with pytest.raises(EvalUsageError, match="batch_size='x'"):
        parse_options(["ckpt=a.ckpt", "batch_size=x"])
    options = parse_options(["ckpt=a.ckpt,b.ckpt", "ckpt=c.ckpt", "limit=4", "mean_face=false"])
    assert options["ckpt"] == ["a.ckpt", "b.ckpt", "c.ckpt"]
    assert options["limit"] == 4 and options["mean_face"] is False and options["bench"] == "synthetic"


def test_a_missing_checkpoint_is_a_usage_error_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere.ckpt"
    assert cli.main(["eval", f"ckpt={missing}", f"out={tmp_path}"]) == 2
    assert str(missing) in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert cli.main(["eval", f"ckpt={garbage}", f"out={tmp_path}"]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_candidate_names_come_from_the_run_folder():
    taken: set[str] = set()
    assert run.candidate_name("runs/exp/checkpoints/last.ckpt", "specular", taken) == "specular (exp)"
    assert run.candidate_name("runs/exp/checkpoints/best-300.ckpt", "specular", taken) == "specular (exp/best-300)"
    assert run.candidate_name("runs/exp/checkpoints/last.ckpt", "specular", taken) == "specular (exp, 2)"


@pytest.fixture(scope="module")
def small_corpus(lite_model, tmp_path_factory):
    """Eight held-out synthetic samples at 64 px, rendered with ict-face-lite."""
    from facelab.data import synth

    root = tmp_path_factory.mktemp("corpus") / "test"
    config = synth.SynthConfig.from_preset("default", image_size=64)
    synth.write_corpus(root, 8, config, face_model=lite_model, progress=False, seed=5)
    return root


def test_synthetic_table_has_a_row_per_checkpoint_and_the_mean_face(specular_checkpoint, small_corpus, tmp_path):
    report = evaluate([str(specular_checkpoint)], bench="synthetic", data=str(small_corpus), out=str(tmp_path),
                      batch_size=4, progress=False)
    rows = {row["name"]: row["metrics"] for row in report["candidates"]}
    assert set(rows) == {"specular (specular)", "mean face"}
    trained, mean = rows["specular (specular)"], rows["mean face"]
    assert trained["samples"] == 8
    # an untrained checkpoint's zero head is the mean face, through the network rather than
    # mean_params: every metric agrees with the baseline row (a head that predicts something
    # else is scored on it: test_a_trained_head_is_scored_on_its_own_predictions)
    for key in ("vertex_error_mm", "landmark_nme_pct", "photometric_error", "mask_iou", "albedo_error",
                "lighting_error"):
        assert trained[key] == pytest.approx(mean[key], rel=1e-6), key
    # the similarity fit can only lower the rigid error; random identities are several mm from the mean
    assert 1.0 < trained["vertex_error_mm"] <= trained["vertex_error_rigid_mm"] < 20.0
    assert 0.2 < trained["mask_iou"] <= 1.0
    saved = json.loads((tmp_path / "synthetic.json").read_text())
    assert saved["corpus_face_model"] == "ict-face-lite" and len(saved["candidates"]) == 2
    table = (tmp_path / "synthetic.md").read_text().splitlines()
    assert table[1].startswith("| method | vertex err. sim. (mm) | vertex err. rigid (mm) | lmk NME (%)")
    assert len([line for line in table if line.startswith("| specular") or line.startswith("| mean face")]) == 2


def test_a_trained_head_is_scored_on_its_own_predictions(specular_checkpoint, small_corpus, tmp_path):
    """A head that predicts an identity (non-zero shape bias) is scored on that prediction, not
    on the mean face: its vertex error differs from the baseline row's."""
    import torch

    state = torch.load(specular_checkpoint, weights_only=False)
    bias = state["state_dict"]["encoder.head.bias"]
    bias[:5] = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0])  # the first shape codes, far from the mean
    moved = tmp_path / "runs" / "shaped" / "checkpoints" / "last.ckpt"
    moved.parent.mkdir(parents=True)
    torch.save(state, moved)
    report = evaluate([str(moved)], bench="synthetic", data=str(small_corpus), out=str(tmp_path), progress=False)
    rows = {row["name"]: row["metrics"] for row in report["candidates"]}
    shaped, mean = rows["specular (shaped)"], rows["mean face"]
    assert abs(shaped["vertex_error_mm"] - mean["vertex_error_mm"]) > 0.5
    assert shaped["landmark_nme_pct"] != pytest.approx(mean["landmark_nme_pct"])


def test_photo_landmarks_3d_recovers_image_scaled_depth_of_a_turned_head(specular_checkpoint):
    """An orthographic reference: a mean face turned by 40 degrees of yaw, projected at s px/mm and
    moved by a crop-to-photo similarity. Its 3D landmarks in photo pixels (depth scaled like x
    and y, +z toward the camera) must come back, so the 3D NME against them is ~0; a flipped or
    unscaled depth would give tens of percent."""
    import math

    import torch

    from facelab.eval import metrics
    from facelab.eval.benchmarks import Candidate, photo_landmarks_3d
    from facelab.methods import load_method

    method = load_method(str(specular_checkpoint))
    model = method.face_model
    yaw = math.radians(40.0)
    rotation = torch.tensor([[math.cos(yaw), 0.0, math.sin(yaw)], [0.0, 1.0, 0.0],
                             [-math.sin(yaw), 0.0, math.cos(yaw)]], dtype=torch.float64)
    posed = (model.mean.reshape(1, -1, 3).double() @ rotation.T) - torch.tensor([0.0, 0.0, 1000.0],
                                                                                dtype=torch.float64)
    px_per_mm, centre = 0.2, 32.0
    points = model.landmarks(posed)
    crop = torch.stack([points[..., 0] * px_per_mm + centre, -points[..., 1] * px_per_mm + centre], dim=-1)
    scale, shift = 3.0, torch.tensor([100.0, 40.0], dtype=torch.float64)
    to_original = torch.cat([scale * torch.eye(2, dtype=torch.float64), shift[:, None]], dim=1)[None]
    truth = torch.cat([crop * scale + shift, (points[..., 2:] + 1000.0) * px_per_mm * scale], dim=-1)
    photo_2d, photo_3d = photo_landmarks_3d(Candidate("ref", method), {"landmarks": crop, "posed_vertices": posed},
                                            to_original)
    assert torch.allclose(photo_2d, truth[..., :2])
    assert float(metrics.nme_aflw2000(photo_3d, truth)) < 1e-6
    flipped = truth * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert float(metrics.nme_aflw2000(photo_3d, flipped)) > 0.05


def test_eval_aflw2000_runs_on_the_shared_samples_and_prints_the_table(specular_checkpoint, faces_dir, tmp_path,
                                                                      capsys):
    data = faces_dir / "aflw2000"
    code = cli.main(["eval", f"ckpt={specular_checkpoint}", "bench=aflw2000", f"data={data}", f"out={tmp_path}",
                     "progress=false"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | 2D NME [0,30) | 2D NME [30,60) | 2D NME [60,90] | 2D NME mean | 3D NME mean |" in printed
    report = json.loads((tmp_path / "aflw2000.json").read_text())
    photos = len(list(data.glob("*.jpg")))
    for row in report["candidates"]:
        metrics = row["metrics"]
        assert metrics["evaluated"] + metrics["failed"] == photos
        assert metrics["evaluated"] >= photos - 1  # the data layer finds (nearly) every AFLW2000 face
        assert sum(metrics["nme_2d_counts"].values()) == metrics["evaluated"]
        # a mean face placed by the crop alignment: far from perfect, but on the face
        assert 2.0 < metrics["nme_2d_pct mean"] < 40.0
        # same x, y plus a depth term: a 3D distance is never below its 2D one
        assert metrics["nme_3d_pct mean"] >= metrics["nme_2d_pct mean"]


def _write_scan(folder, name, vertices, triangles, landmarks):
    """An ASCII PLY scan with a landmark sidecar (one x y z row per landmark)."""
    import numpy as np

    lines = ["ply", "format ascii 1.0", f"element vertex {len(vertices)}", "property float x", "property float y",
             "property float z", f"element face {len(triangles)}", "property list uchar int vertex_indices",
             "end_header"]
    lines += [" ".join(f"{v:.5f}" for v in row) for row in vertices]
    lines += ["3 " + " ".join(str(int(i)) for i in row) for row in triangles]
    (folder / f"{name}.ply").write_text("\n".join(lines) + "\n")
    np.savetxt(folder / f"{name}_landmarks.txt", landmarks)


def test_scan_bench_scores_a_scan_of_the_predicted_shape_near_zero(specular_checkpoint, faces_dir, lite_model,
                                                                   tmp_path):
    """The untrained checkpoint predicts the mean face; a scan of the mean face moved by a
    similarity scores ~0 mm after the NoW alignment, a scan of another identity several mm."""
    import math
    import shutil

    import torch

    from facelab.eval.benchmarks import SCAN_LAYOUTS

    data = tmp_path / "scans"
    data.mkdir()
    angle = math.radians(12.0)
    rotation = torch.tensor([[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0],
                             [-math.sin(angle), 0.0, math.cos(angle)]], dtype=torch.float64)
    shape = torch.zeros(1, lite_model.num_shape)
    shape[0, :5] = torch.tensor([2.5, -2.0, 2.0, -1.5, 1.5])
    faces = {"same": lite_model.mean.reshape(1, -1, 3), "other": lite_model(shape, None)}
    for name, vertices in faces.items():
        moved = 1.08 * vertices[0].double() @ rotation.T + torch.tensor([5.0, -20.0, 300.0], dtype=torch.float64)
        landmarks = lite_model.landmarks(moved[None].float())[0, SCAN_LAYOUTS[7][0]].double()
        _write_scan(data, name, moved.numpy(), lite_model.triangles.numpy(), landmarks.numpy())
        shutil.copy(faces_dir / "image_0010.png", data / f"{name}.png")
    report = evaluate([str(specular_checkpoint)], bench="scan", data=str(data), out=str(tmp_path / "eval"),
                      mean_face=False, progress=False)
    assert report["candidates"][0]["metrics"]["evaluated"] == 2
    saved = json.loads((tmp_path / "eval" / "scan.json").read_text())
    per_scan = saved["per_sample"]["specular (specular)"]
    assert per_scan["same"]["median"] < 0.05
    assert per_scan["other"]["mean"] > 1.0
