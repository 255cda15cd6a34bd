"""Renderer speed: ms per image, forward and forward+backward, per backend, batch, size and model.

A full shaded render of the face model: random identity and pose, perspective camera, RGB SH
light, model albedo, Blinn-Phong specular from a point light, gamma and antialiasing; the
backward pass reaches vertices, SH, albedo and specular. The torch backend is timed with each
visibility step (the plain vectorised one and the compiled numba kernel, on CPU); nvdiffrast
where CUDA and the package are available. Each case also reports the visibility step alone.
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from facelab.bench import time_call


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", nargs="+", default=["torch", "torch+numba", "nvdiffrast"],
                        help="torch (plain visibility), torch+numba (compiled visibility, CPU), nvdiffrast "
                             "(CUDA); unavailable ones are listed as skipped")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--resolution", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--models", nargs="+", default=["ict-face", "ict-face-lite"])
    parser.add_argument("--shading", nargs="+", default=["pixel"], choices=["pixel", "vertex"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> list[dict]:
    from facelab.facemodel import load_face_model
    from facelab.render.backends import nvdiffrast_available
    from facelab.render.numba_ops import available as numba_available

    device = torch.device(args.device)
    cases = [(backend, model, shading, batch, size) for backend in args.backends for model in args.models
             for shading in args.shading for batch in args.batch for size in args.resolution]
    models = {name: load_face_model(name).to(device) for name in args.models}
    results = []
    for backend, model, shading, batch, size in tqdm(cases, desc="bench render", file=sys.stderr):
        case = {"backend": backend, "model": model, "shading": shading, "batch": batch,
                "resolution": size, "device": str(device)}
        reason = _unavailable(backend, device, nvdiffrast_available(), numba_available())
        if reason:
            results.append({**case, "skipped": reason})
            continue
        results.append({**case, **_measure(models[model], backend, shading, batch, size, device, args)})
    return results


def _unavailable(backend: str, device: torch.device, has_nvdiffrast: bool, has_numba: bool) -> str | None:
    if backend == "nvdiffrast" and not (device.type == "cuda" and has_nvdiffrast):
        return "needs CUDA and the nvdiffrast package"
    if backend == "torch+numba" and (device.type != "cpu" or not has_numba):
        return "needs the CPU and numba"
    if backend not in ("torch", "torch+numba", "nvdiffrast"):
        return f"unknown backend {backend!r}"
    return None


def _measure(face_model, backend: str, shading: str, batch: int, size: int, device: torch.device, args) -> dict:
    from facelab.render import MeshRenderer
    from facelab.render.rasterize import visible_triangles

    scene = _scene(face_model, batch, size, device)
    kernels = "numba" if backend == "torch+numba" else "torch"
    renderer = MeshRenderer((size, size), backend="torch" if backend.startswith("torch") else backend,
                            shading=shading, kernels=kernels)
    triangles = face_model.triangles.long()
    leaves = [scene["vertices"], scene["sh"], scene["albedo"], scene["specular"]]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def render():
        camera_vertices = scene["vertices"] @ scene["rotation"].transpose(1, 2) + scene["translation"][:, None]
        clip = scene["camera"].to_clip(scene["vertices"], (size, size))
        return renderer(clip, camera_vertices, triangles, scene["sh"], albedo=scene["albedo"],
                        specular=scene["specular"], light_position=scene["light"],
                        view_position=torch.zeros_like(scene["light"]), shininess=30.0)

    def forward():
        with torch.no_grad():
            render()

    # the renderer's own backward: fixed upstream gradients, as a loss would hand them over
    generator = torch.Generator().manual_seed(1)
    grad_image = torch.randn(batch, 3, size, size, generator=generator).to(device)
    grad_alpha = torch.randn(batch, 1, size, size, generator=generator).to(device)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        out = render()
        torch.autograd.backward([out.image, out.alpha], [grad_image, grad_alpha])

    repeats, warmup = args.repeats, args.warmup
    figures = {"forward": time_call(forward, repeats, warmup, synchronize),
               "forward_backward": time_call(forward_backward, repeats, warmup, synchronize)}
    if backend.startswith("torch"):
        with torch.no_grad():
            clip = scene["camera"].to_clip(scene["vertices"], (size, size))
        figures["visibility"] = time_call(lambda: visible_triangles(clip, triangles, size, size, kernels),
                                          repeats, warmup, synchronize)
        coverage = float((visible_triangles(clip, triangles, size, size, kernels) >= 0).float().mean())
    else:
        coverage = None
    out = {f"{name}_ms_per_image": round(1000 * figure["median_s"] / batch, 3) for name, figure in figures.items()}
    out["timings"] = figures
    out["coverage"] = coverage
    return out


def _scene(face_model, batch: int, size: int, device: torch.device) -> dict:
    """A face filling most of the frame, like an aligned crop, with a light from the upper left."""
    from facelab.render.camera import PerspectiveCamera, euler_to_matrix
    from facelab.render.lighting import DEFAULT_SH_DC

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vertices = face_model(torch.randn(batch, face_model.num_shape, generator=generator).to(device), None)
    rotation = euler_to_matrix(torch.randn(batch, 3, generator=generator).mul(0.15).to(device))
    translation = torch.tensor([0.0, 20.0, -700.0], device=device).expand(batch, 3).contiguous()
    camera = PerspectiveCamera(rotation, translation, torch.full((batch,), 2.2 * size, device=device),
                               torch.full((batch, 2), size / 2, device=device))
    sh = torch.zeros(batch, 3, 9, device=device)
    sh[:, :, 0] = DEFAULT_SH_DC
    sh[:, :, 1:4] = 0.3
    albedo = face_model.albedo(None).expand(batch, -1, -1).contiguous()
    return {"vertices": vertices.requires_grad_(True), "rotation": rotation, "translation": translation,
            "camera": camera, "sh": sh.requires_grad_(True), "albedo": albedo.clone().requires_grad_(True),
            "specular": torch.full((batch, face_model.num_vertices, 1), 0.2, device=device, requires_grad=True),
            "light": torch.tensor([-300.0, 300.0, 200.0], device=device).expand(batch, 3).contiguous()}
