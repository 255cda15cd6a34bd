"""How much shape can the specular method's losses recover? Fit its parameters to held-out
synthetic images directly, one free parameter set per image (analysis by synthesis, no network),
and report the vertex error as the fit goes.

    python tools/specular_fit_bound.py                       # 16 held-out 64-px images, from the mean face
    python tools/specular_fit_bound.py --from-truth          # start at the true parameters instead
    python tools/specular_fit_bound.py --steps 2000 -- method.losses.reg.weight=5e-4 data.image_size=128

From the mean face the fit shows what gradient descent on the loss can reach per image (a network
trained on the same loss learns an amortised version of that fit); from the truth it shows where
the loss's own minimum lies, which is not the truth when the corpus's image formation differs
from the method's (the corpus varies specular strength and shininess, the method cannot). Config
overrides after `--` go to the run config, as for `facelab train`; the default is the CPU profile
with the identity term off (SFace on 64-px renders adds time, not shape).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from facelab.config import compose
from facelab.data.datamodules import build_datamodule
from facelab.methods import get_method


def truth_as_method_params(method, truth: dict, size: int) -> dict:
    """The corpus's parameters in the specular method's layout (its camera distance, translation
    unit and SH DC offset undone). The corpus's focal, specular strength and shininess have no
    counterpart in the method and are left out."""
    opts = method.cfg.method
    params = method.mean_params(size)
    params.update(shape=truth["shape"], expression=truth["expression"], albedo=truth["albedo"], euler=truth["rotation"])
    params["translation"] = (truth["translation"] + torch.tensor([0.0, 0.0, float(opts.camera_distance_mm)])) \
        / float(opts.translation_unit_mm)
    dc = F.pad(torch.full((1, 3, 1), float(opts.sh_dc_offset)), (0, 8))
    params["sh"] = (truth["sh"] - dc).reshape(size, 27)
    params["light_position"] = truth["light_position"] / float(opts.light_unit_mm)
    return {k: v.float().clone() for k, v in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--from-truth", action="store_true", help="start at the true parameters")
    parser.add_argument("--every", type=int, default=100, help="report every N steps")
    parser.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = parser.parse_args()
    cfg = compose(["logger=csv", "trainer=cpu", "method=specular", "method.losses.id.weight=0", *args.overrides])
    torch.manual_seed(0)
    method = get_method("specular")(cfg)
    datamodule = build_datamodule(cfg.data, seed=0, rank=0, world_size=1)
    datamodule.prepare_data()
    batch = next(iter(datamodule.test_dataloader()))
    size = len(batch["image"])
    start = truth_as_method_params(method, batch["params"], size) if args.from_truth else method.mean_params(size)
    params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    optimizer = torch.optim.Adam(params.values(), lr=args.lr)
    needed = {name: True for name in method.loss_names}
    for step in range(args.steps + 1):
        out = method.reconstruct(params)
        values = method.loss_values(batch, out, needed)
        total = sum(method.loss_terms.terms[name].weight * value for name, value in values.items())
        if step % args.every == 0:
            with torch.no_grad():
                scores = method.metrics(batch, out)
            print(f"step {step:5d}  loss {total.item():.4f}  photo {values['photo'].item():.4f}  "
                  f"landmarks {float(scores['landmark_error_px']):.2f} px  "
                  f"vertex error {float(scores['vertex_error_mm']):.3f} mm", flush=True)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
