"""FaceReconMethod: the LightningModule every reconstruction method builds on.

A method subclass supplies four pieces and inherits the rest::

    encode(images) -> params               # named parameter groups, (B,·) each
    decode(params) -> geometry/appearance  # vertices, landmarks, colours, camera
    render(decoded) -> images              # through facelab.render
    loss_values(batch, out, needed) -> {term: raw scalar}

The base class turns those into training: the loss terms' weights and start steps come from
the method config (``facelab.losses.terms``), every term is logged under ``loss/<name>``, an image
grid (input, render, overlay, normals, landmarks) is written every ``log.images_every_n_steps``
(PNG in the run folder, and to W&B when that logger is on), the optimiser and schedule come from
config, and a non-finite loss skips the optimiser update (on every rank together: backward still
runs, the gradients are dropped), is counted, and stops the run after
``guard.max_nonfinite_in_a_row`` in a row. Validation and test report the synthetic
benchmark's metrics when the batch carries ground truth (``verts``): mean vertex error after
similarity alignment (mm) and 2D landmark error (px); ``facelab.train.benchmark`` sets them
beside the mean face's (``mean_params``) after training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from facelab.eval.metrics import aligned_vertex_error, landmark_error
from facelab.facemodel import load_face_model
from facelab.losses.terms import LossTerms

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "cosine", "step")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run stops (its last checkpoint is kept)."""


class FaceReconMethod(L.LightningModule):
    """Base of every method. cfg: the whole run config (``method``, ``face_model``, ``data``,
    ``trainer``, ``log``, ``guard``, ...), saved into checkpoints as the hyperparameters."""

    #: names of the loss terms the method computes (its config's ``losses`` must use these)
    loss_names: tuple[str, ...] = ()

    def __init__(self, cfg: Mapping | DictConfig):
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.cfg = cfg
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self.image_size = int(cfg.data.image_size)
        model_cfg = OmegaConf.to_container(cfg.face_model, resolve=True)
        self.face_model = load_face_model(model_cfg.pop("name"), **model_cfg)
        # constant and equal on every rank; DDP would broadcast them, and cannot send sparse ones
        self._ddp_params_and_buffers_to_ignore = [f"face_model.{name}" for name, _ in self.face_model.named_buffers()]
        self.loss_terms = LossTerms.from_config(cfg.method.get("losses") or {}, self.loss_names,
                                                cfg.trainer.get("max_steps"))
        self.images_every = int(OmegaConf.select(cfg, "log.images_every_n_steps", default=0) or 0)
        self.grid_rows = int(OmegaConf.select(cfg, "log.grid_rows", default=8))
        self.max_nonfinite = int(OmegaConf.select(cfg, "guard.max_nonfinite_in_a_row", default=20))
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._skip_step = False  # set by training_step, read by optimizer_step
        self.run_dir: Path | None = None  # set by facelab.train; images go to <run_dir>/images

    # --- what a method supplies -------------------------------------------------------------------
    def encode(self, images: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def decode(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Must include ``vertices`` (B,V,3) model space (shape + expression, before pose) and
        ``landmarks`` (B,68,2) projected pixels; may include ``camera_*`` tensors (rotation,
        translation, scale, ...), which ``facelab reconstruct`` exports with
        :meth:`camera_description` saying how they project."""
        raise NotImplementedError

    def render(self, decoded: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Must include ``render`` (B,3,H,W) and ``coverage`` (B,1,H,W); ``normals`` (B,3,H,W)
        is shown in the grid when present."""
        raise NotImplementedError

    def loss_values(self, batch: Mapping[str, Any], out: Mapping[str, Tensor],
                    needed: Mapping[str, bool]) -> dict[str, Tensor]:
        """Raw (unweighted) scalar per configured term. A term whose ``needed`` is False may be
        computed without gradients (it is only logged)."""
        raise NotImplementedError

    def mean_params(self, batch_size: int) -> dict[str, Tensor]:
        """The prediction of a zero head: the mean face at the default pose and light."""
        raise NotImplementedError

    def camera_description(self) -> str | None:
        """How the decoded ``camera_*`` outputs take model-space vertices to crop pixels (None:
        the method exports no camera)."""
        return None

    # --- the shared pipeline ----------------------------------------------------------------------
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (B,3,H,W) in [0,1] -> params, decoded geometry and renders in one dict."""
        params = self.encode(images)
        return self.reconstruct(params)

    def reconstruct(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        decoded = self.decode(params)
        return {"params": dict(params), **decoded, **self.render(decoded)}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor | None:
        step = self.global_step
        out = self(batch["image"])
        values = self.loss_values(batch, out, self.loss_terms.needed(step))
        total, logged = self.loss_terms.combine(values, step)
        self._skip_step = not self._finite_everywhere(total)
        if self._skip_step:
            self._count_nonfinite(step, logged)
            return total  # backward still runs on every rank (DDP needs it); optimizer_step drops the update
        self.nonfinite_in_a_row = 0
        self.log_dict(logged, on_step=True, batch_size=len(batch["image"]))
        self.log("loss", logged["loss/total"], prog_bar=True, logger=False)
        if self.images_every and step % self.images_every == 0:
            self.save_grid(batch, out, f"train/step{step:07d}")
        return total

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int = 0) -> dict[str, Any]:
        """Exportable results: parameters, model-space and posed vertices, landmarks, render."""
        out = self(batch["image"])
        keep = ("vertices", "posed_vertices", "landmarks", "render", "coverage")
        return {"params": {k: v.detach().cpu() for k, v in out["params"].items()},
                **{k: out[k].detach().cpu() for k in keep if k in out}, "meta": batch.get("meta")}

    def _evaluate(self, batch: Mapping[str, Any], batch_idx: int, stage: str) -> None:
        size = len(batch["image"])
        out = self(batch["image"])
        values = self.loss_values(batch, out, {name: False for name in self.loss_names})
        _, logged = self.loss_terms.combine(values, self.global_step)
        self.log_dict({f"{stage}/{key}": value for key, value in logged.items()}, sync_dist=True, batch_size=size)
        self.log_dict({f"{stage}/{key}": value for key, value in self.metrics(batch, out).items()},
                      sync_dist=True, batch_size=size, prog_bar=stage == "val")
        if batch_idx == 0:
            self.save_grid(batch, out, f"{stage}/step{self.global_step:07d}")

    def metrics(self, batch: Mapping[str, Any], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Benchmark metrics of one batch (means over it): ``landmark_error_px`` always,
        ``vertex_error_mm`` (after similarity alignment) when the batch has ground-truth verts
        of this face model's topology."""
        result = {"landmark_error_px": landmark_error(out["landmarks"].detach().float(),
                                                      batch["landmarks"].float()).mean()}
        truth = batch.get("verts")
        if truth is not None and truth.shape[1:] == out["vertices"].shape[1:]:
            result["vertex_error_mm"] = aligned_vertex_error(out["vertices"].detach().float(), truth.float()).mean()
        return result

    # --- non-finite guard ---------------------------------------------------------------------------
    def _finite_everywhere(self, total: Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks must skip a step together, or DDP
        would wait forever for the ranks that did not run backward)."""
        bad = torch.tensor(0.0 if bool(torch.isfinite(total.detach())) else 1.0, device=total.device)
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        return float(bad) == 0.0

    def _count_nonfinite(self, step: int, logged: Mapping[str, Tensor]) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        bad = sorted(k for k, v in logged.items() if k.endswith("_weighted") and not math.isfinite(float(v)))
        log.warning("step %d: non-finite loss (%s), step skipped (%d in a row, %d in all)", step,
                    ", ".join(bad) or "total", self.nonfinite_in_a_row, self.nonfinite_total)
        self.log("train/nonfinite_skipped", float(self.nonfinite_total), on_step=True)
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (last at step {step}: {', '.join(bad) or 'total'}); "
                "the run stops with its last checkpoint kept. Lower the learning rate or a loss weight, or raise "
                "guard.max_nonfinite_in_a_row")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, except after a non-finite loss: its gradients are dropped (None, so
        Adam leaves weights and moments alone) or, under a gradient scaler, made NaN so that
        the scaler skips the step as it does for any overflow."""

        def closure():
            result = optimizer_closure() if optimizer_closure is not None else None
            if self._skip_step:
                # only "16-mixed" runs a gradient scaler; bf16 and true-precision runs have none
                scaled = self._trainer is not None and str(self.trainer.precision) in ("16-mixed", "16")
                for group in optimizer.param_groups:
                    for param in group["params"]:
                        if scaled and param.grad is not None:
                            param.grad.fill_(float("nan"))
                        elif not scaled:
                            param.grad = None
            return result

        optimizer.step(closure=closure)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["facelab"] = {"nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("facelab", {})
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))

    # --- optimiser --------------------------------------------------------------------------------
    def configure_optimizers(self):
        settings = dict(OmegaConf.to_container(self.cfg.method.optimizer, resolve=True))
        name = settings.pop("name", "adam")
        if name not in OPTIMIZERS:
            raise ValueError(f"method.optimizer.name={name!r}; valid: {', '.join(OPTIMIZERS)}")
        schedule = dict(OmegaConf.to_container(self.cfg.method.get("scheduler") or {"name": "constant"}, resolve=True))
        params = [p for p in self.parameters() if p.requires_grad]
        kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        if "betas" in settings:
            settings["betas"] = tuple(settings["betas"])
        optimizer = kinds[name](params, **settings)
        kind = schedule.pop("name", "constant")
        if kind not in SCHEDULERS:
            raise ValueError(f"method.scheduler.name={kind!r}; valid: {', '.join(SCHEDULERS)}")
        if kind == "constant":
            return optimizer
        steps = int(self.cfg.trainer.max_steps)
        if steps < 1:
            raise ValueError(f"method.scheduler.name={kind!r} needs a step budget; set trainer.max_steps (got {steps})")
        if kind == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1),
                                                                   eta_min=float(schedule.get("min_lr", 0.0)))
        else:
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(schedule.get("step_size", steps)),
                                                        gamma=float(schedule.get("gamma", 0.1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- pictures ---------------------------------------------------------------------------------
    def grid_columns(self, batch: Mapping[str, Any], out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The columns of the logged image grid."""
        from facelab.viz.grid import draw_landmarks, normals_to_rgb, overlay

        image = batch["image"].detach().float().cpu()
        render = out["render"].detach().float().cpu().clamp(0, 1)
        coverage = out["coverage"].detach().float().cpu()
        columns = {"input": image, "render": render, "overlay": overlay(image, render, coverage)}
        if "normals" in out:
            columns["normals"] = normals_to_rgb(out["normals"].detach().float().cpu())
        columns["landmarks"] = draw_landmarks(image, out["landmarks"].detach().float().cpu(),
                                              reference=batch["landmarks"].float().cpu())
        return columns

    def save_grid(self, batch: Mapping[str, Any], out: Mapping[str, Tensor], name: str) -> Path | None:
        """Write the grid to ``<run_dir>/images/<name>.png`` (rank 0) and to W&B when it logs."""
        if not self.trainer.is_global_zero:
            return None
        from facelab.viz.grid import image_grid, save_png

        grid = image_grid(self.grid_columns(batch, out), max_rows=self.grid_rows)
        path = None
        if self.run_dir is not None:
            path = save_png(grid, self.run_dir / "images" / f"{name.replace('/', '_')}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"images/{name.split('/')[0]}", images=[grid], step=self.global_step)
        return path
