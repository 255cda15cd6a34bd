"""facelab.assets: search order, downloads with checksums, verification and the `assets` CLI.

Every test runs with the cache in tmp_path, FACELAB_ASSETS unset and both upstreams redirected to
an empty local folder, so nothing can reach the network or the real user cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from facelab import assets

MIRROR = Path(os.environ.get("FACELAB_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
needs_mirror = pytest.mark.skipif(
    not MIRROR.is_dir(), reason=f"asset mirror {MIRROR} (env FACELAB_ASSETS) does not exist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Cache in tmp, no FACELAB_ASSETS, downloads off, upstreams pointing at an empty folder."""
    nowhere = tmp_path / "no-upstream"
    nowhere.mkdir()
    monkeypatch.setenv("FACELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FACELAB_OFFLINE", "1")
    monkeypatch.delenv("FACELAB_ASSETS", raising=False)
    monkeypatch.setenv("FACELAB_UPSTREAM_ICT", nowhere.as_uri())
    monkeypatch.setenv("FACELAB_UPSTREAM_MEDIAPIPE", nowhere.as_uri())
    return tmp_path


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="facelab")
    assets.add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["assets", *argv])
    return args.func(args)


def mirror_copy(tmp_path: Path, corrupt: str | None = None) -> Path:
    """A tmp mirror linking the real one's registered files; ``corrupt`` gets one byte changed."""
    root = tmp_path / "mirror"
    for asset in assets.ASSETS.values():
        source = MIRROR / asset.relpath
        if not source.is_file():
            continue
        target = root / asset.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if asset.relpath == corrupt:
            data = bytearray(source.read_bytes())
            data[len(data) // 2] ^= 0x01
            target.write_bytes(bytes(data))
        else:
            target.symlink_to(source)
    return root


def test_find_prefers_facelab_assets_over_cache(tmp_path, monkeypatch):
    relpath = "mediapipe/canonical_face_model.obj"
    mirrored = write(tmp_path / "mirror" / relpath, b"mirror")
    write(assets.cache_dir() / relpath, b"cache")
    monkeypatch.setenv("FACELAB_ASSETS", str(tmp_path / "mirror"))
    assert assets.find("mediapipe-canonical") == mirrored
    assert assets.find(relpath) == mirrored
    assert [label for label, _ in assets.search_roots()] == ["FACELAB_ASSETS", "cache"]


def test_find_falls_back_to_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACELAB_ASSETS", str(tmp_path / "empty-mirror"))
    cached = write(assets.cache_dir() / "ict-facekit/vertex_indices.json", b"{}")
    assert assets.find("ict-vertex-indices") == cached
    # Unregistered relative paths are found the same way (no download possible for them).
    extra = write(assets.cache_dir() / "faces/a.jpg", b"jpg")
    assert assets.find("faces/a.jpg") == extra


def test_missing_asset_offline_raises_with_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("FACELAB_ASSETS", str(tmp_path / "empty-mirror"))
    with pytest.raises(assets.AssetNotFoundError) as raised:
        assets.find("mediapipe-licence")
    message = str(raised.value)
    assert isinstance(raised.value, FileNotFoundError)
    assert "mediapipe/LICENSE" in message
    assert "FACELAB_ASSETS" in message and "facelab assets fetch" in message
    assert str(tmp_path / "empty-mirror") in message and str(assets.cache_dir()) in message
    assert not (assets.cache_dir() / "mediapipe/LICENSE").exists()


def test_download_false_wins_over_allowed_downloads(tmp_path, monkeypatch):
    upstream = tmp_path / "upstream"
    write(upstream / "LICENSE", b"licence text")
    monkeypatch.setenv("FACELAB_UPSTREAM_MEDIAPIPE", upstream.as_uri())
    monkeypatch.delenv("FACELAB_OFFLINE")
    with pytest.raises(assets.AssetNotFoundError):
        assets.find("mediapipe-licence", download=False)
    assert not (assets.cache_dir() / "mediapipe/LICENSE").exists()


def test_find_reports_the_download_error(monkeypatch):
    monkeypatch.delenv("FACELAB_OFFLINE")  # the upstream is an empty local folder
    with pytest.raises(assets.AssetNotFoundError) as raised:
        assets.find("mediapipe-canonical")
    message = str(raised.value)
    assert "Download failed" in message and "canonical_face_model.obj" in message


def test_find_downloads_registered_asset_into_cache(tmp_path, monkeypatch):
    upstream = tmp_path / "upstream"
    data = b"Apache License\n" * 100
    write(upstream / "LICENSE", data)
    monkeypatch.setenv("FACELAB_UPSTREAM_MEDIAPIPE", upstream.as_uri())
    monkeypatch.setenv("FACELAB_OFFLINE", "0")
    pinned = assets.Asset("mediapipe-licence", "mediapipe/LICENSE",
                          hashlib.sha256(data).hexdigest(),
                          assets.MEDIAPIPE_UPSTREAM + "LICENSE", "Apache-2.0")
    monkeypatch.setitem(assets.ASSETS, "mediapipe-licence", pinned)
    path = assets.find("mediapipe-licence")
    assert path == assets.cache_dir() / "mediapipe/LICENSE"
    assert path.read_bytes() == data


def test_download_from_file_url_writes_and_checks(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    source = write(tmp_path / "src" / "blob.bin", data)
    dest = tmp_path / "out" / "nested" / "blob.bin"
    result = assets.download(source.as_uri(), dest, sha256=hashlib.sha256(data).hexdigest())
    assert result == dest and dest.read_bytes() == data
    assert assets.sha256_file(dest) == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def test_download_with_wrong_sha256_raises_and_leaves_nothing(tmp_path):
    source = write(tmp_path / "src" / "blob.bin", b"some bytes")
    actual = hashlib.sha256(b"some bytes").hexdigest()
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(assets.ChecksumError) as raised:
        assets.download(source.as_uri(), dest, sha256="0" * 64)
    message = str(raised.value)
    assert "blob.bin" in message and "0" * 64 in message and actual in message
    assert list(dest.parent.iterdir()) == []


def test_download_of_missing_url_leaves_nothing(tmp_path):
    dest = tmp_path / "out" / "blob.bin"
    with pytest.raises(OSError):
        assets.download((tmp_path / "absent.bin").as_uri(), dest)
    assert list(dest.parent.iterdir()) == []


@needs_mirror
def test_verify_reports_ok_for_every_pinned_asset_in_real_mirror(monkeypatch):
    monkeypatch.setenv("FACELAB_ASSETS", str(MIRROR))
    statuses = {item.name: item for item in assets.verify()}
    assert set(statuses) == set(assets.ASSETS)
    present = [a for a in assets.ASSETS.values() if (MIRROR / a.relpath).is_file()]
    assert present, f"no registered asset in {MIRROR}"
    for asset in present:
        item = statuses[asset.name]
        assert item.source == "FACELAB_ASSETS" and item.path == MIRROR / asset.relpath
        assert item.status == ("ok" if asset.sha256 else "unpinned"), item
        assert item.actual == assets.sha256_file(item.path)
    report = assets.format_report(list(statuses.values()))
    assert len(report.splitlines()) == len(assets.ASSETS)
    if len(present) == len(assets.ASSETS):
        assert run_cli("verify") == 0


@needs_mirror
def test_verify_reports_corrupted_copy_as_mismatch(tmp_path, monkeypatch):
    corrupt = "mediapipe/canonical_face_model.obj"
    if not (MIRROR / corrupt).is_file():
        pytest.skip(f"{MIRROR / corrupt} does not exist")
    monkeypatch.setenv("FACELAB_ASSETS", str(mirror_copy(tmp_path, corrupt=corrupt)))
    statuses = {item.name: item for item in assets.verify()}
    bad = statuses["mediapipe-canonical"]
    assert bad.status == "mismatch"
    assert bad.expected == assets.ASSETS["mediapipe-canonical"].sha256
    assert bad.actual == assets.sha256_file(bad.path) != bad.expected
    assert all(item.status != "mismatch" for name, item in statuses.items() if name != bad.name)
    report = assets.format_report(list(statuses.values())).splitlines()
    line = next(row for row in report if "mismatch" in row)
    assert bad.actual[:12] in line and bad.expected[:12] in line
    assert run_cli("verify") == 1


def test_cli_verify_returns_1_when_assets_are_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACELAB_ASSETS", str(tmp_path / "empty-mirror"))
    assert run_cli("verify") == 1
    out = capsys.readouterr().out
    assert out.count("missing") >= len(assets.ASSETS)
    assert all(item.status == "missing" and item.path is None for item in assets.verify())


def test_cli_where_lists_roots_in_search_order(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FACELAB_ASSETS", str(tmp_path / "mirror"))
    write(tmp_path / "mirror/mediapipe/LICENSE", b"x")
    assert run_cli("where") == 0
    out = capsys.readouterr().out
    assert out.index(str(tmp_path / "mirror")) < out.index(str(assets.cache_dir()))
    assert str(tmp_path / "mirror/mediapipe/LICENSE") in out


@needs_mirror
def test_cli_fetch_places_mediapipe_files_in_cache_with_verified_hashes(tmp_path, monkeypatch):
    upstream = tmp_path / "fake-mediapipe"
    for name in ("mediapipe-canonical", "mediapipe-licence"):
        asset = assets.ASSETS[name]
        source = MIRROR / asset.relpath
        if not source.is_file():
            pytest.skip(f"{source} does not exist")
        relative = asset.url[len(assets.MEDIAPIPE_UPSTREAM):]
        write(upstream / relative, source.read_bytes())
    monkeypatch.setenv("FACELAB_UPSTREAM_MEDIAPIPE", upstream.as_uri())
    monkeypatch.delenv("FACELAB_OFFLINE")
    assert run_cli("fetch", "mediapipe-canonical", "mediapipe-licence") == 0
    statuses = {item.name: item for item in assets.verify()}
    for name in ("mediapipe-canonical", "mediapipe-licence"):
        item = statuses[name]
        assert item.source == "cache" and item.status == "ok"
        assert item.path == assets.cache_dir() / assets.ASSETS[name].relpath
    # A second run finds them present and downloads nothing (the upstream is gone).
    shutil.rmtree(upstream)
    assert run_cli("fetch", "mediapipe-canonical", "mediapipe-licence") == 0
    assert run_cli("fetch", "--force", "mediapipe-licence") == 1


def test_cli_fetch_offline_fails_for_missing_assets():
    assert run_cli("fetch", "mediapipe-licence") == 1
    assert run_cli("fetch", "no-such-asset") == 2


def fake_ict_upstream(tmp_path: Path) -> Path:
    """FaceXModel/ in the upstream layout: the pinned files real, every other OBJ a placeholder."""
    folder = tmp_path / "fake-ict" / "FaceXModel"
    folder.mkdir(parents=True)
    sample = MIRROR / "ict-facekit" / "obj_sample"
    for name in (*assets.ICT_OBJ_SHA256, "vertex_indices.json"):
        if not (sample / name).is_file():
            pytest.skip(f"{sample / name} does not exist")
        (folder / name).symlink_to(sample / name)
    expressions = json.loads((folder / "vertex_indices.json").read_text())["expressions"]
    names = [f"identity{i:03d}.obj" for i in range(100)] + [f"{e}.obj" for e in expressions]
    for name in names:
        if not (folder / name).exists():
            (folder / name).write_text(f"o {name}\n")
    return folder


@needs_mirror
def test_ict_fetch_converts_the_obj_folder_and_verifies_as_built(tmp_path, monkeypatch):
    upstream = fake_ict_upstream(tmp_path)
    monkeypatch.setenv("FACELAB_UPSTREAM_ICT", upstream.parent.as_uri())
    monkeypatch.delenv("FACELAB_OFFLINE")
    seen = {}

    def convert(folder: Path) -> dict[str, np.ndarray]:
        seen["files"] = sorted(p.name for p in folder.iterdir())
        return {"neutral": np.arange(6, dtype=np.float64).reshape(2, 3)}

    monkeypatch.setattr(assets, "_load_ict_converter", lambda: convert)
    path = assets.find("ict-model")
    assert path == assets.cache_dir() / "ict-facekit/ict_face_model_light.npz"
    assert seen["files"] == sorted(p.name for p in upstream.iterdir())
    assert len(seen["files"]) == 1 + 1 + 100 + 53
    np.testing.assert_array_equal(np.load(path)["neutral"], np.arange(6).reshape(2, 3))
    sidecar = path.with_name(path.name + ".sha256").read_text().split()
    assert sidecar[0] == assets.sha256_file(path)
    status = next(item for item in assets.verify() if item.name == "ict-model")
    assert status.status == "ok (built from upstream)" and status.source == "cache"


@needs_mirror
def test_ict_fetch_rejects_a_changed_pinned_obj(tmp_path, monkeypatch):
    upstream = fake_ict_upstream(tmp_path)
    jaw = upstream / "jawOpen.obj"
    data = jaw.read_bytes()
    jaw.unlink()
    jaw.write_bytes(data + b"# changed\n")
    monkeypatch.setenv("FACELAB_UPSTREAM_ICT", upstream.parent.as_uri())
    monkeypatch.setattr(assets, "_load_ict_converter", lambda: pytest.fail("converter called"))
    with pytest.raises(assets.ChecksumError) as raised:
        assets.fetch("ict-model")
    message = str(raised.value)
    assert "jawOpen.obj" in message and assets.ICT_OBJ_SHA256["jawOpen.obj"] in message
    assert hashlib.sha256(data + b"# changed\n").hexdigest() in message
    assert not (assets.cache_dir() / assets.ASSETS["ict-model"].relpath).exists()
