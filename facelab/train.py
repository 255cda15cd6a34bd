"""``facelab train``: one run from a composed config to a run folder.

    runs/<run.name>/
      config.yaml            the resolved config (compose it again with `facelab train run.name=...`)
      checkpoints/last.ckpt  refreshed every checkpoint.every_n_steps and at the end
      checkpoints/best-*.ckpt  the best by checkpoint.monitor
      metrics.csv            every logged value (CSV logger, always)
      wandb/                 the W&B run (offline unless WANDB_MODE says otherwise)
      images/                image grids every log.images_every_n_steps
      metrics.json           the held-out benchmark after training, next to the mean face's
      preview.png            input, render, overlay, normals and landmarks on held-out samples

``resume=last`` (with the run's ``run.name``) or ``resume=<checkpoint>`` continues a run where it
stopped: weights, optimiser, step, and the data stream's position within its epoch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from facelab.config import save_config

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run.root) / str(cfg.run.name)


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from, or None; a clear error when it does not exist."""
    resume = cfg.get("resume")
    if resume in (None, "", False):
        return None
    path = run_dir_of(cfg) / "checkpoints" / "last.ckpt" if resume == "last" else Path(str(resume))
    if not path.is_file():
        hint = ("give the run's name (run.name=...) so that resume=last finds runs/<name>/checkpoints/last.ckpt"
                if resume == "last" else "give an existing .ckpt file")
        raise FileNotFoundError(f"resume: checkpoint {path} does not exist; {hint}")
    return str(path)


def _wandb_id(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:64]


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Sequence[L.Callback] = (),
                  monitor: str = "val/loss/total") -> L.Trainer:
    """A Lightning Trainer from ``cfg.trainer`` with facelab's loggers and checkpoints."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if cfg.get("logger") is not None and cfg.logger.get("kind") == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = os.environ.get("WANDB_MODE", cfg.logger.get("mode", "offline"))
        loggers.append(WandbLogger(project=cfg.logger.project, entity=cfg.logger.get("entity"), name=str(cfg.run.name),
                                   id=_wandb_id(str(cfg.run.name)), resume="allow",  # a resumed run continues its W&B run
                                   save_dir=str(run_dir), mode=mode, tags=list(cfg.logger.get("tags") or []),
                                   config=OmegaConf.to_container(cfg, resolve=True)))
    every = int(cfg.checkpoint.every_n_steps)
    checkpoints = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=every,
                        enable_version_counter=False),  # a resumed run keeps writing last.ckpt
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-{step}", monitor=monitor,
                        mode=str(cfg.checkpoint.mode), save_top_k=1, auto_insert_metric_name=False),
    ]
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    return L.Trainer(**kwargs, default_root_dir=str(run_dir), logger=loggers,
                     callbacks=[*checkpoints, LearningRateMonitor(logging_interval="step"), *callbacks],
                     enable_model_summary=False)


def _keep_earlier_log(run_dir: Path) -> None:
    """Lightning's CSV logger starts metrics.csv afresh; a resumed run keeps the earlier part as
    metrics-part<N>.csv."""
    log_file = run_dir / "metrics.csv"
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0 and log_file.is_file():
        parts = len(list(run_dir.glob("metrics-part*.csv")))
        log_file.rename(run_dir / f"metrics-part{parts + 1}.csv")


def monitor_of(cfg: DictConfig) -> str:
    monitor = str(cfg.checkpoint.monitor)
    if monitor == "auto":  # the vertex error needs a corpus rendered with the run's face model
        synthetic = cfg.data.kind == "synthetic" and cfg.data.synth.get("face_model") == cfg.face_model.name
        return "val/vertex_error_mm" if synthetic else "val/loss/total"
    return monitor


def run_training(cfg: DictConfig, method_class: type, callbacks: Sequence[L.Callback] = (),
                 evaluate: bool = True) -> int:
    """Train, then (rank 0) benchmark on the held-out split, write metrics.json and preview.png.
    Returns a process exit status."""
    from facelab.data.datamodules import build_datamodule
    from facelab.methods.base import NonFiniteLossError

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    run_dir = run_dir_of(cfg)
    ckpt_path = resolve_resume(cfg)
    if ckpt_path is not None:
        _keep_earlier_log(run_dir)
    datamodule = build_datamodule(cfg.data, seed=int(cfg.seed))
    model = method_class(cfg)
    model.run_dir = run_dir
    trainer = build_trainer(cfg, run_dir, callbacks, monitor=monitor_of(cfg))
    if trainer.is_global_zero:
        save_config(cfg, run_dir)
    started = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError as error:
        print(f"facelab train: {error}", file=sys.stderr)
        return 4
    seconds = time.perf_counter() - started
    # keep the final state when the last step was not a checkpoint step (all ranks call this); a
    # checkpoint written after fit ended would not resume mid-epoch the way Lightning's own does
    last = trainer.checkpoint_callbacks[0]
    if getattr(last, "_last_global_step_saved", None) != trainer.global_step:
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    if not (evaluate and trainer.is_global_zero and cfg.data.kind == "synthetic"):
        return 0
    model.to(trainer.strategy.root_device)  # fit's teardown moved it to the CPU
    datamodule.rank, datamodule.world_size = 0, 1  # the whole held-out split, on rank 0 alone
    summary = benchmark(model, datamodule, cfg)
    summary.update(train_seconds=round(seconds, 1), steps=int(trainer.global_step),
                   nonfinite_skipped=model.nonfinite_total,
                   bad_samples=sum(loader.bad_sample_count for loader in datamodule.loaders),
                   checkpoints=sorted(str(p) for p in (run_dir / "checkpoints").glob("*.ckpt")))
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("test", "mean_face", "improvement", "train_seconds")}, indent=2))
    print(f"run folder: {run_dir}")
    return 0


@torch.no_grad()
def benchmark(model, datamodule, cfg: DictConfig) -> dict:
    """The held-out synthetic benchmark, in this process: the method's metrics and the mean
    face's (a zero head: mean shape, no expression, default pose), and preview.png."""
    from facelab.viz.grid import image_grid, save_png

    model.eval()
    loader = datamodule.test_dataloader()
    totals: dict[str, dict[str, float]] = {"test": {}, "mean_face": {}}
    count, preview = 0, None
    for batch in loader:
        batch = {k: (v.to(model.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        size = len(batch["image"])
        out = model(batch["image"])
        mean = model.reconstruct({k: v.to(model.device) for k, v in model.mean_params(size).items()})
        for name, result in (("test", out), ("mean_face", mean)):
            for key, value in model.metrics(batch, result).items():
                totals[name][key] = totals[name].get(key, 0.0) + float(value) * size
        count += size
        if preview is None:
            preview = image_grid(model.grid_columns(batch, out), max_rows=8)
    summary = {name: {k: round(v / max(count, 1), 4) for k, v in values.items()} for name, values in totals.items()}
    summary["samples"] = count
    summary["improvement"] = {key: round(1.0 - summary["test"][key] / summary["mean_face"][key], 4)
                              for key in summary["test"] if summary["mean_face"].get(key)}
    if preview is not None:
        save_png(preview, run_dir_of(cfg) / "preview.png")
    return summary
