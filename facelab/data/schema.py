"""The sample schema: one dict layout for every source, in memory and inside shards.

A *raw sample* (what shards hold and augmentation works on) is a dict of numpy arrays:

- ``image``: (H,W,3) uint8 RGB, the aligned crop.
- ``landmarks``: (68,2) float32 pixels in the crop (x right, y down, iBUG order);
  ``landmarks_conf``: (68,) float32 in [0,1].
- ``mask``: (H,W) uint8, 255 on face skin (eyes, brows and mouth interior excluded), else 0.
- optional ``dense_landmarks``: (478,2) float32 pixels (MediaPipe order);
  ``regions``: (H,W) uint8 label map (see ``REGION_LABELS``, 0 = background).
- ``meta``: dict with ``source``, ``identity``, ``clip``, ``frame`` (str/int or None) and anything
  else JSON-serialisable (the original file name, a detector score).
- synthetic ground truth: ``params`` (dict name -> float32 array) and ``verts`` (V,3) float32 mm.

A *group sample* (a clip's frames, a person's photos) holds K of each array stacked on a new
first axis (``image`` (K,H,W,3), ...), ``meta`` a list of K dicts, ``params`` arrays with a
leading K. ``group_size`` tells which kind a dict is.

Inside a shard (a webdataset tar), a sample is the members sharing one key: images, masks and
region maps as one PNG (or JPEG for colour) per frame (``image.png`` or ``image.3.png`` for
frame 3 of a group), every array as ``.npy``, meta and params as ``meta.json`` and ``params.npz``.
:func:`encode` and :func:`decode` convert between the two; :func:`to_tensors` makes the
training-time tensors (images (3,H,W) float32 in [0,1], masks (1,H,W) float32).
"""

from __future__ import annotations

import io
import re
import zipfile
import json
from typing import Any

import cv2
import numpy as np
import torch

#: Region label map values (``regions``), drawn from landmark polygons or rendered exactly.
REGION_LABELS = {"background": 0, "skin": 1, "brows": 2, "eyes": 3, "lips": 4, "mouth_interior": 5, "other": 6}
#: Per-pixel arrays stored as images, and their formats (the colour image's may be "jpg" instead:
#: smaller shards, but lossy, so not for data that must read back bit-exact).
IMAGE_KEYS = {"image": "png", "mask": "png", "regions": "png"}
IMAGE_FORMATS = ("png", "jpg")
ARRAY_KEYS = ("landmarks", "landmarks_conf", "dense_landmarks", "verts")
REQUIRED = ("image", "landmarks", "landmarks_conf", "mask", "meta")
JPEG_QUALITY = 95


class SampleError(ValueError):
    """A sample that does not follow the schema, or a shard member that cannot be decoded
    (``member``: that member's name inside the sample, e.g. ``image.png``, when one is to blame)."""

    def __init__(self, message: str, member: str | None = None):
        super().__init__(message)
        self.member = member


def group_size(sample: dict) -> int | None:
    """K for a group sample, None for a single one."""
    return None if sample["image"].ndim == 3 else int(sample["image"].shape[0])


def validate(sample: dict) -> None:
    """Raise SampleError naming the first key that breaks the schema."""
    for key in REQUIRED:
        if key not in sample:
            raise SampleError(f"sample lacks {key!r} (required: {', '.join(REQUIRED)})")
    image = sample["image"]
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise SampleError(f"image must be (H,W,3) or (K,H,W,3) uint8, got {image.shape} {image.dtype}")
    lead = image.shape[:-3]
    height, width = image.shape[-3:-1]
    expect = {"landmarks": (*lead, 68, 2), "landmarks_conf": (*lead, 68), "mask": (*lead, height, width),
              "dense_landmarks": (*lead, 478, 2), "regions": (*lead, height, width)}
    for key, shape in expect.items():
        if key in sample and tuple(sample[key].shape) != shape:
            raise SampleError(f"{key} must have shape {shape}, got {tuple(sample[key].shape)}")
    if "verts" in sample and (sample["verts"].ndim != len(lead) + 2 or sample["verts"].shape[-1] != 3):
        raise SampleError(f"verts must be ({'K,' if lead else ''}V,3), got {tuple(sample['verts'].shape)}")
    meta = sample["meta"]
    if lead and (not isinstance(meta, list) or len(meta) != lead[0]):
        raise SampleError(f"a group sample of {lead[0]} needs a list of {lead[0]} meta dicts")
    if not lead and not isinstance(meta, dict):
        raise SampleError("meta must be a dict")


def encode(sample: dict, image_format: str = "png") -> dict[str, bytes]:
    """Shard members (extension -> bytes) of one raw sample (validated first). image_format:
    "png" (lossless, the default) or "jpg" (quality 95) for the colour image."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    validate(sample)
    size = group_size(sample)
    frames = [None] if size is None else list(range(size))
    members: dict[str, bytes] = {}
    for key, fmt in IMAGE_KEYS.items():
        fmt = image_format if key == "image" else fmt
        if key not in sample:
            continue
        for frame in frames:
            array = sample[key] if frame is None else sample[key][frame]
            name = key if frame is None else f"{key}.{frame}"
            members[f"{name}.{fmt}"] = _encode_image(array, fmt)
    for key in ARRAY_KEYS:
        if key in sample:
            members[f"{key}.npy"] = _encode_npy(np.asarray(sample[key], dtype=np.float32))
    if "params" in sample:
        buffer = io.BytesIO()
        np.savez(buffer, **{name: np.asarray(value, dtype=np.float32) for name, value in sample["params"].items()})
        members["params.npz"] = buffer.getvalue()
    members["meta.json"] = json.dumps(sample["meta"]).encode()
    return members


def decode(members: dict[str, bytes]) -> dict:
    """The raw sample from its shard members; SampleError names the member that fails."""
    sample: dict[str, Any] = {}
    frames: dict[str, dict[int, np.ndarray]] = {}
    for name, data in members.items():
        try:
            stem, _, ext = name.rpartition(".")
            key, _, frame = stem.partition(".")
            if ext in ("jpg", "png") and key in IMAGE_KEYS:
                array = _decode_image(data, key)
                if frame:
                    frames.setdefault(key, {})[int(frame)] = array
                else:
                    sample[key] = array
            elif ext == "npy" and key in ARRAY_KEYS:
                sample[key] = _decode_npy(data)
            elif name == "params.npz":
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    sample["params"] = {member.removesuffix(".npy"): _decode_npy(archive.read(member))
                                        for member in archive.namelist()}
            elif name == "meta.json":
                sample["meta"] = json.loads(data)
        except SampleError:
            raise
        except Exception as error:  # any decoder failure is a corrupt member
            raise SampleError(f"member {name}: cannot be decoded ({type(error).__name__}: {error})",
                              member=name) from error
    for key, by_frame in frames.items():
        if sorted(by_frame) != list(range(len(by_frame))):
            raise SampleError(f"{key}: frames {sorted(by_frame)} are not 0..{len(by_frame) - 1}")
        sample[key] = np.stack([by_frame[i] for i in range(len(by_frame))])
    validate(sample)
    return sample


def to_tensors(sample: dict) -> dict:
    """Training tensors: image (…,3,H,W) float32 [0,1]; mask (…,1,H,W) float32 {0,1}; regions
    (…,H,W) int64; arrays float32 tensors; params a dict of tensors; meta unchanged."""
    out: dict[str, Any] = {"meta": sample["meta"]}
    image = torch.from_numpy(np.ascontiguousarray(sample["image"]))
    out["image"] = image.movedim(-1, -3).float().div_(255.0)
    out["mask"] = torch.from_numpy(np.ascontiguousarray(sample["mask"])).unsqueeze(-3).float().div_(255.0)
    if "regions" in sample:
        out["regions"] = torch.from_numpy(np.ascontiguousarray(sample["regions"])).long()
    for key in ARRAY_KEYS:
        if key in sample:
            out[key] = torch.from_numpy(np.ascontiguousarray(sample[key], dtype=np.float32))
    if "params" in sample:
        out["params"] = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in sample["params"].items()}
    return out


def _encode_image(array: np.ndarray, fmt: str) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    options = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if fmt == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, encoded = cv2.imencode(f".{fmt}", array, options)
    if not ok:
        raise ValueError(f"OpenCV could not encode a {array.shape} image as {fmt}")
    return encoded.tobytes()


def _decode_image(data: bytes, key: str) -> np.ndarray:
    colour = key == "image"
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE)
    if array is None:
        raise ValueError("not a readable PNG or JPEG image")
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if colour else array


_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), *\}")


def _decode_npy(data: bytes) -> np.ndarray:
    """A .npy member as a writable array. The headers facelab writes (little-endian numbers, C
    order) are parsed directly, an order of magnitude faster than ``np.load``'s literal_eval,
    which still reads anything else."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file (bad magic)")
    width = 2 if data[6] == 1 else 4
    start = 8 + width
    length = int.from_bytes(data[8:start], "little")
    match = _NPY_HEADER.match(data[start:start + length].decode("latin1"))
    if match is None:
        return np.load(io.BytesIO(data), allow_pickle=False)
    shape = tuple(int(size) for size in match.group(2).split(",") if size.strip())
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(data, np.dtype(match.group(1)), count=count, offset=start + length).reshape(shape).copy()


def _encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
