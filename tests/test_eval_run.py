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
    # an untrained checkpoint's zero head is the mean face: every metric agrees with the baseline row
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

    from facelab.eval.benchmarks import SCAN_LANDMARKS_68

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
        landmarks = lite_model.landmarks(moved[None].float())[0, SCAN_LANDMARKS_68[7]].double()
        _write_scan(data, name, moved.numpy(), lite_model.triangles.numpy(), landmarks.numpy())
        shutil.copy(faces_dir / "image_0010.png", data / f"{name}.png")
    report = evaluate([str(specular_checkpoint)], bench="scan", data=str(data), out=str(tmp_path / "eval"),
                      mean_face=False, progress=False)
    assert report["candidates"][0]["metrics"]["evaluated"] == 2
    saved = json.loads((tmp_path / "eval" / "scan.json").read_text())
    per_scan = saved["per_sample"]["specular (specular)"]
    assert per_scan["same"]["median"] < 0.05
    assert per_scan["other"]["mean"] > 1.0
