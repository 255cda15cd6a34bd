"""Training speed: images per second of a method's training step, and the share spent rendering.

One optimiser step on a fixed batch (forward, every loss term active, backward, Adam), per
setting: ``cpu`` (the CPU default of ``trainer=cpu``: small backbone and crop) and ``paper``
(``trainer=gpu``'s settings: ResNet-50 at 224 on the full face model, batch 32, run here on
whatever device is given). The render share is the time of the method's render call, forward
and backward (driven by fixed upstream gradients), over the time of the whole step; data loading
is not included (``facelab bench data`` measures it).
"""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm import tqdm

from facelab.bench import time_call

SETTINGS = {"cpu": ["trainer=cpu"], "paper": ["trainer=gpu"]}
ALL_ACTIVE = 10**9  # a step past every loss term's start


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=["specular"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=None, help="override the setting's batch size")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every case (e.g. method.losses.id.weight=0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> list[dict]:
    results = []
    cases = [(method, setting) for method in args.methods for setting in args.settings]
    for method, setting in tqdm(cases, desc="bench train", file=sys.stderr):
        results.append(_measure(method, setting, args))
    return results


def _measure(method_name: str, setting: str, args) -> dict:
    from facelab.config import compose
    from facelab.methods import get_method

    overrides = [f"method={method_name}", "logger=csv", *SETTINGS[setting], *args.overrides]
    if args.batch:
        overrides.append(f"data.batch_size={args.batch}")
    cfg = compose(overrides)
    device = torch.device(args.device)
    method = get_method(method_name)(cfg).to(device).train()
    batch = _batch(method, int(cfg.data.batch_size), int(cfg.data.image_size), device)
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=1e-6)
    needed = method.loss_terms.needed(ALL_ACTIVE)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = method(batch["image"])
        total, _ = method.loss_terms.combine(method.loss_values(batch, out, needed), step=ALL_ACTIVE)
        total.backward()
        optimizer.step()

    with torch.no_grad():
        decoded = method.decode(method.encode(batch["image"]))
    leaves = {k: v.detach().requires_grad_() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in decoded.items()}
    images = method.render(leaves)
    shown = [key for key in ("render", "render_diffuse", "mouth") if key in images]
    grads = {key: torch.rand_like(images[key]) for key in shown}

    def render():
        out = method.render(leaves)
        torch.autograd.backward([out[key] for key in shown], [grads[key] for key in shown])

    step_time = time_call(step, args.repeats, args.warmup, sync)
    render_time = time_call(render, args.repeats, args.warmup, sync)
    size = len(batch["image"])
    return {"method": method_name, "setting": setting, "device": str(device), "precision": "32 (no autocast)",
            "backbone": cfg.method.get("backbone"),
            "face_model": cfg.face_model.name, "resolution": int(cfg.data.image_size), "batch": size,
            "loss_terms": [term.name for term in method.loss_terms if term.weight != 0],
            "images_per_second": round(size / step_time["median_s"], 2),
            "step_ms": round(1000 * step_time["median_s"], 1),
            "render_forward_backward_ms": round(1000 * render_time["median_s"], 1),
            "render_share": round(render_time["median_s"] / step_time["median_s"], 3),
            "timings": {"step": step_time, "render": render_time}}


def _batch(method, batch: int, size: int, device: torch.device) -> dict:
    """A batch the method can train on: its own render of random faces as targets."""
    generator = torch.Generator().manual_seed(0)
    params = {name: 0.3 * torch.randn(zero.shape, generator=generator) for name, zero in method.mean_params(batch).items()}
    params["expression"] = params["expression"].abs()
    with torch.no_grad():
        out = method.reconstruct({k: v.to(device) for k, v in params.items()})
    from facelab.data.schema import REGION_LABELS

    mouth = out["mouth"] > 0.5 if "mouth" in out else torch.zeros(batch, size, size, dtype=torch.bool)
    regions = mouth.long() * REGION_LABELS["mouth_interior"]
    return {"image": out["render"].clamp(0, 1), "mask": out["coverage"], "landmarks": out["landmarks"],
            "landmarks_conf": torch.ones(batch, 68, device=device), "regions": regions.to(device)}
