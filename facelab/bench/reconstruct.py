"""Reconstruction speed: photos per second of `facelab reconstruct`, and each stage's share.

The whole pipeline of ``facelab reconstruct`` over a folder of photos, once per batch size, in
three timed stages: detect (reading the photo, YuNet, FaceMesh, the aligning warp: per photo, so
alike at every batch size), network (the method's forward pass and render, batched) and export
(params.json, mesh.obj, mesh.ply and the full-size overlay.png, into a temporary folder). Loading
the checkpoint and the detectors is not timed. Without --ckpt an untrained ``specular`` method in
the CPU profile (``trainer=cpu``: ResNet-18, 64 px, ict-face-lite) stands in: as fast as a trained
one of that profile, though its faces are all the mean face. Photos default to the shared ones
(``$FACELAB_ASSETS/faces``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from facelab.reconstruct import STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None, help="a `facelab train` checkpoint (default: an untrained "
                                                     "specular method at the CPU profile's 64 px)")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="a folder of photos (default: the shared photos, $FACELAB_ASSETS/faces)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], metavar="N")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu: the figure the README quotes)")


def run(args: argparse.Namespace) -> dict:
    from facelab.reconstruct import Reconstructor, find_images

    folder = args.images or _shared_photos()
    photos, _ = find_images(folder)
    method, source = _method(args.ckpt, args.device)
    reconstructor = Reconstructor(method, checkpoint=source)
    try:
        with tempfile.TemporaryDirectory(prefix="facelab-bench-reconstruct-") as out:
            cases = [_measure(reconstructor, photos, Path(out), batch, args) for batch in args.batch_sizes]
    finally:
        reconstructor.close()
    cfg = method.cfg
    return {"checkpoint": source, "method": str(cfg.method.name), "backbone": cfg.method.get("backbone"),
            "face_model": str(cfg.face_model.name), "image_size": method.image_size, "device": args.device,
            "renderer": str(cfg.renderer.backend), "photos_folder": str(folder), "photos": len(photos),
            "cases": cases}


def _measure(reconstructor, photos: list, out: Path, batch: int, args) -> dict:
    for _ in range(args.warmup):
        reconstructor.run(photos, out, batch, progress=False)
    reports = []
    for repeat in range(args.repeats):
        reports.append(reconstructor.run(photos, out, batch, progress=False))
        print(f"bench reconstruct: batch {batch}, pass {repeat + 1}/{args.repeats}", file=sys.stderr)
    totals = [sum(report.seconds.values()) for report in reports]
    stage_median = {stage: statistics.median(report.seconds[stage] for report in reports) for stage in STAGES}
    count, faces = len(photos), len(reports[0].written)
    stage_sum = sum(stage_median.values())
    return {
        "batch_size": batch, "photos": count, "faces": faces, "skipped": len(reports[0].skipped),
        "images_per_second": round(count / statistics.median(totals), 2),
        "ms_per_photo": {stage: round(1000 * seconds / count, 1) for stage, seconds in stage_median.items()},
        "share": {stage: round(seconds / stage_sum, 3) for stage, seconds in stage_median.items()},
        "timings": {"total": _spread(totals), **{stage: _spread([r.seconds[stage] for r in reports]) for stage in STAGES}},
    }


def _spread(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "repeats": len(values)}


def _method(ckpt: str | None, device: str):
    """(method in eval mode, where it came from)."""
    if ckpt:
        from facelab.methods import load_method

        return load_method(ckpt, device), str(ckpt)
    from facelab.config import compose
    from facelab.methods import get_method

    torch.manual_seed(0)
    cfg = compose(["logger=csv", "trainer=cpu", "method=specular", "method.losses.id.weight=0"])
    return get_method("specular")(cfg).to(device).eval(), "untrained specular (trainer=cpu profile)"


def _shared_photos() -> Path:
    from facelab.assets import search_roots

    for _, root in search_roots():
        if (root / "faces").is_dir():
            return root / "faces"
    raise FileNotFoundError("no shared photos: set FACELAB_ASSETS to the asset mirror (it holds faces/) "
                            "or pass --images DIR")
