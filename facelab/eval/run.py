"""``facelab eval``: score checkpoints on a benchmark and write one comparison table.

    facelab eval ckpt=runs/default/checkpoints/last.ckpt                 # synthetic, the run's corpus
    facelab eval ckpt=runs/a/checkpoints/last.ckpt ckpt=runs/b/checkpoints/last.ckpt bench=synthetic
    facelab eval ckpt=runs/default/checkpoints/last.ckpt bench=aflw2000 data=../shared/assets/faces/aflw2000
    facelab eval ckpt=... bench=scan data=DIR                               # NAME.jpg + NAME.obj|ply + landmarks

Options (key=value): ckpt (repeat it, or separate paths with commas), bench (synthetic | aflw2000
| scan), data (the benchmark's folder; synthetic defaults to the first checkpoint's own corpus),
out (default runs/eval), batch_size (16), device (cpu, cuda), limit (evaluate the first N samples),
mean_face (true: add the mean-face baseline row), progress (true).

Writes <out>/<bench>.json (every number, per candidate, with what was evaluated) and
<out>/<bench>.md (the table: a row per checkpoint plus the mean face, a column per metric), and
prints the table. The exit status is 0, or 2 for a usage error (a bad option, a missing
checkpoint or data folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from facelab.eval import benchmarks as B

log = logging.getLogger(__name__)

OPTIONS = {"ckpt": None, "bench": "synthetic", "data": None, "out": "runs/eval", "batch_size": 16, "device": "cpu",
           "limit": None, "mean_face": True, "progress": True}
#: table columns per benchmark: (result key, header, format)
COLUMNS = {
    "synthetic": [("vertex_error_mm", "vertex err. sim. (mm)", ".3f"), ("vertex_error_rigid_mm", "vertex err. rigid (mm)", ".3f"),
                  ("landmark_nme_pct", "lmk NME (%)", ".2f"), ("landmark_error_px", "lmk err. (px)", ".2f"),
                  ("photometric_error", "photometric", ".4f"), ("mask_iou", "mask IoU", ".3f"),
                  ("albedo_error", "albedo err.", ".4f"), ("lighting_error", "lighting err.", ".4f")],
    "aflw2000": [("nme_2d_pct [0,30)", "2D NME [0,30)", ".2f"), ("nme_2d_pct [30,60)", "2D NME [30,60)", ".2f"),
                 ("nme_2d_pct [60,90]", "2D NME [60,90]", ".2f"), ("nme_2d_pct mean", "2D NME mean", ".2f"),
                 ("nme_3d_pct mean", "3D NME mean", ".2f"), ("evaluated", "faces", "d"), ("failed", "failed", "d")],
    "scan": [("scan_median_mm", "median (mm)", ".3f"), ("scan_mean_mm", "mean (mm)", ".3f"),
             ("scan_std_mm", "std (mm)", ".3f"), ("evaluated", "scans", "d"), ("failed", "failed", "d")],
}


class EvalUsageError(ValueError):
    """A bad ``facelab eval`` option, checkpoint or data folder."""


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score checkpoints on a benchmark; writes JSON and a Markdown table",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("options", nargs="*", metavar="KEY=VALUE")
    parser.set_defaults(func=_main)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """key=value items -> options (defaults filled in; ``ckpt`` a list)."""
    options: dict[str, Any] = dict(OPTIONS)
    checkpoints: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or key not in OPTIONS:
            raise EvalUsageError(f"bad option {item!r}: expected KEY=VALUE with KEY one of {', '.join(OPTIONS)}")
        if key == "ckpt":
            checkpoints += [part for part in value.split(",") if part]
        elif key in ("batch_size", "limit"):
            try:
                options[key] = int(value) if value.lower() not in ("", "none", "null") else None
            except ValueError:
                raise EvalUsageError(f"{key}={value!r}: expected an integer") from None
            if options[key] is not None and options[key] < 1:
                raise EvalUsageError(f"{key}={value}: must be at least 1")
        elif key in ("mean_face", "progress"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise EvalUsageError(f"{key}={value!r}: expected true or false")
            options[key] = value.lower() in ("true", "1", "yes")
        else:
            options[key] = value
    if not checkpoints:
        raise EvalUsageError("no checkpoint: pass ckpt=PATH (runs write runs/<name>/checkpoints/last.ckpt); "
                             "repeat it to compare several")
    if options["bench"] not in B.BENCHES:
        raise EvalUsageError(f"bench={options['bench']!r}; valid: {', '.join(B.BENCHES)}")
    if options["batch_size"] is None:
        raise EvalUsageError("batch_size must be an integer of at least 1")
    options["ckpt"] = checkpoints
    return options


def candidate_name(path: str, method_name: str, taken: set[str]) -> str:
    """'<method> (<run>)' from runs/<run>/checkpoints/<file>.ckpt; made unique in `taken`."""
    file = Path(path)
    run = file.parent.parent.name if file.parent.name == "checkpoints" else file.stem
    if file.parent.name == "checkpoints" and file.stem != "last":
        run = f"{run}/{file.stem}"
    name, count = f"{method_name} ({run})", 2
    while name in taken:
        name, count = f"{method_name} ({run}, {count})", count + 1
    taken.add(name)
    return name


def evaluate(checkpoints: Sequence[str], bench: str = "synthetic", data: str | None = None, out: str = "runs/eval",
             batch_size: int = 16, device: str = "cpu", limit: int | None = None, mean_face: bool = True,
             progress: bool = True) -> dict[str, Any]:
    """Scores every checkpoint (and the first one's mean face) on `bench`; writes the JSON and
    Markdown reports into `out` and returns the JSON's content."""
    from facelab.methods import CheckpointError, load_method

    if bench not in B.BENCHES:
        raise EvalUsageError(f"bench={bench!r}; valid: {', '.join(B.BENCHES)}")
    candidates, taken = [], set()
    for path in checkpoints:
        try:
            method = load_method(path, device=device)
        except CheckpointError as error:
            raise EvalUsageError(str(error)) from error
        candidates.append(B.Candidate(candidate_name(path, str(method.cfg.method.name), taken), method,
                                      checkpoint=str(path)))
    if mean_face:
        candidates.append(B.Candidate("mean face", candidates[0].method, mean_face=True))
    runner = {"synthetic": _run_synthetic, "aflw2000": _run_aflw2000, "scan": _run_scan}[bench]
    results, info = runner(candidates, data, batch_size, limit, progress)
    report = {"bench": bench, **info, "candidates": [
        {"name": c.name, "checkpoint": c.checkpoint, "method": str(c.method.cfg.method.name),
         "face_model": str(c.method.cfg.face_model.name), "image_size": c.image_size, "mean_face": c.mean_face,
         "metrics": results[c.name]} for c in candidates]}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{bench}.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    table = markdown_table(bench, report)
    (folder / f"{bench}.md").write_text(table)
    report["table"] = table
    return report


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (torch.Tensor,)) else str(value)


def markdown_table(bench: str, report: dict[str, Any]) -> str:
    """A row per candidate, a column per metric present in any row; '-' where a row lacks it."""
    columns = [c for c in COLUMNS[bench] if any(c[0] in row["metrics"] for row in report["candidates"])]
    header = ["method", *(title for _, title, _ in columns)]
    lines = [f"<!-- facelab eval bench={bench} data={report.get('data')} -->",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for row in report["candidates"]:
        cells = [row["name"]]
        for key, _, fmt in columns:
            value = row["metrics"].get(key)
            cells.append("-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    notes = report.get("notes") or []
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else [])) + "\n"


def _run_synthetic(candidates, data, batch_size, limit, progress):
    from tqdm import tqdm

    split = B.synthetic_split(data) if data else B.default_synthetic_data(candidates[0].method)
    corpus_model, corpus_size = B.corpus_settings(split)
    results, notes = {}, []
    for candidate in candidates:
        scores = B.Scores()
        same = corpus_model == str(candidate.method.cfg.face_model.name)
        if not same:
            notes.append(f"{candidate.name}: face model {candidate.method.cfg.face_model.name} differs from the "
                         f"corpus's {corpus_model}; no vertex or albedo errors")
        batches = B.synthetic_batches(split, candidate.image_size, batch_size, limit)
        for batch in tqdm(batches, desc=candidate.name, unit="batch", disable=not progress):
            B.score_synthetic(candidate, batch, scores, same, corpus_size)
        results[candidate.name] = {**scores.means(), "samples": max(scores.counts.values(), default=0)}
    return results, {"data": str(split), "corpus_face_model": corpus_model, "corpus_image_size": corpus_size,
                     "notes": notes}


def _run_aflw2000(candidates, data, batch_size, limit, progress):
    if not data:
        raise EvalUsageError("bench=aflw2000 needs data=PATH: the AFLW2000-3D folder (imageNNNNN.jpg + .mat)")
    crops: dict[int, tuple] = {}
    results, failures_by_size = {}, {}
    for candidate in candidates:
        size = candidate.image_size
        if size not in crops:  # detection and alignment once per crop size
            crops[size] = B.read_aflw2000(data, size, limit, progress)
        samples, failures = crops[size]
        failures_by_size[size] = failures
        scores = B.Scores()
        B.score_aflw2000(candidate, samples, batch_size, scores, progress)
        results[candidate.name] = B.summarise_aflw2000(scores, failures)
    notes = [f"{name}: {reason}" for failures in failures_by_size.values() for name, reason in failures.items()]
    return results, {"data": str(data), "failures": {str(k): v for k, v in failures_by_size.items()},
                     "notes": sorted(set(notes))}


def _run_scan(candidates, data, batch_size, limit, progress):
    from facelab.data.detect import FacePreprocessor
    from facelab.data.prep import read_image

    if not data:
        raise EvalUsageError("bench=scan needs data=PATH: a folder of NAME.jpg|png + NAME.obj|ply + landmarks")
    samples = B.find_scans(data, limit)
    results, notes, per_sample = {}, [], {}
    crops: dict[int, dict] = {}  # crop size -> {sample name: FacePreprocessor output}: detection once per size
    preprocessors: dict[int, FacePreprocessor] = {}
    try:
        for candidate in candidates:
            size = candidate.image_size
            if size not in preprocessors:
                preprocessors[size], crops[size] = FacePreprocessor(size=size), {}

            def crop(sample, cached=crops[size], preprocess=preprocessors[size]):
                if sample.name not in cached:
                    cached[sample.name] = preprocess(read_image(sample.photo))
                return cached[sample.name]

            scores = B.Scores()
            per_sample[candidate.name], failures = B.score_scans(candidate, samples, scores, crop, progress)
            results[candidate.name] = B.summarise_scans(scores, per_sample[candidate.name], failures)
            notes += [f"{name}: {reason}" for name, reason in failures.items()]
    finally:
        for preprocess in preprocessors.values():
            preprocess.close()
    return results, {"data": str(data), "per_sample": per_sample, "notes": sorted(set(notes))}


def _main(args: argparse.Namespace) -> int:
    try:
        options = parse_options(args.options)
        report = evaluate(options.pop("ckpt"), **options)
    except (EvalUsageError, FileNotFoundError, ValueError) as error:
        print(f"facelab eval: {error}", file=sys.stderr)
        return 2
    print(report["table"], end="")
    print(f"wrote {Path(options['out']) / (options['bench'] + '.json')} and .md", file=sys.stderr)
    return 0
