"""Streaming shards: partition over ranks and workers, equal batch counts, determinism, bad input,
and the DataModules built from the data configs."""

from __future__ import annotations

import io
import logging
import sys
import tarfile
import types
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from facelab.data.datamodules import (ClipsDataModule, IdentitiesDataModule, ShardDataModule, SyntheticDataModule,
                                      build_datamodule, default_root)
from facelab.data.shards import read_index
from facelab.data.stream import ShardStream, StreamLoader
from tests.test_data_shards import SIZE, write_shards

UNEVEN = [7, 3, 11, 1, 2]  # 24 samples
CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


def frames(batches) -> list[int]:
    return [meta["frame"] for batch in batches for meta in batch["meta"]]


def rank_loader(root, rank, epoch_length, batch_size=4, num_workers=2, seed=0, **kwargs) -> StreamLoader:
    stream = ShardStream(root, epoch_length=epoch_length, batch_size=batch_size, seed=seed,
                         rank=rank, world_size=2, **kwargs)
    return StreamLoader(stream, num_workers=num_workers)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uneven")
    write_shards(root, UNEVEN)
    return root


def test_reader_parts_are_disjoint_cover_the_data_and_balance_uneven_shards(uneven):
    stream = ShardStream(uneven, epoch_length=None, batch_size=4)
    seen, targets = Counter(), {}
    offsets = np.cumsum([0] + UNEVEN)
    for rank in range(2):
        for worker in range(2):
            plan = stream.plan(epoch=0, rank=rank, world_size=2, worker=worker, num_workers=2)
            targets[rank, worker] = plan.target
            for piece in plan.pieces:
                shard = int(piece.shard.split("-")[0].removeprefix("part"))
                seen.update(range(offsets[shard] + piece.start, offsets[shard] + piece.stop))
            assert plan.size == 6  # 24 samples over 4 readers, whatever the shard sizes
    assert sorted(seen) == list(range(24)) and set(seen.values()) == {1}
    assert targets[0, 0] + targets[0, 1] == targets[1, 0] + targets[1, 1]


def test_one_pass_over_two_ranks_of_two_workers_is_an_exact_partition(uneven):
    by_rank = [frames(rank_loader(uneven, rank, epoch_length=None)) for rank in range(2)]
    assert sorted(by_rank[0] + by_rank[1]) == list(range(24))
    assert not set(by_rank[0]) & set(by_rank[1])


def test_an_odd_sample_count_pads_the_short_rank_from_its_own_part(tmp_path):
    write_shards(tmp_path, [5, 2, 6])  # 13 samples: ranks hold 7 and 6
    loaders = [rank_loader(tmp_path, rank, epoch_length=None, batch_size=2) for rank in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == len(loaders[1])
    seen = [frames(rank_batches) for rank_batches in batches]
    assert len(seen[0]) == len(seen[1]) == 7
    assert set(seen[0]) | set(seen[1]) == set(range(13)) and not set(seen[0]) & set(seen[1])
    assert len(set(seen[1])) == 6  # one repeat, from rank 1's own samples


def test_resampled_epochs_give_every_rank_the_same_full_batches_from_its_own_samples(uneven):
    loaders = [rank_loader(uneven, rank, epoch_length=50) for rank in range(2)]
    batches = [list(loader) for loader in loaders]
    assert len(batches[0]) == len(batches[1]) == len(loaders[0]) == 7  # ceil(25 / 4) batches of 4
    assert all(batch["image"].shape == (4, 3, SIZE, SIZE) for rank_batches in batches for batch in rank_batches)
    seen = [set(frames(rank_batches)) for rank_batches in batches]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(24))


def test_each_worker_pass_reads_each_sample_of_its_own_part_once(uneven):
    stream = ShardStream(uneven, epoch_length=40, batch_size=4, rank=1, world_size=2)
    offsets = dict(zip((name for name, _ in stream.shards), np.cumsum([0] + UNEVEN)))
    by_worker = []
    for worker in range(2):
        plan = stream.plan(0, 1, 2, worker, 2)
        own = [offsets[piece.shard] + number for piece in plan.pieces for number in range(piece.start, piece.stop)]
        read = [int(key) for _, key, _ in stream._one_pass(plan, np.random.default_rng(worker))]
        assert sorted(read) == sorted(own) and read != sorted(read)  # shuffled, each once
        by_worker.append(set(own))
    assert not by_worker[0] & by_worker[1]


def test_the_stream_is_fixed_by_the_seed_and_changes_with_the_epoch(uneven):
    def run(seed, epoch):
        loader = rank_loader(uneven, 0, epoch_length=24, seed=seed)
        loader.sampler.set_epoch(epoch)  # where Lightning sets it
        return frames(loader)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    loader = rank_loader(uneven, 0, epoch_length=24)
    assert frames(loader) == run(0, 0) and frames(loader) == run(0, 1)  # iterating advances the epoch


def test_more_workers_than_samples_per_rank_leaves_the_extra_workers_idle(tmp_path):
    write_shards(tmp_path, [3])
    loaders = [rank_loader(tmp_path, rank, epoch_length=None, batch_size=1, num_workers=2) for rank in range(2)]
    seen = [frames(loader) for loader in loaders]
    assert len(seen[0]) == len(seen[1]) == 2 and set(seen[0]) | set(seen[1]) == {0, 1, 2}


def _corrupt_member(root: Path, number: int, member: str = "image.png") -> str:
    """Replace one member's bytes with garbage; returns the shard's name."""
    index = read_index(root)
    for shard in index["shards"]:
        path = root / shard["name"]
        with tarfile.open(path) as tar:
            entries = [(info, tar.extractfile(info).read()) for info in tar]
        key = f"{number:09d}"
        if not any(info.name == f"{key}.{member}" for info, _ in entries):
            continue
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for info, data in entries:
                if info.name == f"{key}.{member}":
                    data = b"\x89PNG not really" + data[:10]
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return shard["name"]
    raise AssertionError(f"sample {number} not found")


def test_a_corrupt_member_is_skipped_counted_and_named_and_the_epoch_completes(tmp_path, caplog):
    write_shards(tmp_path, [4, 4])
    shard = _corrupt_member(tmp_path, 5)
    stream = ShardStream(tmp_path, epoch_length=None, batch_size=2)
    loader = StreamLoader(stream, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="facelab.data.stream"):
        seen = frames(loader)
    assert len(seen) == 8 and 5 not in seen  # the rank's quota is filled from its own part
    assert sorted(set(seen)) == [0, 1, 2, 3, 4, 6, 7]
    assert loader.bad_sample_count == 1
    (report,) = loader.bad_samples.values()
    assert (report.shard, report.member) == (shard, "000000005.image.png")
    assert f"shard {shard}: member 000000005.image.png" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="facelab.data.stream"):
        assert len(frames(loader)) == 8
    assert "000000005" not in caplog.text and loader.bad_sample_count == 1  # reported once, not per epoch


def test_bad_sample_reports_reach_the_main_process_from_worker_processes(tmp_path):
    write_shards(tmp_path, [6, 6])
    _corrupt_member(tmp_path, 2, "mask.png")
    _corrupt_member(tmp_path, 9, "landmarks.npy")
    loader = StreamLoader(ShardStream(tmp_path, epoch_length=16, batch_size=4), num_workers=2)
    batches = list(loader)
    assert len(batches) == 4 and all(len(batch["meta"]) == 4 for batch in batches)
    assert sorted(report.member for report in loader.bad_samples.values()) == ["000000002.mask.png",
                                                                                 "000000009.landmarks.npy"]
    assert all("_bad_samples" not in batch for batch in batches)


def test_a_truncated_shard_loses_its_tail_only_and_the_epoch_completes(tmp_path):
    write_shards(tmp_path, [6, 4])
    path = tmp_path / read_index(tmp_path)["shards"][0]["name"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 45 // 100])  # in the middle of sample 2 or 3
    loader = StreamLoader(ShardStream(tmp_path, epoch_length=None, batch_size=5), num_workers=2)
    seen = frames(loader)
    assert len(seen) == 10 and set(range(6, 10)) <= set(seen)
    assert loader.bad_sample_count == 6 - len(set(seen) & set(range(6)))
    assert any(path.name == report.shard and report.key is None for report in loader.bad_samples.values())


def test_clips_yield_groups_of_k_consecutive_frames_per_sample(tmp_path):
    write_shards(tmp_path, [3, 2], group=5)
    data = ClipsDataModule(tmp_path, image_size=24, batch_size=2, num_workers=0, epoch_length=4, group_size=3,
                           augment={"flip": True, "max_rotation_deg": 5.0})
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 3, 3, 24, 24) and batch["landmarks"].shape == (2, 3, 68, 2)
    assert batch["mask"].shape == (2, 3, 1, 24, 24) and batch["landmarks_conf"].shape == (2, 3, 68)
    for metas in batch["meta"]:
        assert len(metas) == 3 and len({meta["frame"] for meta in metas}) == 1
        indices = [meta["index"] for meta in metas]
        assert indices == list(range(indices[0], indices[0] + 3))


def test_identities_yield_k_distinct_photos_and_reject_small_groups(tmp_path):
    write_shards(tmp_path, [4], group=4)
    data = IdentitiesDataModule(tmp_path, image_size=SIZE, batch_size=2, num_workers=0, epoch_length=4,
                                group_size=3)
    for batch in data.train_dataloader():
        assert batch["image"].shape == (2, 3, 3, SIZE, SIZE)
        assert all(len({meta["index"] for meta in metas}) == 3 for metas in batch["meta"])
    with pytest.raises(ValueError, match="groups of 4, fewer than group_size=6"):
        IdentitiesDataModule(tmp_path, group_size=6, num_workers=0).train_dataloader()


def test_build_datamodule_reads_the_data_configs(tmp_path):
    write_shards(tmp_path / "train", [5])
    write_shards(tmp_path / "val", [3])
    cfg = OmegaConf.load(CONF / "images.yaml")
    cfg.root, cfg.image_size, cfg.num_workers, cfg.batch_size, cfg.epoch_length = str(tmp_path), 16, 0, 2, 6
    data = build_datamodule(cfg, seed=3)
    assert type(data).__name__ == "ShardDataModule" and data.seed == 3 and data.augment.flip
    train = list(data.train_dataloader())
    assert len(train) == 3 and train[0]["image"].shape == (2, 3, 16, 16)
    assert sorted(frames(data.val_dataloader())) == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown data kind 'videos'"):
        build_datamodule({"kind": "videos"})
    for name in ("clips", "identities", "synthetic"):
        config = OmegaConf.load(CONF / f"{name}.yaml")
        module = build_datamodule(config)
        assert module.kind == name and module.root == default_root(name, config.get("name", "default"))
    assert build_datamodule(OmegaConf.load(CONF / "synthetic.yaml")).root.name == "128px-template"  # one corpus per size (and framing)


def test_the_synthetic_datamodule_builds_its_corpus_on_first_use_only(tmp_path, monkeypatch):
    calls = []

    def ensure_corpus(root, cfg_data):
        calls.append((Path(root), cfg_data["corpus_size"]))
        write_shards(Path(root) / "train", [4], ground_truth=True)
        write_shards(Path(root) / "test", [2], ground_truth=True)
        return Path(root)

    monkeypatch.setitem(sys.modules, "facelab.data.synth", types.SimpleNamespace(ensure_corpus=ensure_corpus))
    cfg = {**OmegaConf.to_container(OmegaConf.load(CONF / "synthetic.yaml")), "root": str(tmp_path),
           "num_workers": 0, "batch_size": 2, "image_size": SIZE, "corpus_size": 6}
    data = build_datamodule(cfg)
    assert isinstance(data, SyntheticDataModule) and not calls
    data.setup("fit")
    assert calls == [(tmp_path, 6)]  # every setup asks synth.ensure_corpus, which keeps a complete corpus
    batch = next(iter(data.train_dataloader()))
    assert batch["params"]["shape"].shape == (2, 10) and batch["verts"].shape == (2, 50, 3)
    assert sorted(frames(data.val_dataloader())) == [0, 1] == sorted(frames(data.test_dataloader()))


class _Probe(L.LightningModule):
    """Records the frames of every training batch; learns nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.epochs: list[list[int]] = []

    def on_train_epoch_start(self):
        self.epochs.append([])

    def training_step(self, batch, batch_idx):
        self.epochs[-1] += [meta["frame"] for meta in batch["meta"]]
        return (self.weight * batch["image"].mean()).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_lightning_trainer_runs_the_datamodule_with_a_new_shuffle_each_epoch(tmp_path):
    write_shards(tmp_path / "train", [6, 5])
    write_shards(tmp_path / "val", [2])
    data = build_datamodule({"kind": "images", "root": str(tmp_path), "image_size": SIZE, "batch_size": 4,
                             "num_workers": 0, "epoch_length": 8, "augment": {"flip": True}})
    probe = _Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=data)
    assert [len(epoch) for epoch in probe.epochs] == [8, 8]
    assert probe.epochs[0] != probe.epochs[1]
    assert data.bad_sample_count == 0 and data.bad_samples == []


def _augmented_loader(root, num_workers, batch_size=4, epoch_length=40) -> StreamLoader:
    data = ShardDataModule(root, image_size=SIZE, batch_size=batch_size, num_workers=num_workers,
                           epoch_length=epoch_length, seed=5, rank=0, world_size=1,
                           augment={"flip": True, "color_jitter": 0.3, "max_rotation_deg": 10.0})
    return data.train_dataloader()


def _assert_same_batches(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for batch, reference in zip(got, expected):
        assert batch["meta"] == reference["meta"]
        assert set(batch) == set(reference)
        assert torch.equal(batch["image"], reference["image"])
        assert torch.equal(batch["landmarks"], reference["landmarks"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_resumed_mid_epoch_yields_the_rest_of_the_uninterrupted_epoch(uneven, num_workers):
    full_loader = _augmented_loader(uneven, num_workers)
    full_loader.sampler.set_epoch(1)
    full = list(full_loader)
    assert len(full) == len(full_loader) == 10

    stopped = _augmented_loader(uneven, num_workers)
    stopped.sampler.set_epoch(1)
    batches = iter(stopped)
    head = [next(batches) for _ in range(3)]
    state = stopped.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    del batches  # the run stops here
    _assert_same_batches(head, full[:3])

    resumed = _augmented_loader(uneven, num_workers)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # pending, still the position
    resumed.sampler.set_epoch(1)  # where Lightning sets it, after load_state_dict
    rest = list(resumed)
    _assert_same_batches(rest, full[3:])  # the same samples, with the same augmentation
    assert resumed.state_dict() == {"epoch": 1, "batches": 10}
    resumed.sampler.set_epoch(1)
    assert len(list(resumed)) == 10  # the resume is used once


def test_a_state_saved_at_the_end_of_an_epoch_skips_nothing_of_the_next(uneven):
    loader = _augmented_loader(uneven, num_workers=0, epoch_length=16)
    epochs = [list(loader) for _ in range(2)]  # epochs 0 and 1, uninterrupted
    assert loader.state_dict() == {"epoch": 1, "batches": 4}

    stopped = _augmented_loader(uneven, num_workers=0, epoch_length=16)
    assert stopped.state_dict() == {"epoch": 0, "batches": 0}
    list(stopped)
    state = stopped.state_dict()
    assert state == {"epoch": 0, "batches": 4}  # the whole epoch

    resumed = _augmented_loader(uneven, num_workers=0, epoch_length=16)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    _assert_same_batches(list(resumed), epochs[1])
    assert resumed.state_dict() == {"epoch": 1, "batches": 4}


@pytest.mark.parametrize("state", [{"epoch": 0}, {"epoch": 0, "batches": 1, "rank": 0}, {"epoch": -1, "batches": 0},
                                   {"epoch": 0, "batches": 1.5}, {"epoch": True, "batches": 0}, [0, 1], None])
def test_a_malformed_loader_state_is_refused(uneven, state):
    loader = _augmented_loader(uneven, num_workers=0)
    with pytest.raises(ValueError, match="StreamLoader.load_state_dict"):
        loader.load_state_dict(state)
    assert loader.state_dict() == {"epoch": 0, "batches": 0}


def test_a_state_with_more_batches_than_the_loader_has_is_refused_when_iterating(uneven):
    loader = _augmented_loader(uneven, num_workers=0, epoch_length=16)
    loader.load_state_dict({"epoch": 0, "batches": 5})  # 4 batches per epoch here
    with pytest.raises(ValueError, match="data settings"):
        list(loader)


class _StepProbe(_Probe):
    """Records (epoch, frames, image checksum) of every training batch."""

    def __init__(self):
        super().__init__()
        self.steps: list[tuple] = []

    def training_step(self, batch, batch_idx):
        self.steps.append((self.current_epoch, tuple(meta["frame"] for meta in batch["meta"]),
                           float(batch["image"].double().sum())))
        return (self.weight * batch["image"].mean()).sum()


def test_a_lightning_run_resumed_from_a_checkpoint_sees_the_batches_of_an_uninterrupted_run(tmp_path, uneven):
    def fit(ckpt_path=None, checkpoints=False):
        data = ShardDataModule(uneven, image_size=SIZE, batch_size=4, num_workers=0, epoch_length=12, seed=5,
                               augment={"flip": True, "color_jitter": 0.3})
        probe = _StepProbe()
        callbacks = [L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=1, save_top_k=-1)
                     ] if checkpoints else []
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=checkpoints,
                            callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(probe, datamodule=data, ckpt_path=ckpt_path)
        return probe.steps

    steps = fit(checkpoints=True)  # 3 batches per epoch
    assert len(steps) == 9 and [epoch for epoch, _, _ in steps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for done in (4, 3):  # mid-epoch 1, and the end of epoch 0
        (ckpt,) = tmp_path.glob(f"*-step={done}.ckpt")
        assert fit(ckpt_path=ckpt) == steps[done:]
