"""Shard writing and reading: exact round trips, size limits, and no partial shard after a crash.
The helpers at the top make small samples and shard folders for the other data tests too."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from facelab.data import schema
from facelab.data.shards import PARTIAL_SUFFIX, ShardWriter, count_samples, read_index, write_index
from facelab.data.stream import Piece, ShardStream, read_piece

SIZE = 32


def make_sample(number: int, size: int = SIZE, group: int | None = None, dense: bool = False,
                regions: bool = False, ground_truth: bool = False) -> dict:
    """A raw sample whose content is fixed by `number` (meta['frame'] = number); a group of
    `group` frames when given."""
    rng = np.random.default_rng(number)
    lead = () if group is None else (group,)
    sample = {
        "image": rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8),
        "landmarks": rng.uniform(0, size, (*lead, 68, 2)).astype(np.float32),
        "landmarks_conf": rng.uniform(0, 1, (*lead, 68)).astype(np.float32),
        "mask": (rng.random((*lead, size, size)) > 0.5).astype(np.uint8) * 255,
    }
    meta = {"source": "test", "identity": f"person{number % 3}", "clip": None, "frame": number}
    sample["meta"] = meta if group is None else [{**meta, "frame": number, "index": k} for k in range(group)]
    if dense:
        sample["dense_landmarks"] = rng.uniform(0, size, (*lead, 478, 2)).astype(np.float32)
    if regions:
        sample["regions"] = rng.integers(0, 7, (*lead, size, size), dtype=np.uint8)
    if ground_truth:
        sample["params"] = {"shape": rng.normal(size=(*lead, 10)).astype(np.float32),
                            "pose": rng.normal(size=(*lead, 3)).astype(np.float32)}
        sample["verts"] = rng.normal(size=(*lead, 50, 3)).astype(np.float32)
    return sample


def write_shards(root: Path, counts: list[int], group: int | None = None, **sample_kwargs) -> list[dict]:
    """Shards holding `counts` samples each (numbered 0.. across shards, the number also being the
    sample's key); returns the samples."""
    samples, number = [], 0
    kind = "images" if group is None else "clips"
    for shard, count in enumerate(counts):
        with ShardWriter(root, prefix=f"part{shard}", max_count=count, kind=kind) as writer:
            for _ in range(count):
                samples.append(make_sample(number, group=group, **sample_kwargs))
                writer.write(samples[-1], key=f"{number:09d}")
                number += 1
    return samples


def read_all(root: Path) -> list[dict]:
    """Every sample of a shard folder, decoded, in index order."""
    out = []
    for shard in read_index(root)["shards"]:
        for item in read_piece(root / shard["name"], Piece(shard["name"], 0, shard["count"])):
            out.append(schema.decode(item[1]))
    return out


def assert_same(read: dict, written: dict, image_tolerance: float = 0.0) -> None:
    assert set(read) == set(written)
    for key, value in written.items():
        if key == "meta":
            assert read[key] == value
        elif key == "params":
            assert set(read[key]) == set(value)
            for name in value:
                np.testing.assert_array_equal(read[key][name], value[name])
        elif key == "image" and image_tolerance:
            assert read[key].shape == value.shape and read[key].dtype == np.uint8
            error = np.abs(read[key].astype(float) - value).mean()
            assert error < image_tolerance, f"mean absolute JPEG error {error:.2f} too large"
        else:
            assert read[key].dtype == value.dtype
            np.testing.assert_array_equal(read[key], value)


def test_png_shards_read_back_bit_exact_with_every_optional_key(tmp_path):
    written = write_shards(tmp_path, [3, 2], dense=True, regions=True, ground_truth=True)
    read = read_all(tmp_path)
    assert len(read) == 5
    for got, want in zip(read, written):
        assert_same(got, want)


def test_group_samples_read_back_with_their_frames_stacked(tmp_path):
    written = write_shards(tmp_path, [2], group=3, regions=True, ground_truth=True)
    read = read_all(tmp_path)
    assert read_index(tmp_path)["group_size"] == 3
    for got, want in zip(read, written):
        assert schema.group_size(got) == 3
        assert_same(got, want)


def test_jpeg_shards_keep_labels_exact_and_the_image_close(tmp_path):
    rng = np.random.default_rng(0)
    written = []
    with ShardWriter(tmp_path, image_format="jpg") as writer:
        for number in range(3):
            sample = make_sample(number, size=64)
            # a smooth image: JPEG's error on noise says nothing about photographs
            y, x = np.mgrid[:64, :64]
            sample["image"] = np.stack([(x * 4) % 256, (y * 4) % 256, np.full_like(x, rng.integers(256))],
                                       -1).astype(np.uint8)
            written.append(sample)
            writer.write(sample)
    assert {name.split(".", 1)[1] for name in tarfile.open(tmp_path / "shard-000000.tar").getnames()} >= {"image.jpg"}
    for got, want in zip(read_all(tmp_path), written):
        assert_same(got, want, image_tolerance=2.0)


def test_shards_close_at_max_count_and_at_max_bytes(tmp_path):
    by_count = tmp_path / "count"
    with ShardWriter(by_count, max_count=4) as writer:
        for number in range(10):
            writer.write(make_sample(number))
    assert [shard["count"] for shard in read_index(by_count)["shards"]] == [4, 4, 2]

    by_bytes = tmp_path / "bytes"
    one_sample = sum(512 + -(-len(data) // 512) * 512 for data in schema.encode(make_sample(0)).values())
    with ShardWriter(by_bytes, max_bytes=int(2.5 * one_sample)) as writer:
        for number in range(7):
            writer.write(make_sample(number))
    index = read_index(by_bytes)
    assert [shard["count"] for shard in index["shards"]] == [3, 3, 1]
    assert index["count"] == 7


def test_index_counts_match_the_tar_contents(tmp_path):
    write_shards(tmp_path, [5, 1, 3])
    index = read_index(tmp_path)
    assert index["count"] == 9
    for shard in index["shards"]:
        path = tmp_path / shard["name"]
        assert shard["count"] == count_samples(path) and shard["bytes"] == path.stat().st_size


def test_an_exception_inside_the_writer_leaves_only_complete_shards(tmp_path):
    with pytest.raises(RuntimeError, match="generator failed"):
        with ShardWriter(tmp_path, max_count=2) as writer:
            for number in range(5):
                writer.write(make_sample(number))
            raise RuntimeError("generator failed")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    assert read_index(tmp_path)["count"] == 4
    assert [sample["meta"]["frame"] for sample in read_all(tmp_path)] == [0, 1, 2, 3]


def test_a_killed_writer_leaves_a_partial_file_that_no_reader_takes(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from tests.test_data_shards import make_sample
        from facelab.data.shards import ShardWriter
        writer = ShardWriter({str(tmp_path)!r}, max_count=2)
        for number in range(5):
            writer.write(make_sample(number))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar" + PARTIAL_SUFFIX]
    index = write_index(tmp_path)  # what `facelab data index` does after a crash
    assert [shard["name"] for shard in index["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    stream = ShardStream(tmp_path, epoch_length=None)
    assert sorted(sample["meta"]["frame"] for sample in stream) == [0, 1, 2, 3]
    assert (tmp_path / ("shard-000002.tar" + PARTIAL_SUFFIX)).exists()  # left for inspection, never read


def test_reading_a_piece_skips_to_its_first_sample(tmp_path):
    write_shards(tmp_path, [6])
    name = read_index(tmp_path)["shards"][0]["name"]
    keys = [key for key, _ in read_piece(tmp_path / name, Piece(name, 2, 5))]
    assert keys == ["000000002", "000000003", "000000004"]


def test_shard_writer_tolerates_a_crash_before_any_shard_is_written(tmp_path):
    with pytest.raises(schema.SampleError):
        with ShardWriter(tmp_path) as writer:
            bad = make_sample(0)
            del bad["mask"]
            writer.write(bad)
    assert not list(tmp_path.glob("*.tar*"))
    assert read_index(tmp_path)["count"] == 0
    assert os.listdir(tmp_path) == ["index.json"]


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 68, 2), np.float32),
                                   np.array(2.5, np.float32), np.arange(6.0).reshape(2, 3).T, np.array([True, False])])
def test_npy_members_decode_to_the_written_array_and_truncation_is_an_error(array):
    from facelab.data.schema import _decode_npy

    buffer = io.BytesIO()
    np.save(buffer, array)
    decoded = _decode_npy(buffer.getvalue())
    assert decoded.dtype == array.dtype and decoded.shape == array.shape and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, array)
    if array.size:
        with pytest.raises(ValueError):
            _decode_npy(buffer.getvalue()[:-1])
