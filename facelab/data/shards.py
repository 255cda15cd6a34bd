"""Shard writing: webdataset tars written under a temporary name and renamed when complete, so a
crash never leaves a half shard that a reader would take for a whole one; and an ``index.json``
that lists the shards with their sample counts.

    with ShardWriter(out_dir, prefix="synthetic-train", max_count=1000) as writer:
        for sample in samples:
            writer.write(sample)
    # out_dir/synthetic-train-000000.tar ... and out_dir/index.json

Index layout: ``{"version": 1, "kind": ..., "group_size": K or null, "count": N,
"shards": [{"name": "...tar", "count": n, "bytes": b}, ...], "info": {...}}``. Several writers
may add to one directory (one prefix each); the index lists every complete shard in it.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path
from types import TracebackType

from . import schema

INDEX = "index.json"
INDEX_VERSION = 1
PARTIAL_SUFFIX = ".partial"


class ShardWriter:
    """Write raw samples (see :mod:`facelab.data.schema`) into size-bounded shards.

    out_dir: destination folder (created); prefix: shard name prefix; max_count: samples per
    shard; max_bytes: a shard is closed once it holds this many bytes; kind: "images", "clips"
    or "identities" (recorded in the index); info: JSON-serialisable notes for the index (the
    generator's settings, the seed); image_format: "png" (lossless) or "jpg" for colour images.
    Keys are the running sample number unless given.
    """

    def __init__(self, out_dir: str | Path, prefix: str = "shard", max_count: int = 1000,
                 max_bytes: int = 1 << 30, kind: str = "images", info: dict | None = None,
                 image_format: str = "png"):
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_count, self.max_bytes = prefix, max_count, max_bytes
        self.kind, self.info, self.image_format = kind, dict(info or {}), image_format
        self.group_size: int | None = None
        self.written: list[dict] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._partial: Path | None = None
        self._shard_count = 0
        self._shard_bytes = 0

    def write(self, sample: dict, key: str | None = None) -> None:
        members = schema.encode(sample, self.image_format)
        size = schema.group_size(sample)
        if self.count == 0:
            self.group_size = size
        elif size != self.group_size:
            raise schema.SampleError(f"group size {size} differs from this writer's {self.group_size}")
        if self._tar is None:
            self._open()
        key = key or f"{self.count:09d}"
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.' (webdataset splits names there)")
        now = time.time()
        for ext, data in members.items():
            entry = tarfile.TarInfo(f"{key}.{ext}")
            entry.size, entry.mtime, entry.mode = len(data), now, 0o644
            self._tar.addfile(entry, _Reader(data))
            self._shard_bytes += 512 + -(-len(data) // 512) * 512
        self.count += 1
        self._shard_count += 1
        if self._shard_count >= self.max_count or self._shard_bytes >= self.max_bytes:
            self._finish()

    def close(self) -> dict:
        """Finish the open shard and write the index; returns the index."""
        if self._tar is not None:
            self._finish()
        return write_index(self.out_dir, kind=self.kind, group_size=self.group_size, info=self.info,
                           counted=self.written)

    def abort(self) -> None:
        """Drop the open shard (complete shards stay, and the index lists them)."""
        if self._tar is not None:
            self._tar.close()
            self._partial.unlink(missing_ok=True)
            self._tar = None
        write_index(self.out_dir, kind=self.kind, group_size=self.group_size, info=self.info, counted=self.written)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.written):06d}.tar"
        self._partial = self.out_dir / (name + PARTIAL_SUFFIX)
        self._tar = tarfile.open(self._partial, "w", format=tarfile.USTAR_FORMAT)
        self._shard_count = self._shard_bytes = 0

    def _finish(self) -> None:
        self._tar.close()
        final = self._partial.with_name(self._partial.name[: -len(PARTIAL_SUFFIX)])
        os.replace(self._partial, final)
        self.written.append({"name": final.name, "count": self._shard_count, "bytes": final.stat().st_size})
        self._tar = None


def write_index(out_dir: str | Path, kind: str = "images", group_size: int | None = None,
                info: dict | None = None, counted: list[dict] | None = None) -> dict:
    """(Re)write ``index.json`` from the complete shards in `out_dir` (counted by reading their
    member names; shards an earlier index lists, or `counted` entries {name, count, bytes} from
    the writer that made them, keep their counts while their size matches)."""
    out_dir = Path(out_dir)
    previous = read_index(out_dir) if (out_dir / INDEX).exists() else {"shards": []}
    known = {shard["name"]: shard for shard in [*previous.get("shards", []), *(counted or [])]}
    shards = []
    for path in sorted(out_dir.glob("*.tar")):
        entry = known.get(path.name)
        if entry is None or entry.get("bytes") != path.stat().st_size:
            entry = {"name": path.name, "count": count_samples(path), "bytes": path.stat().st_size}
        shards.append(entry)
    index = {"version": INDEX_VERSION, "kind": kind, "group_size": group_size,
             "count": sum(shard["count"] for shard in shards), "shards": shards,
             "info": {**previous.get("info", {}), **(info or {})}}
    temporary = out_dir / (INDEX + PARTIAL_SUFFIX)
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out_dir / INDEX)
    return index


def read_index(root: str | Path) -> dict:
    """The index of a shard folder; a clear error when there is none or it is unreadable."""
    path = Path(root) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path}: no shard index here. Write shards with `facelab data synth` or "
                                "`facelab data prep`, or rebuild the index of existing .tar shards with "
                                "`facelab data index DIR`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); rebuild it with `facelab data index {root}`") from error
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')} (expected {INDEX_VERSION}); rebuild it "
                         f"with `facelab data index {root}`")
    return index


def count_samples(path: str | Path) -> int:
    """Samples (distinct keys) in a tar shard, read from member names only."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split("/")[-1].split(".", 1)[0])
    return len(keys)


class _Reader:
    """A minimal file object over bytes for ``TarFile.addfile``."""

    def __init__(self, data: bytes):
        self._data, self._offset = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = self._data[self._offset:end]
        self._offset += len(chunk)
        return chunk
