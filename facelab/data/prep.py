"""Preprocess real photos and videos into shards: aligned face crops, landmarks and masks.

    facelab data prep --layout folders --in photos/ --out shards/people
    facelab data prep --layout voxceleb --in vox2/dev/mp4 --out shards/vox --frames 8
    facelab data prep --layout celeba --in celeba/ --out shards/celeba --group none

Layouts (how files map to identity and clip):
  images    any folder tree of photos; single samples, no identity.
  folders   one folder a person (IN/person/**/photo); root-level photos have no identity.
  celeba    IN/identity_CelebA.txt (or --identities FILE) lists "photo identity"; the photos lie in
            IN/img_align_celeba, IN/img_celeba or IN itself (matched by file stem).
  voxceleb  IN/identity/clip/ holding videos (each one a clip: IN/id/clip/00001.mp4) or frame
            images (the folder is a clip); deeper frame folders (IN/id/clip/seg/*.jpg) are clips too.

Grouping (--group auto): voxceleb writes clip samples of K frames (K = --frames, one per equal
segment of the clip; a frame without a usable face is replaced by another from its segment, and
a clip that still lacks frames is skipped); folders and celeba write identity samples of K
photos (a person's photos in chunks of K, the last chunk topped up from the previous one; people
with fewer than K usable photos are skipped); images writes singles. --group none writes every
photo (or every sampled frame) as a single sample.

Each sample follows facelab.data.schema (see facelab.data.detect for detection, landmarks,
alignment and masks); meta holds source, identity, clip, frame, file (relative to IN), the
detector score, n_faces and ``to_original`` (crop pixels -> the file's pixels). Bad input never
stops a run: unreadable or corrupt files, photos without a (large enough) face, clips without
enough frames are skipped, and ``report.json`` beside the shards lists each with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facelab.data.detect import FaceSkipped

LAYOUTS = ("images", "folders", "celeba", "voxceleb")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".tif", ".tiff"}
VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
CELEBA_IMAGE_FOLDERS = ("img_align_celeba", "img_celeba", "img_align_celeba_png", ".")
KIND = {"clip": "clips", "identity": "identities", "none": "images"}
#: Frames tried per segment of a clip: its middle, then its first and last quarter points.
SEGMENT_POSITIONS = (0.5, 0.25, 0.75)


@dataclass
class Unit:
    """What becomes one group sample (or, with --group none, several singles): the photos of a
    person, a clip's frame files, or a video."""

    identity: str | None
    clip: str | None
    files: list[Path] = field(default_factory=list)
    video: Path | None = None


class Report:
    """Counts of what was processed, and every input that gave no sample, with the reason."""

    def __init__(self, **settings):
        self.settings = settings
        self.processed = 0
        self.samples = 0
        self.skipped: dict[str, list[dict]] = defaultdict(list)
        self.several_faces: list[dict] = []

    def skip(self, reason: str, file: str, detail: str = "", frame: int | None = None) -> None:
        entry = {"file": file, "detail": detail}
        if frame is not None:
            entry["frame"] = frame
        self.skipped[reason].append(entry)

    def as_dict(self) -> dict:
        return {**self.settings, "processed": self.processed, "samples": self.samples,
                "skipped_count": {reason: len(entries) for reason, entries in sorted(self.skipped.items())},
                "skipped": dict(sorted(self.skipped.items())), "several_faces": self.several_faces}

    def summary(self, shown: int = 20) -> str:
        lines = [f"{self.processed} {'frames' if self.settings['layout'] == 'voxceleb' else 'photos'} processed; "
                 f"{self.samples} samples ({self.settings['kind']}) written to {self.settings['output']}"]
        total = sum(len(entries) for entries in self.skipped.values())
        lines.append(f"skipped {total}" + (":" if total else ""))
        for reason, entries in sorted(self.skipped.items()):
            names = [_entry_name(entry) for entry in entries]
            more = f", ... ({len(names) - shown} more in report.json)" if len(names) > shown else ""
            lines.append(f"  {reason} ({len(entries)}): {', '.join(names[:shown])}{more}")
        if self.several_faces:
            names = [f"{entry['file']} ({entry['n_faces']})" for entry in self.several_faces]
            more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
            lines.append(f"several faces, largest kept ({len(names)}): {', '.join(names[:shown])}{more}")
        return "\n".join(lines)


def _entry_name(entry: dict) -> str:
    name = entry["file"] + (f"@{entry['frame']}" if "frame" in entry else "")
    return f"{name} [{entry['detail']}]" if entry["detail"] else name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layout", choices=LAYOUTS, required=True, help="how IN is organised (see above)")
    parser.add_argument("--in", dest="input", required=True, type=Path, metavar="PATH", help="input folder")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="shard folder (created)")
    parser.add_argument("--group", choices=("auto", "none"), default="auto",
                        help="auto: clips (voxceleb), identities (folders, celeba); none: single samples")
    parser.add_argument("--frames", "--group-size", dest="frames", type=int, default=8, metavar="K",
                        help="frames per clip sample or photos per identity sample (default 8)")
    parser.add_argument("--size", type=int, default=224, help="crop side in pixels (default 224)")
    parser.add_argument("--min-face", type=int, default=48,
                        help="skip faces whose box is shorter than this many pixels (default 48)")
    parser.add_argument("--min-score", type=float, default=0.6, help="detector threshold (default 0.6)")
    parser.add_argument("--identities", type=Path, default=None,
                        help="celeba: the identity file (default IN/identity_CelebA.txt or IN/Anno/...)")
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg",
                        help="colour crops as JPEG (default: the sources are JPEGs already) or PNG")
    parser.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--prefix", default=None, help="shard name prefix (default: the layout)")
    parser.add_argument("--limit", type=int, default=None, help="process only the first N people/clips/photos")


def run(args: argparse.Namespace) -> int:
    if not args.input.is_dir():
        print(f"error: --in {args.input}: no such folder", file=sys.stderr)
        return 2
    if args.frames < 1:
        print(f"error: --frames must be at least 1, got {args.frames}", file=sys.stderr)
        return 2
    try:
        units = find_units(args.layout, args.input, args.identities)
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's start-up chatter
        from facelab.data.detect import FacePreprocessor

        preprocess = FacePreprocessor(size=args.size, min_face=args.min_face, min_score=args.min_score)
    except (FileNotFoundError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        report = prepare(args, units[: args.limit] if args.limit else units, preprocess)
    finally:
        preprocess.close()
    print(report.summary())
    print(f"report: {args.out / 'report.json'}")
    return 0 if report.samples else 1


def prepare(args: argparse.Namespace, units: list[Unit], preprocess) -> Report:
    """Write the shards and report.json of `units` (see find_units) into args.out.
    preprocess: image (H,W,3) uint8 RGB -> raw sample, raising FaceSkipped (a FacePreprocessor)."""
    from facelab.data.shards import ShardWriter

    group = "none" if args.group == "none" or args.layout == "images" else (
        "clip" if args.layout == "voxceleb" else "identity")
    report = Report(layout=args.layout, input=str(args.input), output=str(args.out), group=group,
                    kind=KIND[group], group_size=None if group == "none" else args.frames)
    started = time.time()
    info = {"layout": args.layout, "input": str(args.input), "size": args.size, "min_face": args.min_face,
            "min_score": args.min_score, "landmarks": "MediaPipe FaceMesh 478 -> 68 (MEDIAPIPE_TO_68)"}
    writer = ShardWriter(args.out, prefix=args.prefix or args.layout, max_count=args.max_count,
                         kind=KIND[group], info=info, image_format=args.image_format)
    total = len(units) * args.frames if args.layout == "voxceleb" else sum(len(unit.files) for unit in units)
    with writer, tqdm(total=total, unit="img", disable=None, desc="prep") as progress:
        job = Job(args, preprocess, report, progress, writer)
        for unit in units:
            job.unit(unit, group)
    report.settings["seconds"] = round(time.time() - started, 1)
    (args.out / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return report


class Job:
    """One prep run: turns units into samples, writes them, records what was skipped."""

    def __init__(self, args, preprocess, report: Report, progress, writer):
        self.args, self.preprocess, self.report, self.progress, self.writer = args, preprocess, report, progress, writer

    def unit(self, unit: Unit, group: str) -> None:
        if self.args.layout == "voxceleb":
            self._clip(unit, group)
            return
        if group == "identity" and unit.identity is None:
            for path in unit.files:
                self.report.skip("no_identity", self._name(path), "photo outside a person's folder")
            self.progress.update(len(unit.files))
            return
        samples = []
        for path in unit.files:
            sample = self._sample(lambda: read_image(path), path, frame=None, unit=unit)
            self.progress.update(1)
            if sample is None:
                continue
            if group == "none":
                self._write(sample)
            else:
                samples.append(sample)
        if group == "identity":
            self._identity_groups(unit, samples)

    def _identity_groups(self, unit: Unit, samples: list[dict]) -> None:
        size = self.args.frames
        if len(samples) < size:
            self.report.skip("too_few_photos", unit.identity, f"{len(samples)} usable, --frames {size}")
            return
        starts = list(range(0, len(samples) - size + 1, size))
        if starts[-1] + size < len(samples):  # top the last chunk up from the one before it
            starts.append(len(samples) - size)
        for start in starts:
            self._write(stack(samples[start:start + size]))

    def _clip(self, unit: Unit, group: str) -> None:
        name = self._name(unit.video) if unit.video is not None else f"{unit.identity}/{unit.clip}"
        size = self.args.frames
        try:
            count, frame_at = open_clip(unit, size)
        except FaceSkipped as skipped:
            self.report.skip(skipped.reason, name, skipped.detail)
            self.progress.update(size)
            return
        if count < size:
            self.report.skip("too_few_frames", name, f"{count} frames, --frames {size}")
            self.progress.update(size)
            return
        chosen = []
        for segment in range(size):
            for index in segment_frames(count, size, segment):
                path = unit.video or unit.files[index]
                sample = self._sample(lambda: frame_at(index), path, frame=index, unit=unit)
                if sample is not None:
                    chosen.append(sample)
                    break
            self.progress.update(1)
        if group == "none":
            for sample in chosen:
                self._write(sample)
        elif len(chosen) < size:
            self.report.skip("too_few_frames", name, f"{len(chosen)} of {size} segments have a usable face")
        else:
            self._write(stack(chosen))

    def _sample(self, load, path: Path, frame: int | None, unit: Unit) -> dict | None:
        """The aligned sample of one photo or frame, or None (recorded in the report)."""
        name = self._name(path)
        try:
            sample = self.preprocess(load())
        except FaceSkipped as skipped:
            self.report.skip(skipped.reason, name, skipped.detail, frame)
            return None
        except Exception as error:  # bad input never stops a run; the report names it
            self.report.skip("error", name, f"{type(error).__name__}: {error}", frame)
            return None
        self.report.processed += 1
        meta = sample["meta"]
        if meta["n_faces"] > 1:
            self.report.several_faces.append({"file": name, "n_faces": meta["n_faces"]}
                                             | ({} if frame is None else {"frame": frame}))
        sample["meta"] = {"source": self.args.layout, "identity": unit.identity, "clip": unit.clip,
                          "frame": frame, "file": name, **meta}
        return sample

    def _write(self, sample: dict) -> None:
        self.writer.write(sample)
        self.report.samples += 1

    def _name(self, path: Path) -> str:
        try:
            return path.relative_to(self.args.input).as_posix()
        except ValueError:
            return str(path)


def stack(samples: list[dict]) -> dict:
    """A group sample from K single samples (arrays stacked on a new first axis, meta a list)."""
    keys = [key for key in samples[0] if key != "meta"]
    return {**{key: np.stack([sample[key] for sample in samples]) for key in keys},
            "meta": [sample["meta"] for sample in samples]}


def read_image(path: Path) -> np.ndarray:
    """(H,W,3) uint8 RGB of a photo file; FaceSkipped("unreadable" or "corrupt") otherwise."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise FaceSkipped("missing", "no such file") from error
    except OSError as error:
        raise FaceSkipped("unreadable", f"{type(error).__name__}: {error.strerror or error}") from error
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise FaceSkipped("corrupt", f"not a decodable image ({len(data)} bytes)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def segment_frames(count: int, size: int, segment: int) -> list[int]:
    """Frame indices to try, in order, for `segment` of `size` equal segments of `count` frames."""
    start, length = segment * count / size, count / size
    indices = [min(count - 1, int(start + position * length)) for position in SEGMENT_POSITIONS]
    return list(dict.fromkeys(indices))


def open_clip(unit: Unit, size: int):
    """(frame count, frame_at(index) -> RGB image) of a clip (a frame folder or a video) cut into
    `size` segments. Videos are decoded once, in order, keeping the frames segment_frames names."""
    if unit.video is None:
        return len(unit.files), lambda index: read_image(unit.files[index])
    try:
        with open(unit.video, "rb") as handle:
            handle.read(1)
    except OSError as error:
        raise FaceSkipped("unreadable", f"{type(error).__name__}: {error.strerror or error}") from error
    capture = cv2.VideoCapture(str(unit.video))
    if not capture.isOpened():
        raise FaceSkipped("corrupt", "not a decodable video")
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    if count <= 0:  # some containers do not say: count by decoding
        while capture.grab():
            count += 1
        capture.release()
        capture = cv2.VideoCapture(str(unit.video))
    wanted = set()
    if count >= size:
        wanted = {index for segment in range(size) for index in segment_frames(count, size, segment)}
    frames: dict[int, np.ndarray] = {}
    for index in range(max(wanted, default=-1) + 1):
        if not capture.grab():
            break
        if index in wanted:
            ok, frame = capture.retrieve()
            if ok:
                frames[index] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    capture.release()

    def frame_at(index: int) -> np.ndarray:
        if index not in frames:
            raise FaceSkipped("corrupt", f"frame {index} of {count} could not be decoded")
        return frames[index]

    return count, frame_at


def find_units(layout: str, root: Path, identity_file: Path | None = None) -> list[Unit]:
    """The units of work of a layout, in a stable (sorted) order."""
    if layout == "images":
        return [Unit(None, None, [path]) for path in _files(root, IMAGE_EXTENSIONS)]
    if layout == "folders":
        units = [Unit(None, None, sorted(p for p in root.iterdir() if _is(p, IMAGE_EXTENSIONS)))]
        units += [Unit(person.name, None, _files(person, IMAGE_EXTENSIONS)) for person in _folders(root)]
        return [unit for unit in units if unit.files]
    if layout == "celeba":
        return _celeba_units(root, identity_file)
    if layout == "voxceleb":
        return _voxceleb_units(root)
    raise ValueError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})")


def _celeba_units(root: Path, identity_file: Path | None) -> list[Unit]:
    candidates = [identity_file] if identity_file else [root / name / "identity_CelebA.txt" for name in (".", "Anno")]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"celeba layout: no identity file at {', '.join(map(str, candidates))}; "
                                "pass --identities FILE")
    pairs = [line.split() for line in found.read_text().splitlines() if line.strip()]
    folder = next((root / name for name in CELEBA_IMAGE_FOLDERS if (root / name).is_dir()
                   and any(_is(p, IMAGE_EXTENSIONS) for p in (root / name).iterdir())), None)
    if folder is None:
        raise FileNotFoundError(f"celeba layout: no photos in {', '.join(str(root / n) for n in CELEBA_IMAGE_FOLDERS)}")
    by_stem = {path.stem: path for path in folder.iterdir() if _is(path, IMAGE_EXTENSIONS)}
    people: dict[str, list[Path]] = defaultdict(list)
    for pair in pairs:
        if len(pair) == 2:  # a photo missing from the folder is listed as such by read_image
            people[pair[1]].append(by_stem.get(Path(pair[0]).stem, folder / pair[0]))
    return [Unit(person, None, sorted(people[person])) for person in sorted(people, key=_natural)]


def _voxceleb_units(root: Path) -> list[Unit]:
    units = []
    for person in _folders(root):
        for clip in _folders(person):
            units += [Unit(person.name, f"{clip.name}/{video.stem}", video=video)
                      for video in sorted(p for p in clip.iterdir() if _is(p, VIDEO_EXTENSIONS))]
            for folder in [clip, *sorted(p for p in clip.rglob("*") if p.is_dir())]:
                frames = sorted(p for p in folder.iterdir() if _is(p, IMAGE_EXTENSIONS))
                if frames:
                    units.append(Unit(person.name, folder.relative_to(person).as_posix(), frames))
    return units


def _files(root: Path, extensions: set[str]) -> list[Path]:
    return sorted(path for path in root.rglob("*") if _is(path, extensions))


def _folders(root: Path) -> list[Path]:
    return sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))


def _is(path: Path, extensions: set[str]) -> bool:
    return path.suffix.lower() in extensions and path.is_file() and not path.name.startswith(".")


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
