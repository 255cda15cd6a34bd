"""Training runs end to end: exact resume, the non-finite guard, and two-process DDP from shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from facelab.config import compose
from facelab.methods import get_method
from facelab.train import run_training

REPO = Path(__file__).resolve().parents[1]


def tiny(tmp_path: Path, *overrides: str) -> list[str]:
    """A run that takes seconds: a 64-px corpus of 32 + 8 faces, resnet18, batch 4, no W&B."""
    return ["logger=csv", f"run.root={tmp_path / 'runs'}", f"data.root={tmp_path.parent / 'corpus'}",
            "data.image_size=64", "data.batch_size=4", "data.num_workers=0", "data.epoch_length=16",
            "data.synth.n_train=32", "data.synth.n_test=8", "method.backbone=resnet18",
            "method.losses.mouth.start_step=2", "method.losses.id.weight=0", "log.images_every_n_steps=0",
            "+trainer.limit_val_batches=0", "trainer.val_check_interval=null", "trainer.log_every_n_steps=1",
            "deterministic=true", *overrides]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_stopping_and_resuming_gives_the_weights_of_an_uninterrupted_run(tmp_path, lite_model):
    method = get_method("specular")
    straight = compose(tiny(tmp_path, "run.name=straight", "trainer.max_steps=6", "checkpoint.every_n_steps=6"))
    assert run_training(straight, method, evaluate=False) == 0
    # 6 steps at 4 per batch = one and a half epochs of 16: the stop falls inside the second epoch
    first = compose(tiny(tmp_path, "run.name=resumed", "trainer.max_steps=5", "checkpoint.every_n_steps=5"))
    assert run_training(first, method, evaluate=False) == 0
    second = compose(tiny(tmp_path, "run.name=resumed", "trainer.max_steps=6", "checkpoint.every_n_steps=6",
                          "resume=last"))
    assert run_training(second, method, evaluate=False) == 0
    expected, resumed = weights(tmp_path / "runs" / "straight"), weights(tmp_path / "runs" / "resumed")
    assert (tmp_path / "runs" / "resumed" / "metrics-part1.csv").is_file()  # the first attempt's log is kept
    interrupted = torch.load(tmp_path / "runs" / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert interrupted["global_step"] == 6
    changed = [k for k in expected if not torch.equal(expected[k], resumed[k])]
    assert not changed, f"resumed weights differ in {changed[:5]}"
    head = "encoder.head.weight"
    assert not torch.equal(expected[head], torch.zeros_like(expected[head]))  # training did move them


def test_resume_last_without_a_checkpoint_names_the_missing_file(tmp_path):
    cfg = compose(tiny(tmp_path, "run.name=nothing", "resume=last"))
    with pytest.raises(FileNotFoundError, match=r"nothing/checkpoints/last.ckpt does not exist; give the run's name"):
        run_training(cfg, get_method("specular"))


class FlakySpecular(get_method("specular")):
    """Returns a NaN photometric term at the steps listed in ``bad_steps``."""

    bad_steps: set[int] = set()

    def loss_values(self, batch, out, needed):
        values = super().loss_values(batch, out, needed)
        if self.global_step in self.bad_steps or -1 in self.bad_steps:
            values["photo"] = values["photo"] * float("nan")
        return values


def test_non_finite_losses_skip_their_step_and_are_counted(tmp_path, lite_model):
    FlakySpecular.bad_steps = {1, 2}
    cfg = compose(tiny(tmp_path, "run.name=flaky", "trainer.max_steps=4", "checkpoint.every_n_steps=4"))
    assert run_training(cfg, FlakySpecular, evaluate=False) == 0
    checkpoint = torch.load(tmp_path / "runs" / "flaky" / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["facelab"]["nonfinite_total"] == 2
    assert torch.isfinite(checkpoint["state_dict"]["encoder.head.weight"]).all()
    # the skipped steps left weights and Adam's moments alone: 2 updates happened, not 4
    (moments,) = [state for state in checkpoint["optimizer_states"][0]["state"].values()][:1]
    assert int(moments["step"]) == 2


def test_too_many_non_finite_losses_in_a_row_stop_the_run(tmp_path, lite_model, capsys):
    FlakySpecular.bad_steps = {-1}
    cfg = compose(tiny(tmp_path, "run.name=doomed", "trainer.max_steps=20", "guard.max_nonfinite_in_a_row=3"))
    assert run_training(cfg, FlakySpecular, evaluate=False) == 4
    assert "3 non-finite losses in a row" in capsys.readouterr().err


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import lightning as L
    from facelab.config import compose
    from facelab.methods import get_method
    from facelab.train import run_training

    class Record(L.Callback):
        def __init__(self, out):
            self.out, self.seen = out, []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen += [[trainer.current_epoch, m["shard"], m["key"]] for m in batch["meta"]]
        def on_train_end(self, trainer, module):
            path = os.path.join(self.out, f"rank{trainer.global_rank}.json")
            with open(path, "w") as f:
                json.dump({"world": trainer.world_size, "seen": self.seen, "step": trainer.global_step,
                           "skipped": module.nonfinite_total}, f)

    class NanOnRankOne(get_method("specular")):
        # a NaN loss at step 1 on rank 1 only: both ranks must skip that update together
        def loss_values(self, batch, out, needed):
            values = super().loss_values(batch, out, needed)
            if self.global_step == 1 and self.trainer.global_rank == 1:
                values["photo"] = values["photo"] * float("nan")
            return values

    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = compose(overrides)
    sys.exit(run_training(cfg, NanOnRankOne, callbacks=[Record(out)], evaluate=False))
""")


def test_two_cpu_processes_train_with_ddp_never_share_a_sample_and_skip_a_nan_together(tmp_path, lite_model):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    # the corpus is built here first, so that the two ranks only read it
    from facelab.data.datamodules import build_datamodule

    cfg = compose(tiny(tmp_path, "run.name=ddp", "trainer.max_steps=4", "trainer.devices=2", "trainer.strategy=ddp",
                       "data.epoch_length=32", "data.num_workers=1"))
    build_datamodule(cfg.data).ensure_corpus()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = tiny(tmp_path, "run.name=ddp", "trainer.max_steps=4", "trainer.devices=2", "trainer.strategy=ddp",
                "data.epoch_length=32", "data.num_workers=1", "checkpoint.every_n_steps=4")
    result = subprocess.run([sys.executable, str(script), str(tmp_path), *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world"] == 2 and rank["step"] == 4 for rank in ranks)
    assert [rank["skipped"] for rank in ranks] == [1, 1]  # rank 1's NaN made both ranks skip, in step
    seen = [{tuple(item) for item in rank["seen"]} for rank in ranks]
    assert all(len(items) == 16 for items in seen)  # 4 steps x 4 samples, none twice within a rank
    assert not seen[0] & seen[1], "a sample was read by both ranks in the same epoch"
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt").is_file()
