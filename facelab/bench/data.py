"""Data speed: shard loading with augmentation, and synthetic corpus writing, in images/s.

Loading: a ShardStream over a temporary synthetic corpus at the benchmark resolution, read by a
StreamLoader with `--workers` processes, with the full augmentation (flip, similarity warp, colour
jitter; ground-truth samples included) and collation into batches. Writing: `write_corpus`
rendering, encoding and writing ict-face-lite samples, the whole pipeline, timed end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loading figure")
    parser.add_argument("--samples", type=int, default=512, help="samples in the corpus written and then read")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--face-model", default="ict-face-lite")
    parser.add_argument("--image-format", nargs="+", default=["png", "jpg"], choices=["png", "jpg"],
                        help="colour image format of the corpus (one pair of figures per format): png is "
                             "lossless and decode-bound; jpg (quality 95) is what real corpora ship")


def run(args: argparse.Namespace) -> list[dict]:
    from facelab.data.synth import SynthConfig, write_corpus

    results = []
    for image_format in args.image_format:
        with tempfile.TemporaryDirectory(prefix="facelab-bench-data-") as folder:
            corpus = Path(folder) / "corpus"
            config = SynthConfig.from_preset("default", face_model=args.face_model, image_size=args.resolution)
            start = time.perf_counter()
            write_corpus(corpus, args.samples, config, seed=0, batch_size=args.batch_size,
                         image_format=image_format, progress=False)
            seconds = time.perf_counter() - start
            results.append({"case": "synthetic corpus writing (render, encode, write)", "face_model": args.face_model,
                            "resolution": args.resolution, "image_format": image_format, "samples": args.samples,
                            "seconds": round(seconds, 3), "images_per_second": round(args.samples / seconds, 1)})
            print(f"bench data: wrote {args.samples} {image_format} samples in {seconds:.1f} s", file=sys.stderr)
            results.append({**_loading(corpus, args), "image_format": image_format})
    return results


def _loading(corpus: Path, args: argparse.Namespace) -> dict:
    from facelab.data.augment import AugmentConfig, Augmenter
    from facelab.data.stream import ShardStream, StreamLoader

    augment = AugmentConfig.from_config({"flip": True, "color_jitter": 0.1, "max_rotation_deg": 5.0,
                                         "max_scale": 0.05, "max_shift": 0.03, "ground_truth": True})
    epoch = 4 * args.samples
    stream = ShardStream(corpus, epoch_length=epoch, batch_size=args.batch_size, seed=0,
                         transform=Augmenter(augment, args.resolution), rank=0, world_size=1)
    loader = StreamLoader(stream, num_workers=args.workers)
    start, seen, first = time.perf_counter(), 0, None
    for batch in loader:
        if first is None:  # worker start-up is not loading speed
            first, start = len(batch["image"]), time.perf_counter()
            continue
        seen += len(batch["image"])
    seconds = time.perf_counter() - start
    return {"case": "shard loading with augmentation", "resolution": args.resolution, "workers": args.workers,
            "batch_size": args.batch_size, "samples": seen, "seconds": round(seconds, 3),
            "images_per_second": round(seen / seconds, 1), "bad_samples": loader.bad_sample_count}
