"""3D faces from photos with a trained method: parameters, meshes and overlays per photo.

    facelab reconstruct photo.jpg --ckpt runs/NAME/checkpoints/last.ckpt --out recon/
    facelab reconstruct photos/ --ckpt last.ckpt --out recon/ --batch-size 16 --relight

Each photo's faces are detected (YuNet), landmarked (FaceMesh) and aligned to the method's crop
size as in `facelab data prep` (--faces largest: only the largest); the crops run through the
method in batches. Folders are read
non-recursively (--recursive for subfolders); only files with an image suffix (.jpg, .png, ...) are
read from a folder, other files (.pts annotations, ...) are listed as ignored.

Per face, OUT/<name>/ (name: the photo's path below the given folder, without its suffix; a
photo's second, third, ... face in OUT/<name>_face2/, ...) holds:
  params.json     every parameter group (the network's raw outputs, as method.reconstruct takes
                  them); method, checkpoint, crop size; to_original, the (2,3) similarity taking
                  crop pixels to photo pixels; the detector's box and score; the 68 predicted
                  landmarks (and FaceMesh's) in photo pixels; the camera (rotation, translation,
                  scale, focal, principal point, and how they project mesh vertices to the crop)
  mesh.obj        the face in MODEL space (identity + expression, before pose and camera scale:
                  mm, +y up, +z out of the face), with the face model's UVs and the albedo as
                  per-vertex colours (`v x y z r g b`)
  mesh.ply        the same mesh, binary, with uchar RGB albedo colours (gamma-encoded)
  overlay.png     the shaded render laid over the photo
  relit.png       (--relight) the face under canonical lights: left, right and top
  expression.png  (--expression-from IMAGE) this face wearing that photo's expression
Existing files there are overwritten.

Exit status: 0 when every photo gave a face, 1 when any was skipped (each is listed with the
reason), 2 on a usage error (unreadable checkpoint, missing input, no face in --expression-from).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

#: Canonical key lights for --relight, camera space (x right, y up, +z toward the camera): the
#: direction toward the light; each adds KEY_IRRADIANCE where it faces a surface, over an
#: ambient AMBIENT_IRRADIANCE (white, linear colour).
LIGHTS = {"left": (-1.0, 0.3, 0.8), "right": (1.0, 0.3, 0.8), "top": (0.0, 1.0, 0.4)}
KEY_IRRADIANCE, AMBIENT_IRRADIANCE = 0.8, 0.35
DISPLAY_SIZE = 256  # relit.png / expression.png cells are shown at least this large
STAGES = ("detect", "network", "export")


class ReconstructError(ValueError):
    """A usage error: a missing input, no image files, an --expression-from photo without a face."""


@dataclass
class Skipped:
    file: str
    reason: str
    detail: str = ""


@dataclass
class Report:
    """What a run did. seconds: wall time per stage (detect: reading, detection, landmarks and
    alignment; network: the method's forward pass and render, relight and expression renders
    included; export: files); model loading is not included."""

    out: Path
    images: int = 0
    written: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def exit_code(self) -> int:
        return 1 if self.skipped else 0

    def summary(self) -> str:
        reasons = Counter(skip.reason for skip in self.skipped)
        counted = f" ({', '.join(f'{reason} {count}' for reason, count in sorted(reasons.items()))})" if reasons else ""
        line = (f"{self.images} images, {len(self.written)} faces written, {len(self.skipped)} skipped{counted}; "
                f"outputs in {self.out}")
        if self.ignored:
            suffixes = Counter(Path(name).suffix or "(none)" for name in self.ignored)
            line += f"; {len(self.ignored)} non-image files ignored ({', '.join(f'{s} {n}' for s, n in suffixes.items())})"
        if self.skipped:
            line += f"; {len(self.skipped)} of {self.images} inputs failed (exit status 1)"
        return line


def add_cli(subparsers) -> None:
    """Add the ``reconstruct`` command to the ``facelab`` argparse subparsers."""
    parser = subparsers.add_parser("reconstruct", help="3D faces from photos: parameters, meshes, overlays",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_DIR", help="photos and/or folders of photos")
    parser.add_argument("--ckpt", default=None, metavar="CKPT",
                        help="a checkpoint written by `facelab train` (default: the newest runs/*/checkpoints/last.ckpt)")
    parser.add_argument("--out", default=Path("runs/reconstruct"), type=Path, metavar="DIR",
                        help="output folder, created (default runs/reconstruct)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="faces per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--recursive", action="store_true", help="also read the subfolders of input folders")
    parser.add_argument("--relight", action="store_true", help="also write relit.png (canonical key lights)")
    parser.add_argument("--expression-from", type=Path, default=None, metavar="IMAGE",
                        help="also write expression.png: each face with this photo's expression")
    parser.add_argument("--faces", choices=("all", "largest"), default="all",
                        help="every face in a photo (default; the largest in OUT/<name>/, the k-th in "
                             "OUT/<name>_face<k>/) or the largest only")
    parser.add_argument("--opacity", type=float, default=0.8, metavar="A", help="of the render in overlay.png (default 0.8)")
    parser.add_argument("--min-face", type=int, default=48, metavar="PX",
                        help="skip faces whose box is shorter than this many pixels (default 48)")
    parser.add_argument("--min-score", type=float, default=0.6, metavar="S", help="detector threshold (default 0.6)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override applied before the method is rebuilt, e.g. "
                             "renderer.backend=torch for a GPU run on a CPU (repeatable)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch threads (default: all cores; fewer when other work keeps cores busy)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from facelab.methods import CheckpointError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.ckpt is None:
            args.ckpt = newest_checkpoint()
            print(f"facelab reconstruct: using {args.ckpt} (--ckpt picks another)", file=sys.stderr)
        overrides = dict(_key_value(item) for item in args.overrides)
        report = reconstruct(args.inputs, args.ckpt, args.out, batch_size=args.batch_size, device=args.device,
                             relight=args.relight, expression_from=args.expression_from, progress=not args.quiet,
                             recursive=args.recursive, overrides=overrides, min_face=args.min_face,
                             min_score=args.min_score, opacity=args.opacity, all_faces=args.faces == "all")
    except (CheckpointError, ReconstructError, ModuleNotFoundError) as error:
        print(f"facelab reconstruct: {error}", file=sys.stderr)
        return 2
    for skip in report.skipped:
        print(f"skipped {skip.file}: {skip.reason}" + (f" ({skip.detail})" if skip.detail else ""))
    print(report.summary())
    return report.exit_code


def newest_checkpoint(runs: Path = Path("runs")) -> Path:
    """The most recently written runs/*/checkpoints/last.ckpt; ReconstructError when there is none."""
    found = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise ReconstructError(f"no --ckpt given and no {runs}/*/checkpoints/last.ckpt to default to; "
                               "train one (`make train`) or pass --ckpt PATH")
    return found[-1]


def reconstruct(inputs, ckpt, out, batch_size: int = 8, device: str = "cpu", relight: bool = False,
                expression_from=None, progress: bool = True, recursive: bool = False,
                overrides: dict | None = None, min_face: int = 48, min_score: float = 0.6,
                opacity: float = 0.8, all_faces: bool = True) -> Report:
    """Reconstruct every face in `inputs` (a photo, a folder, or a list of them) with the method in
    checkpoint `ckpt`, writing OUT/<name>/ per photo (see the module docstring).

    Raises CheckpointError (facelab.methods) for a bad checkpoint and ReconstructError for other
    usage errors; a photo without a face, or a file that is no image, is recorded in the Report's
    ``skipped`` and the run goes on."""
    if batch_size < 1:
        raise ReconstructError(f"--batch-size must be at least 1, got {batch_size}")
    photos, ignored = find_images(inputs, recursive)
    method = _load(ckpt, device, overrides or {})
    reconstructor = Reconstructor(method, checkpoint=str(ckpt), min_face=min_face, min_score=min_score,
                                  relight=relight, opacity=opacity, all_faces=all_faces)
    try:
        if expression_from is not None:
            reconstructor.set_expression_source(Path(expression_from))
        report = reconstructor.run(photos, Path(out), batch_size, progress)
    finally:
        reconstructor.close()
    report.ignored = ignored
    return report


def find_images(inputs, recursive: bool = False) -> tuple[list[tuple[Path, str]], list[str]]:
    """(photo, output name) pairs, in order, and the non-image files seen in folders. A file given
    by name is always read; from folders only IMAGE_EXTENSIONS. Names are unique (a clash gets
    the suffix spelled out: photo_png)."""
    from facelab.data.prep import IMAGE_EXTENSIONS

    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    photos, ignored, taken = [], [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in (item.rglob("*") if recursive else item.iterdir()) if p.is_file())
            for file in files:
                if file.suffix.lower() in IMAGE_EXTENSIONS:
                    photos.append((file, file.relative_to(item).with_suffix("").as_posix()))
                else:
                    ignored.append(str(file))
        elif item.is_file():
            photos.append((item, item.stem))
        else:
            raise ReconstructError(f"{item}: no such file or folder")
    if not photos:
        raise ReconstructError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in "
                               f"{', '.join(map(str, inputs))}" + ("" if recursive else " (--recursive reads subfolders)"))
    unique = []
    for file, name in photos:
        if name in taken:
            name = f"{name}_{file.suffix.lstrip('.')}"
        base, count = name, 2
        while name in taken:
            name, count = f"{base}-{count}", count + 1
        taken.add(name)
        unique.append((file, name))
    return unique, ignored


def _load(ckpt, device: str, overrides: dict):
    from facelab.methods import CheckpointError, MethodNotAvailableError, load_method

    try:
        return load_method(str(ckpt), device, overrides)
    except MethodNotAvailableError as error:  # a run of a method this installation lacks
        raise CheckpointError(f"{ckpt}: {error}") from error


class Reconstructor:
    """A method in eval mode and a face preprocessor: photos -> aligned crops -> batched forward
    passes -> files. method: a FaceReconMethod; checkpoint: recorded in params.json."""

    def __init__(self, method, checkpoint: str | None = None, min_face: int = 48, min_score: float = 0.6,
                 relight: bool = False, opacity: float = 0.8, all_faces: bool = True):
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's start-up chatter
        from facelab.data.detect import FacePreprocessor

        self.method, self.checkpoint, self.opacity = method.eval(), checkpoint, opacity
        self.image_size = int(method.image_size)
        groups = method.mean_params(1)
        if relight and "sh" not in groups:
            raise ReconstructError(f"--relight: method {self.name!r} has no 'sh' parameter group to replace")
        self.relight, self.all_faces = relight, all_faces
        self.expression_source: tuple[torch.Tensor, np.ndarray, str] | None = None  # code, crop, name
        self.preprocess = FacePreprocessor(size=self.image_size, min_face=min_face, min_score=min_score)

    @property
    def name(self) -> str:
        return str(self.method.cfg.method.name)

    def set_expression_source(self, photo: Path) -> None:
        """Use this photo's predicted expression for expression.png (ReconstructError if it has no face)."""
        from facelab.data.detect import FaceSkipped
        from facelab.data.prep import read_image

        try:
            face = self.preprocess(read_image(photo))
        except FaceSkipped as skip:
            raise ReconstructError(f"--expression-from {photo}: {skip}") from skip
        self.set_expression(self._forward([face])["params"]["expression"][:1], face["image"], photo.stem)

    def set_expression(self, code: torch.Tensor, crop: np.ndarray | None, name: str) -> None:
        """Transfer expression `code` (1,E), the method's raw ``expression`` output, onto every
        face (expression.png); crop (S,S,3) uint8, the source face shown beside it, or None."""
        groups = self.method.mean_params(1)
        if "expression" not in groups:
            raise ReconstructError(f"--expression-from: method {self.name!r} has no 'expression' parameter group")
        if tuple(code.shape) != tuple(groups["expression"].shape):
            raise ValueError(f"expression code: expected {tuple(groups['expression'].shape)}, got {tuple(code.shape)}")
        self.expression_source = (code.detach(), crop, name)

    def run(self, photos: list[tuple[Path, str]], out: Path, batch_size: int = 8, progress: bool = True) -> Report:
        """Reconstruct `photos` ((file, output name) pairs, see find_images) into `out`."""
        from tqdm import tqdm

        from facelab.data.detect import FaceSkipped
        from facelab.data.prep import read_image

        report, pending = Report(out=out), []
        bar = tqdm(photos, desc="reconstruct", unit="img", disable=None if progress else True,
                   file=sys.stderr)  # None: only on a terminal
        for file, name in bar:
            report.images += 1
            started = time.perf_counter()
            try:
                photo = read_image(file)
                faces = self.preprocess.all_faces(photo) if self.all_faces else [self.preprocess(photo)]
            except FaceSkipped as skip:
                report.skipped.append(Skipped(str(file), skip.reason, skip.detail))
                continue
            finally:
                report.seconds["detect"] += time.perf_counter() - started
            for index, face in enumerate(faces):
                folder = out / (name if index == 0 else f"{name}_face{index + 1}")
                pending.append({**face, "photo": photo, "file": file, "folder": folder})
                if len(pending) == batch_size:
                    self._batch(pending, report)
                    pending = []
            bar.set_postfix(faces=len(report.written) + len(pending), skipped=len(report.skipped))
        if pending:
            self._batch(pending, report)
        bar.close()
        return report

    def close(self) -> None:
        self.preprocess.close()

    # --- one batch ---------------------------------------------------------------------------------
    def _forward(self, faces: list[dict]) -> dict:
        images = torch.from_numpy(np.stack([face["image"] for face in faces])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            return self.method(images.to(self.method.device).float() / 255.0)

    def _batch(self, faces: list[dict], report: Report) -> None:
        started = time.perf_counter()
        out = self._forward(faces)
        extras = self._extra_renders(out)
        colors = self._albedo_colors(out["params"])
        camera = {key[len("camera_"):]: value for key, value in out.items() if key.startswith("camera_")}
        out = _to_cpu({"params": out["params"], "vertices": out["vertices"], "landmarks": out["landmarks"],
                       "render": out["render"], "alpha": out.get("alpha", out["coverage"]), "camera": camera})
        report.seconds["network"] += time.perf_counter() - started
        started = time.perf_counter()
        for index, face in enumerate(faces):
            row = {key: _row(value, index) for key, value in out.items()}
            self._export(face, row, None if colors is None else colors[index],
                         {name: render[index] for name, render in extras.items()})
            report.written.append(face["folder"])
        report.seconds["export"] += time.perf_counter() - started

    def _extra_renders(self, out: dict) -> dict:
        """Relit and expression-transferred renders of the batch: name -> (B,4,S,S) RGB + alpha."""
        params, renders = out["params"], {}
        with torch.inference_mode():
            if self.relight:
                # the method adds a constant to the raw sh output (specular: 0.8 on the DC); found
                # from its own decode, so any method whose decoded sh is raw + offset relights right
                offset = out["sh"] - params["sh"].reshape(out["sh"].shape)
                for name, direction in LIGHTS.items():
                    target = canonical_sh(direction, len(offset), offset.shape[1]).to(offset)
                    relit = self.method.reconstruct({**params, "sh": (target - offset).reshape(params["sh"].shape)})
                    renders[name] = _rgba(relit)
            if self.expression_source is not None:
                code = self.expression_source[0].to(params["expression"]).expand_as(params["expression"])
                renders["expression"] = _rgba(self.method.reconstruct({**params, "expression": code}))
        return _to_cpu(renders)

    def _albedo_colors(self, params: dict) -> torch.Tensor | None:
        """(B,V,3) display colours of the predicted albedo, or None when the method has no albedo codes."""
        from facelab.render.shading import gamma_encode

        model = self.method.face_model
        if "albedo" not in params or params["albedo"].shape[-1] != model.num_albedo:
            return None
        with torch.inference_mode():
            return gamma_encode(model.albedo(params["albedo"])).clamp(0, 1).float().cpu()

    def _export(self, face: dict, out: dict, colors, extras: dict) -> None:
        from facelab.data.detect import apply_transform
        from facelab.viz.grid import image_grid, save_png
        from facelab.viz.mesh import write_obj, write_ply

        folder, model = face["folder"], self.method.face_model
        folder.mkdir(parents=True, exist_ok=True)
        to_original = np.asarray(face["meta"]["to_original"], np.float64)
        landmarks = apply_transform(to_original, out["landmarks"].double().numpy())
        record = {
            "file": str(face["file"]), "method": self.name, "checkpoint": self.checkpoint,
            "face_model": model.meta.get("name"), "image_size": self.image_size,
            "to_original": to_original.tolist(),
            "detector": {key: face["meta"][key] for key in ("box", "detector_score", "n_faces")},
            "source_size": face["meta"]["source_size"],
            "landmarks_68": _rounded(landmarks), "detected_landmarks_68": _rounded(
                apply_transform(to_original, face["landmarks"].astype(np.float64))),
            "mesh": "mesh.obj/.ply: model space (identity + expression, before pose), mm, +y up, +z out of the face",
            "params": {name: _rounded(value.double().numpy()) for name, value in out["params"].items()},
        }
        if out["camera"] and self.method.camera_description():
            record["camera"] = {"projection": self.method.camera_description() + "; photo px = to_original @ [x, y, 1]",
                                **{name: _rounded(value.double().numpy()) for name, value in out["camera"].items()}}
        (folder / "params.json").write_text(_json(record))
        uv = {"uv": model.uv, "uv_triangles": model.uv_triangles} if hasattr(model, "uv") else {}
        write_obj(folder / "mesh.obj", out["vertices"], model.triangles, colors=colors, **uv)
        write_ply(folder / "mesh.ply", out["vertices"], model.triangles, colors=colors)
        alpha = out["alpha"]
        save_png(paste_render(face["photo"], out["render"], alpha, to_original, self.opacity), folder / "overlay.png")
        crop = torch.from_numpy(face["image"]).permute(2, 0, 1).float()[None] / 255.0
        own = torch.cat([out["render"], alpha])[None]
        if self.relight:
            columns = {"input": crop, "predicted": own, **{name: extras[name][None] for name in LIGHTS}}
            save_png(image_grid(_over(columns, crop)), folder / "relit.png")
        if self.expression_source is not None:
            _, source_crop, source_name = self.expression_source
            columns = {"input": crop, "reconstruction": own, f"{source_name} expression": extras["expression"][None]}
            if source_crop is not None:
                columns[source_name] = torch.from_numpy(source_crop).permute(2, 0, 1).float()[None] / 255.0
            save_png(image_grid(_over(columns, crop)), folder / "expression.png")


def canonical_sh(direction, batch: int, channels: int = 3) -> torch.Tensor:
    """(batch,channels,9) SH of a white key light from `direction` (camera space) over ambient light."""
    from facelab.render.lighting import DEFAULT_SH_DC, sh_from_directional

    toward = torch.tensor(direction, dtype=torch.float32).expand(batch, 3)
    sh = sh_from_directional(toward, torch.full((batch, channels), KEY_IRRADIANCE))
    sh[:, :, 0] += AMBIENT_IRRADIANCE * DEFAULT_SH_DC
    return sh


def paste_render(photo: np.ndarray, render: torch.Tensor, alpha: torch.Tensor, to_original: np.ndarray,
                 opacity: float = 0.8) -> np.ndarray:
    """The crop-space render laid over the photo.

    photo: (H,W,3) uint8; render: (3,S,S) float display colours; alpha: (1,S,S) coverage in [0,1];
    to_original: (2,3) crop pixels -> photo pixels. Returns (H,W,3) uint8."""
    from facelab.data.detect import apply_transform

    height, width = photo.shape[:2]
    size = render.shape[-1]
    # only the crop's footprint (plus a pixel of bilinear fringe) is warped and blended
    corners = apply_transform(to_original, np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64))
    left, top = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, [width, height])
    right, bottom = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 1, 0, [width, height])
    result = photo.copy()
    if right <= left or bottom <= top:
        return result
    layers = torch.cat([render.clamp(0, 1), alpha.clamp(0, 1)]).permute(1, 2, 0).float().numpy()
    # cv2 indexes pixel centres at integers, facelab at +0.5: shift by half a pixel on both sides
    linear = to_original[:, :2]
    shift = to_original[:, 2:] + linear @ [[0.5], [0.5]] - 0.5 - [[left], [top]]
    warped = cv2.warpAffine(np.ascontiguousarray(layers), np.concatenate([linear, shift], axis=1),
                            (int(right - left), int(bottom - top)), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    weight = warped[..., 3:] * float(opacity)
    window = photo[top:bottom, left:right].astype(np.float32) / 255.0
    blended = window * (1.0 - weight) + warped[..., :3] * weight
    result[top:bottom, left:right] = np.round(blended * 255.0).clip(0, 255).astype(np.uint8)
    return result


def _over(columns: dict, crop: torch.Tensor) -> dict:
    """RGBA columns composited over the input crop; every column upscaled to DISPLAY_SIZE."""
    from facelab.viz.grid import overlay

    shown = {}
    for name, image in columns.items():
        if image.shape[1] == 4:
            image = overlay(crop, image[:, :3].clamp(0, 1), image[:, 3:], opacity=1.0)
        if image.shape[-1] < DISPLAY_SIZE:
            image = torch.nn.functional.interpolate(image, size=DISPLAY_SIZE, mode="bilinear", align_corners=False)
        shown[name] = image.clamp(0, 1)
    return shown


def _rgba(out: dict) -> torch.Tensor:
    return torch.cat([out["render"], out.get("alpha", out["coverage"])], dim=1)


def _to_cpu(value):
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value.detach().float().cpu() if torch.is_tensor(value) else value


def _row(value, index: int):
    if isinstance(value, dict):
        return {key: item[index] for key, item in value.items()}
    return value[index]


def _json(record: dict) -> str:
    """JSON with one line per key (two levels deep) and every list on one line."""
    def lines(mapping: dict, indent: str) -> str:
        return ",\n".join(f"{indent}{json.dumps(key)}: " + (
            "{\n" + lines(value, indent + "  ") + f"\n{indent}}}" if isinstance(value, dict) else json.dumps(value))
            for key, value in mapping.items())

    return "{\n" + lines(record, "  ") + "\n}\n"


def _rounded(array: np.ndarray) -> list:
    return np.round(array, 6).tolist()


def _key_value(item: str) -> tuple[str, object]:
    from facelab.config import parse_value

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ReconstructError(f"--set {item!r}: expected KEY=VALUE, e.g. renderer.backend=torch")
    return key, parse_value(value)
