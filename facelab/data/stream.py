"""Reading shards: a stream of samples over the shards an ``index.json`` lists, split so that no
two readers (rank x DataLoader worker) see the same sample, with the same number of batches on
every rank.

Partition. The index gives each shard's sample count, so samples have global numbers (shards in
index order; in training, in an order shuffled per epoch, the same on every rank). The numbers
are cut into ``world_size`` contiguous ranges of near-equal size, one per rank, and each rank's
range into one per worker. A reader's *part* is a list of pieces (shard, first, stop): parts are
disjoint and together cover the data, however uneven the shards.

Length. Every rank yields the same number of samples, split over its workers identically on
every rank, so DDP ranks run the same number of batches. With ``epoch_length`` set (training:
a resampled stream), a rank yields ceil(epoch_length / world_size) samples rounded up to whole
batches, each reader cycling over its own part, one shuffled pass after another. With
``epoch_length=None`` (evaluation), one pass in index order: each reader yields its part once,
padded by repeats from its own part to the largest rank's count (at most one sample), as
DistributedSampler does.

Shuffling (training). Per epoch the shard order; per pass the order of a reader's pieces, a random
first sample in each piece (read to the end, then from its start) and a shuffle buffer drained at
the end of the pass, so a pass yields each sample of the part once. Random state comes from
(seed, epoch, rank, worker): the stream is deterministic under a seed.

Bad input. A member that cannot be decoded, or a sample that breaks the schema, is skipped; a
truncated or unreadable shard loses the rest of its piece. Either is logged where it is found
(shard, sample key, member) and becomes a :class:`BadSample`, which travels to the main process
with the next good sample (collated into the batch under ``BAD_KEY``); :class:`StreamLoader`
takes it out of the batch and keeps it (``loader.bad_samples``). That works the same with zero or
many workers, fork or spawn, and needs no shared state. Readers keep their quota by reading on,
so an epoch completes; only a part with no readable sample at all stops the run.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import schema
from .shards import read_index

log = logging.getLogger(__name__)

#: Batch (and sample) key under which bad-sample reports travel from the workers.
BAD_KEY = "_bad_samples"

#: transform(raw_sample, rng) -> raw_sample; may raise schema.SampleError to skip a sample.
Transform = Callable[[dict, np.random.Generator], dict]


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, numbered in the shard's member order."""

    shard: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (rank, worker) reads in an epoch: its part, and how many samples to yield."""

    pieces: tuple[Piece, ...]
    target: int

    @property
    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces)


@dataclass(frozen=True)
class BadSample:
    """A skipped sample (``key`` set, ``lost`` = 1), or the samples of a truncated or unreadable
    shard that reading never reaches (``key`` None, ``lost`` = how many)."""

    shard: str
    key: str | None
    member: str | None
    reason: str
    lost: int = 1

    @property
    def ident(self) -> tuple:
        """Reports with one ident describe one fault (a shard's truncation is one fault, whichever
        piece of it ran into it)."""
        return (self.shard, self.key, self.member)

    def describe(self) -> str:
        where = f"member {self.member}" if self.member else f"sample {self.key}" if self.key else "shard"
        skipped = "skipped" if self.key is not None else f"{self.lost} samples lost"
        return f"shard {self.shard}: {where}: {self.reason} ({skipped})"


def split_evenly(total: int, parts: int) -> list[int]:
    """Sizes of `parts` near-equal parts of `total`, the first ones larger by one."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def cut(shards: Sequence[tuple[str, int]], first: int, stop: int) -> list[Piece]:
    """Pieces covering global samples [first, stop) of (name, count) shards in this order."""
    pieces, offset = [], 0
    for name, count in shards:
        low, high = max(first, offset), min(stop, offset + count)
        if low < high:
            pieces.append(Piece(name, low - offset, high - offset))
        offset += count
    return pieces


def read_piece(path: Path, piece: Piece, shard_count: int | None = None
               ) -> Iterator[tuple[str, dict[str, bytes]] | BadSample]:
    """The samples of a piece as (key, {member suffix: bytes}) in shard order, streamed (members
    before ``piece.start`` are skipped without reading their data). Where the shard cannot be read
    on, a BadSample for the samples from the failing one to the end (of `shard_count`) ends the
    stream, the same whichever piece of the shard is read. A shard that simply ends early (cut at
    a header) yields its last sample as found (decoding names what it lacks) and then a BadSample."""
    shard_count = piece.stop if shard_count is None else shard_count
    started, key, members, failure = 0, None, {}, None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, _, suffix = info.name.rsplit("/", 1)[-1].partition(".")
                if member_key != key:
                    if members:
                        yield key, members
                    key, members = member_key, {}
                    if started >= piece.stop:
                        break
                    started += 1
                if started > piece.start:  # the current sample, number started - 1, is in the piece
                    members[suffix] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        failure = f"{type(error).__name__}: {error}"
        if key is not None:  # the sample being read is lost with the rest, whichever piece is read
            started, members = started - 1, {}
    if members:
        yield key, members
    lost = shard_count - started
    if (failure or started < piece.stop) and lost > 0:
        reason = (f"unreadable after {started} of {shard_count} samples ({failure})" if failure else
                  f"ends after {started} of the {shard_count} samples its index entry lists (truncated?)")
        yield BadSample(path.name, None, None, reason, lost=lost)


def current_distribution() -> tuple[int, int]:
    """(rank, world_size): torch.distributed's when initialised, else env RANK / WORLD_SIZE."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(IterableDataset):
    """Samples (``schema.to_tensors`` dicts, ``meta`` tagged with ``shard`` and ``key``) from the
    shard folder `root` (its ``index.json``), partitioned over ranks and workers (module doc).

    epoch_length: samples per epoch over all ranks (resampled stream), or None for one pass in
        index order; batch_size: the loader's, so that every worker yields whole batches;
    seed: with the epoch, rank and worker, fixes all random state; transform: applied to each
        decoded raw sample with the reader's Generator; shuffle: defaults to epoch_length set;
    shuffle_buffer: samples held for the buffer shuffle; rank, world_size: explicit, else from
        :func:`current_distribution` when first needed (in the main process via StreamLoader).
    """

    def __init__(self, root: str | Path, epoch_length: int | None = None, batch_size: int = 1, seed: int = 0,
                 transform: Transform | None = None, shuffle: bool | None = None, shuffle_buffer: int = 256,
                 rank: int | None = None, world_size: int | None = None):
        self.root = Path(root)
        index = read_index(self.root)
        self.shards = [(shard["name"], int(shard["count"])) for shard in index["shards"] if shard["count"] > 0]
        self.count = sum(count for _, count in self.shards)
        self._shard_counts = dict(self.shards)
        if self.count == 0:
            raise ValueError(f"{self.root}: the index lists no samples; write shards there first")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be positive or None, got {epoch_length}")
        self.kind, self.group_size = index.get("kind"), index.get("group_size")
        self.epoch_length, self.batch_size, self.seed = epoch_length, int(batch_size), int(seed)
        self.transform = transform
        self.shuffle = epoch_length is not None if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.known_bad: frozenset = frozenset()  # reported before: skipped without a new warning

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resolve_distribution(self) -> tuple[int, int]:
        if self.rank is None or self.world_size is None:
            self.rank, self.world_size = current_distribution()
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        return self.rank, self.world_size

    def __len__(self) -> int:
        """Samples per rank and epoch."""
        return self._rank_target(self.resolve_distribution()[1])

    def batches_per_rank(self, num_workers: int) -> int:
        """Batches a DataLoader with `num_workers` workers yields per rank and epoch (each worker
        batches its own samples, so a worker's last batch may be short)."""
        _, world_size = self.resolve_distribution()
        targets = self._worker_targets(world_size, max(num_workers, 1))
        return sum(math.ceil(target / self.batch_size) for target in targets)

    def plan(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> ReaderPlan:
        """The part and sample count of reader (rank, worker) in `epoch`."""
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        rank_sizes = split_evenly(self.count, world_size)
        readers = self._readers(world_size, num_workers)
        if worker >= readers:  # more workers than samples on the smallest rank: this one idles
            return ReaderPlan((), 0)
        part_sizes = split_evenly(rank_sizes[rank], readers)
        first = sum(rank_sizes[:rank]) + sum(part_sizes[:worker])
        pieces = cut(order, first, first + part_sizes[worker])
        return ReaderPlan(tuple(pieces), self._worker_targets(world_size, num_workers)[worker])

    def _rank_target(self, world_size: int) -> int:
        if self.epoch_length is None:
            return math.ceil(self.count / world_size)
        per_rank = math.ceil(self.epoch_length / world_size)
        return math.ceil(per_rank / self.batch_size) * self.batch_size

    def _readers(self, world_size: int, num_workers: int) -> int:
        """Active readers per rank: the same on every rank, none with an empty part."""
        smallest = split_evenly(self.count, world_size)[-1]
        if smallest == 0:
            raise ValueError(f"{self.root}: {self.count} samples cannot be split over {world_size} ranks")
        return min(num_workers, smallest)

    def _worker_targets(self, world_size: int, num_workers: int) -> list[int]:
        readers = self._readers(world_size, num_workers)
        total = self._rank_target(world_size)
        if self.epoch_length is None:  # at least each part's size: split_evenly is monotone in total
            targets = split_evenly(total, readers)
        else:
            targets = [batches * self.batch_size for batches in split_evenly(total // self.batch_size, readers)]
        return targets + [0] * (num_workers - readers)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world_size = self.resolve_distribution()
        plan = self.plan(self.epoch, rank, world_size, worker, num_workers)
        if plan.target == 0:
            return
        order_rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 0])
        sample_rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 1])
        reported, pending, yielded = set(self.known_bad), [], 0
        while True:
            good = 0
            for item in self._one_pass(plan, order_rng):
                if not isinstance(item, BadSample):
                    item = self._prepare(*item, sample_rng)
                if isinstance(item, BadSample):
                    if item.ident not in reported:
                        reported.add(item.ident)
                        pending.append(item)
                        log.warning("%s", item.describe())
                    continue
                good += 1
                if pending:
                    item[BAD_KEY], pending = pending, []
                yield item
                yielded += 1
                if yielded == plan.target:
                    return
            if good == 0:
                shards = sorted({piece.shard for piece in plan.pieces})
                raise RuntimeError(f"{self.root}: no readable sample in the part of rank {rank} worker {worker} "
                                   f"(shards {', '.join(shards)}); see the warnings above, rewrite or remove "
                                   "those shards and rebuild the index with `facelab data index`")

    def _one_pass(self, plan: ReaderPlan, rng: np.random.Generator) -> Iterator:
        """One pass over the part: (shard, key, members) once per readable sample, and BadSamples."""
        pieces = list(plan.pieces)
        if self.shuffle:
            rotated = []
            for i in rng.permutation(len(pieces)):
                piece = pieces[i]
                split = piece.start + int(rng.integers(len(piece)))
                rotated += [part for part in (Piece(piece.shard, split, piece.stop),
                                              Piece(piece.shard, piece.start, split)) if len(part)]
            pieces = rotated
        buffer: list = []
        size = min(self.shuffle_buffer, plan.size) if self.shuffle else 0
        for piece in pieces:
            for item in read_piece(self.root / piece.shard, piece, self._shard_counts[piece.shard]):
                if isinstance(item, BadSample):
                    yield item
                    continue
                item = (piece.shard, *item)
                if len(buffer) < size:
                    buffer.append(item)
                    continue
                if size:
                    slot = int(rng.integers(size))
                    item, buffer[slot] = buffer[slot], item
                yield item
        for slot in rng.permutation(len(buffer)) if buffer else ():
            yield buffer[slot]

    def _prepare(self, shard: str, key: str, members: dict[str, bytes], rng: np.random.Generator) -> dict | BadSample:
        try:
            sample = schema.decode(members)
            source = {"shard": shard, "key": key}
            meta = sample["meta"]
            sample["meta"] = [{**m, **source} for m in meta] if isinstance(meta, list) else {**meta, **source}
            if self.transform is not None:
                sample = self.transform(sample, rng)
        except schema.SampleError as error:
            member = f"{key}.{error.member}" if error.member else None
            return BadSample(shard, key, member, str(error))
        return schema.to_tensors(sample)


_DROPPED_KEYS: set[str] = set()


def collate(samples: list[dict]) -> dict:
    """One batch from ``to_tensors`` samples: tensors stacked on a new first dim (B,...), ``params``
    a dict of stacked tensors, ``meta`` a list of B entries; bad-sample reports gathered under
    BAD_KEY. Keys that only some samples carry are dropped (with one warning per key)."""
    reports = [report for sample in samples for report in sample.pop(BAD_KEY, ())]
    keys = set.intersection(*(set(sample) for sample in samples))
    for key in set.union(*(set(sample) for sample in samples)) - keys - _DROPPED_KEYS:
        _DROPPED_KEYS.add(key)
        log.warning("batch key %r is missing from some samples and is dropped from such batches", key)
    batch: dict = {}
    for key in sorted(keys):
        values = [sample[key] for sample in samples]
        if key == "meta":
            batch[key] = values
        elif key == "params":
            names = set.intersection(*(set(value) for value in values))
            batch[key] = {name: torch.stack([value[name] for value in values]) for name in sorted(names)}
        else:
            batch[key] = torch.stack(values)
    if reports:
        batch[BAD_KEY] = reports
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a :class:`ShardStream`: batches of ``dataset.batch_size`` via
    :func:`collate`, an exact ``len`` (batches per rank), a per-epoch reshuffle (Lightning calls
    ``set_epoch``; without it each iteration advances the epoch), and bad-sample records:
    ``bad_samples`` {ident: BadSample} and ``bad_sample_count`` (samples lost), kept in the main
    process. persistent_workers is refused: workers would keep the first epoch's plan.

    Resuming mid-epoch: ``state_dict()`` is {"epoch", "batches"}, the epoch being (or last) iterated
    and the batches of it yielded so far; after ``load_state_dict(state)`` the next iteration, if
    it is of that epoch, reads and discards that many batches and goes on with the next one, so a
    resumed run sees the batches (and augmentations) an uninterrupted one would. Lightning treats a
    loader with these two methods as stateful: it stores ``state_dict()`` in the checkpoint and,
    on resume, calls ``load_state_dict`` before iterating and ``set_epoch`` before the first batch.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, **kwargs):
        if kwargs.get("persistent_workers"):
            raise ValueError("StreamLoader: persistent_workers would freeze the epoch's shuffle; leave it off")
        super().__init__(dataset, batch_size=dataset.batch_size, num_workers=num_workers, collate_fn=collate,
                         **kwargs)
        # Lightning calls set_epoch on `dataloader.sampler` only (an IterableDataset cannot take a
        # sampler of its own), so the default sampler forwards it here.
        self.sampler.set_epoch = self.set_epoch
        self.bad_samples: dict[tuple, BadSample] = {}
        self._next_epoch = 0
        self._epoch: int | None = None  # the epoch being (or last) iterated, None before any
        self._batches = 0  # batches of self._epoch yielded (or skipped on resume) so far
        self._resume: dict[str, int] | None = None  # loaded by load_state_dict, used by the next __iter__

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    @property
    def bad_sample_count(self) -> int:
        return sum(report.lost for report in self.bad_samples.values())

    def __len__(self) -> int:
        return self.dataset.batches_per_rank(self.num_workers)

    def state_dict(self) -> dict[str, int]:
        """{"epoch": the epoch being (or last) iterated, "batches": how many of its batches were
        yielded so far (all of them once the epoch is exhausted)}; before any iteration, the next
        epoch and 0; after load_state_dict and before the next iteration, the loaded state.

        Counting yielded batches as consumed ones assumes the consumer takes batches one at a time
        as it trains on them: Lightning's _PrefetchDataFetcher does not prefetch from a loader with
        a length (this one has), so the batches yielded when a checkpoint is saved are exactly the
        ones its training steps ran (with a prefetching consumer a resume would skip the batches
        fetched but not trained on)."""
        if self._resume is not None:
            return dict(self._resume)
        if self._epoch is None:
            return {"epoch": self._next_epoch, "batches": 0}
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume from a :meth:`state_dict`: the next iteration, if it is of the saved epoch, skips
        the saved number of batches (reading them, so that every reader's random state advances as
        it did), and an iteration of another epoch skips nothing; either way the state is used
        once. The next epoch becomes the saved one (Lightning then sets it again)."""
        if not isinstance(state, Mapping) or set(state) != {"epoch", "batches"}:
            keys = sorted(map(str, state)) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"StreamLoader.load_state_dict: expected a state with exactly the keys 'epoch' and "
                             f"'batches' (from StreamLoader.state_dict), got {keys}")
        values = {}
        for key in ("epoch", "batches"):
            value = state[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"StreamLoader.load_state_dict: {key!r} must be a non-negative integer, "
                                 f"got {value!r}")
            values[key] = int(value)
        self._resume = values
        self._next_epoch = values["epoch"]

    def __iter__(self) -> Iterator[dict]:
        epoch = self._next_epoch
        self.dataset.set_epoch(epoch)
        self._next_epoch = epoch + 1
        self.dataset.resolve_distribution()  # here, in the main process, before workers start
        self.dataset.known_bad = frozenset(self.bad_samples)
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume is not None and resume["epoch"] == epoch else 0
        if skip > len(self):
            raise ValueError(f"StreamLoader: the resumed state has {skip} batches of epoch {epoch} done, but this "
                             f"loader yields {len(self)} per epoch; the data settings (batch size, workers, "
                             "epoch length, ranks) differ from the run that saved it")
        self._epoch, self._batches = epoch, 0
        for batch in super().__iter__():
            for report in batch.pop(BAD_KEY, ()):
                self.bad_samples.setdefault(report.ident, report)
            self._batches += 1  # before the yield: state_dict() taken after receiving a batch counts it
            if self._batches <= skip:
                continue  # read by the workers all the same: their random state moves on as it did
            yield batch
