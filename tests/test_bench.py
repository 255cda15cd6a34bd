"""`facelab bench`: the JSON report states where it ran and gives per-image figures."""

from __future__ import annotations

import json

from facelab.cli import main


def test_bench_render_reports_environment_and_per_image_times(tmp_path, capsys, lite_model):
    out = tmp_path / "render.json"
    code = main(["bench", "render", "--models", "ict-face-lite", "--batch", "2", "--resolution", "48",
                 "--backends", "torch", "nvdiffrast", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    environment = report["environment"]
    assert environment["allocator"] in ("glibc malloc", "tcmalloc", "jemalloc", "mimalloc", "unknown")
    assert environment["torch_threads"] >= 1
    torch_case, nvdiffrast_case = report["results"]
    assert torch_case["backend"] == "torch" and torch_case["batch"] == 2 and torch_case["resolution"] == 48
    timings = torch_case["timings"]
    # the per-image figure is the batch's median divided by the batch size
    assert abs(torch_case["forward_backward_ms_per_image"] - 1000 * timings["forward_backward"]["median_s"] / 2) < 1e-2
    assert 0 < torch_case["coverage"] < 1
    if "skipped" in nvdiffrast_case:
        assert "CUDA" in nvdiffrast_case["skipped"]


def test_bench_train_reports_images_per_second_and_the_render_share(tmp_path, capsys, lite_model):
    out = tmp_path / "train.json"
    code = main(["bench", "train", "--settings", "cpu", "--batch", "2", "--repeats", "1", "--warmup", "0",
                 "--overrides", "data.image_size=48", "method.losses.id.weight=0", "--out", str(out)])
    assert code == 0
    (case,) = json.loads(out.read_text())["results"]
    assert case["method"] == "specular" and case["setting"] == "cpu" and case["batch"] == 2
    assert case["backbone"] == "resnet18" and case["resolution"] == 48 and "id" not in case["loss_terms"]
    step = case["timings"]["step"]["median_s"]
    assert abs(case["images_per_second"] - 2 / step) < 0.02 * case["images_per_second"]
    assert 0 < case["render_share"] < 1
