"""``facelab bench``: speed figures as JSON, never as timed tests.

Every report states where it ran: CPU model, torch and numba threads, the memory allocator
(glibc's malloc as shipped page-faults large temporaries on every call; tcmalloc or jemalloc,
preloaded with LD_PRELOAD, avoid it: ``make bench`` preloads one when the system has it), the
device, and library versions. Suites register in ``SUITES``; ``facelab bench all`` runs each.

    facelab bench render --out runs/bench/render.json
    make bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

SUITES: dict[str, str] = {"render": "facelab.bench.render", "data": "facelab.bench.data", "train": "facelab.bench.train",
                          "reconstruct": "facelab.bench.reconstruct"}


def add_cli(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="speed benchmarks, written as JSON",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = bench.add_subparsers(dest="suite", metavar="SUITE")
    everything = suites.add_parser("all", help="every suite with its defaults")
    _common(everything)
    everything.set_defaults(func=_run_all)
    for name, module in SUITES.items():
        suite = _import(module)
        parser = suites.add_parser(name, help=suite.__doc__.splitlines()[0])
        _common(parser)
        suite.add_arguments(parser)
        parser.set_defaults(func=lambda args, suite=suite: _run(suite, args))
    bench.set_defaults(func=lambda args: bench.print_help() or 2)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="write the JSON report here too (it always goes to stdout)")
    parser.add_argument("--threads", type=int, default=None, help="torch (and numba) threads; default: all cores")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions per case")


def _import(module: str):
    import importlib

    return importlib.import_module(module)


def _run(suite, args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"suite": args.suite, "environment": environment(), "results": suite.run(args)}
    _emit(report, args.out)
    return 0


def _run_all(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = {}
    for name, module in SUITES.items():
        suite = _import(module)
        parser = argparse.ArgumentParser()
        suite.add_arguments(parser)
        suite_args = parser.parse_args([])
        for key in ("threads", "repeats", "warmup"):
            setattr(suite_args, key, getattr(args, key))
        reports[name] = suite.run(suite_args)
    _emit({"suite": "all", "environment": environment(), "results": reports}, args.out)
    return 0


def _emit(report: dict, out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
        print(f"wrote {out}", file=sys.stderr)


def time_call(function: Callable[[], object], repeats: int, warmup: int, synchronize: Callable[[], None] = lambda: None) -> dict:
    """Wall-clock seconds of `function`: median, min and max over `repeats` after `warmup` calls."""
    for _ in range(warmup):
        function()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def environment() -> dict:
    """Where the figures were taken."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import numba

        info["numba"] = numba.__version__
        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        info["numba"] = None
    return info


def allocator() -> str:
    """The malloc this process runs on: a preloaded tcmalloc or jemalloc, else glibc's."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in maps:
            return name
    return "glibc malloc"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
