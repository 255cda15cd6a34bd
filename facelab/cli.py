"""The ``facelab`` command: train, eval, reconstruct, data, assets, bench.

    facelab train method=specular trainer.max_steps=200     # OmegaConf dotlist overrides
    facelab eval ckpt=runs/default/checkpoints/last.ckpt bench=synthetic
    facelab reconstruct photo.jpg --ckpt runs/default/checkpoints/last.ckpt --out out/
    facelab assets verify
    facelab --help | facelab <command> --help
"""

from __future__ import annotations

import argparse
import logging
import sys

from facelab import __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"facelab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a method (config overrides as key=value)",
        description="Compose conf/train.yaml with overrides: `group=choice` (method=cest), "
                    "`key=value` (trainer.max_steps=50), `+key=value` (add), `~key` (delete).")
    train.add_argument("overrides", nargs="*", metavar="OVERRIDE")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(func=_train)

    from facelab import assets

    assets.add_cli(commands)
    from facelab import bench

    bench.add_cli(commands)
    from facelab.data import cli as data_cli

    data_cli.add_cli(commands)
    from facelab.eval import run as eval_run

    eval_run.add_cli(commands)
    from facelab import reconstruct

    reconstruct.add_cli(commands)
    return parser


def _train(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from facelab.config import ConfigError, compose
    from facelab.methods import MethodNotAvailableError, get_method

    try:
        cfg = compose(args.overrides)
    except ConfigError as error:
        print(f"facelab train: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    try:
        method_class = get_method(cfg.method.name)
    except MethodNotAvailableError as error:
        print(f"facelab train: {error}", file=sys.stderr)
        return 3
    from facelab.train import run_training  # lands with the first method

    return run_training(cfg, method_class)


if __name__ == "__main__":
    sys.exit(main())
