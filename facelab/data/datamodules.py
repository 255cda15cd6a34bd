"""DataModules over shard folders: ``images``, ``clips``, ``identities`` and ``synthetic``, built
from the ``data`` config group by :func:`build_datamodule`.

Every DataModule streams shards with :class:`~facelab.data.stream.ShardStream` (split by rank and
worker, fixed epoch length, deterministic under the seed) and yields dict batches collated from
``schema.to_tensors``: ``image`` (B,3,H,W) float32, ``landmarks`` (B,68,2), ``mask`` (B,1,H,W),
..., ``meta`` a list of B dicts. ``clips`` and ``identities`` yield group batches: ``image``
(B,K,3,H,W), ``landmarks`` (B,K,68,2), ``meta`` a list of B lists of K dicts.

Folders. ``root`` (default :func:`default_root`) holds the training shards either directly or
in ``train/``; validation reads ``val/`` when it has an index (``synthetic``: else ``test/``, the
held-out benchmark split, for monitoring only). The ``synthetic`` DataModule builds its corpus on
first use (``facelab.data.synth.ensure_corpus``) in ``prepare_data``, which Lightning runs on one
process per node.

Bad samples are skipped and logged where they are found; ``datamodule.bad_samples`` lists the
reports that reached this process (one per fault, with shard and member names) and
``datamodule.bad_sample_count`` counts the samples lost, per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .augment import AugmentConfig, Augmenter
from .schema import SampleError
from .shards import INDEX
from .stream import BadSample, ShardStream, StreamLoader


def default_root(kind: str, name: str = "default") -> Path:
    """Where a DataModule of this kind looks when the config's ``root`` is null:
    ``<cache>/<kind>/<name>`` (the cache of :func:`facelab.assets.cache_dir`)."""
    from facelab.assets import cache_dir

    return cache_dir() / kind / name


class GroupTransform:
    """The per-sample transform: take `group_size` frames of a group sample (a random window of
    consecutive frames for clips, a random subset for identities; the first ones when not
    training), then augment. Picklable, for DataLoader workers."""

    def __init__(self, augmenter: Augmenter, group_size: int | None = None, consecutive: bool = True,
                 train: bool = True):
        self.augmenter, self.group_size = augmenter, group_size
        self.consecutive, self.train = consecutive, train

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        if self.group_size is not None:
            sample = self.take(sample, rng)
        return self.augmenter(sample, rng)

    def take(self, sample: dict, rng: np.random.Generator) -> dict:
        stored = sample["image"].shape[0] if sample["image"].ndim == 4 else None
        if stored is None or stored < self.group_size:
            raise SampleError(f"a group of {self.group_size} is needed, the sample holds {stored or 'one'}")
        if not self.train:
            frames = np.arange(self.group_size)
        elif self.consecutive:
            start = int(rng.integers(stored - self.group_size + 1))
            frames = np.arange(start, start + self.group_size)
        else:
            frames = np.sort(rng.choice(stored, self.group_size, replace=False))
        out = {key: value[frames] for key, value in sample.items() if isinstance(value, np.ndarray)}
        out["meta"] = [sample["meta"][i] for i in frames]
        if "params" in sample:
            out["params"] = {name: value[frames] for name, value in sample["params"].items()}
        return out


class ShardDataModule(L.LightningDataModule):
    """Streams single samples from a shard folder (the ``images`` kind; subclasses set ``kind``,
    ``grouped`` and ``consecutive``).

    root: the shard folder (None: default_root(kind, name)); image_size: output side in pixels
    (samples are resized); batch_size, num_workers: per rank; epoch_length: training samples per
    epoch over all ranks (None: one pass over the data); group_size: K for grouped kinds;
    augment: the config's augment block; seed: fixes shuffling and augmentation; rank,
    world_size: explicit (tests), else the trainer's, else torch.distributed's / the
    environment's; cfg: the whole data config (kept for builders such as the synthetic corpus).
    """

    kind = "images"
    grouped = False
    consecutive = True

    def __init__(self, root: str | Path | None = None, image_size: int = 224, batch_size: int = 8,
                 num_workers: int = 2, epoch_length: int | None = 1000, group_size: int | None = None,
                 augment: Mapping | AugmentConfig | None = None, seed: int = 0, name: str = "default",
                 rank: int | None = None, world_size: int | None = None, cfg: Mapping | None = None):
        super().__init__()
        self.root = Path(root).expanduser() if root is not None else default_root(self.kind, name)
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.epoch_length, self.seed = epoch_length, seed
        if self.grouped and not group_size:
            raise ValueError(f"the {self.kind} DataModule needs group_size (frames or photos per sample)")
        self.group_size = group_size if self.grouped else None
        self.augment = augment if isinstance(augment, AugmentConfig) else AugmentConfig.from_config(augment)
        self.rank, self.world_size = rank, world_size
        self.cfg = dict(cfg or {})
        self.loaders: list[StreamLoader] = []

    @classmethod
    def from_config(cls, cfg: Mapping, seed: int = 0, **overrides: Any) -> "ShardDataModule":
        """From a ``data`` config (DictConfig or dict); keys it does not use are kept in ``cfg``."""
        cfg = _plain(cfg)
        keys = ("root", "image_size", "batch_size", "num_workers", "epoch_length", "group_size", "augment", "name")
        kwargs = {key: cfg[key] for key in keys if key in cfg}
        return cls(**{**kwargs, "seed": seed, "cfg": cfg, **overrides})

    @property
    def train_root(self) -> Path:
        return self.root / "train" if (self.root / "train" / INDEX).exists() else self.root

    @property
    def val_root(self) -> Path | None:
        return self.root / "val" if (self.root / "val" / INDEX).exists() else None

    def train_dataloader(self) -> StreamLoader:
        return self._loader(self.train_root, train=True)

    def val_dataloader(self) -> StreamLoader | list:
        root = self.val_root
        return self._loader(root, train=False) if root is not None else []

    @property
    def bad_samples(self) -> list[BadSample]:
        """Reports of skipped samples and truncated shards seen by this process's loaders."""
        merged: dict[tuple, BadSample] = {}
        for loader in self.loaders:
            merged.update(loader.bad_samples)
        return list(merged.values())

    @property
    def bad_sample_count(self) -> int:
        return sum(report.lost for report in self.bad_samples)

    def _loader(self, root: Path, train: bool) -> StreamLoader:
        rank, world_size = self._distribution()
        augmenter = Augmenter(self.augment if train else AugmentConfig(), self.image_size)
        transform = GroupTransform(augmenter, self.group_size, self.consecutive, train)
        dataset = ShardStream(root, epoch_length=self.epoch_length if train else None, batch_size=self.batch_size,
                              seed=self.seed, transform=transform, rank=rank, world_size=world_size)
        self._check_grouping(dataset)
        loader = StreamLoader(dataset, num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        self.loaders.append(loader)
        return loader

    def _distribution(self) -> tuple[int | None, int | None]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return None, None  # ShardStream asks torch.distributed / the environment

    def _check_grouping(self, dataset: ShardStream) -> None:
        stored = dataset.group_size
        if self.grouped and stored is None:
            raise ValueError(f"{dataset.root} holds single samples, the {self.kind} DataModule reads groups; "
                             "write the shards as group samples or use data=images")
        if self.grouped and stored < self.group_size:
            raise ValueError(f"{dataset.root} holds groups of {stored}, fewer than group_size={self.group_size}; "
                             f"set data.group_size={stored} or less")
        if not self.grouped and stored is not None:
            raise ValueError(f"{dataset.root} holds groups of {stored}, the {self.kind} DataModule reads single "
                             "samples; use data=clips or data=identities")


class ClipsDataModule(ShardDataModule):
    """Groups of K consecutive frames of one video clip (a random window of the stored clip)."""

    kind = "clips"
    grouped = True
    consecutive = True


class IdentitiesDataModule(ShardDataModule):
    """Groups of K photos of one person (a random subset of the stored group)."""

    kind = "identities"
    grouped = True
    consecutive = False


class SyntheticDataModule(ShardDataModule):
    """The synthetic corpus (rendered faces with exact ground truth): ``<root>/train`` for
    training, ``<root>/test`` (the held-out benchmark split) for validation and testing; built on
    first use."""

    kind = "synthetic"

    @property
    def train_root(self) -> Path:
        return self.root / "train"

    @property
    def val_root(self) -> Path | None:
        for split in ("val", "test"):
            if (self.root / split / INDEX).exists():
                return self.root / split
        return None

    def prepare_data(self) -> None:
        self.ensure_corpus()

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is None:  # used without a Trainer: nobody ran prepare_data
            self.ensure_corpus()

    def ensure_corpus(self) -> Path:
        """Build the corpus unless a complete one with these settings is there (slow on first
        use only; a half-written corpus is rebuilt, one with other settings is an error)."""
        from facelab.data.synth import ensure_corpus

        ensure_corpus(self.root, self.cfg)
        return self.root

    def test_dataloader(self) -> StreamLoader:
        return self._loader(self.root / "test", train=False)


#: data config ``kind`` -> DataModule class
DATAMODULES: dict[str, type[ShardDataModule]] = {
    "images": ShardDataModule,
    "clips": ClipsDataModule,
    "identities": IdentitiesDataModule,
    "synthetic": SyntheticDataModule,
}


def build_datamodule(cfg_data: Mapping, seed: int = 0, **overrides: Any) -> ShardDataModule:
    """The DataModule that a ``data`` config names by ``kind``; overrides go to its constructor
    (e.g. rank and world_size in tests)."""
    kind = _plain(cfg_data).get("kind")
    if kind not in DATAMODULES:
        raise ValueError(f"unknown data kind {kind!r}; valid: {sorted(DATAMODULES)}")
    return DATAMODULES[kind].from_config(cfg_data, seed, **overrides)


def _plain(cfg: Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
