"""``facelab data``: synth (the synthetic corpus), prep (real photos and videos), index (rebuild a
shard folder's index). Each subcommand's module brings its own arguments and runner."""

from __future__ import annotations

import argparse
import importlib
import importlib.util

#: subcommand -> module with add_arguments(parser) and run(args) -> exit code
SUBCOMMANDS = {
    "synth": "facelab.data.synth",
    "prep": "facelab.data.prep",
}


def add_cli(subparsers) -> None:
    data = subparsers.add_parser("data", help="write shards: synthetic corpus, preprocessing, index",
                                 description=__doc__)
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if importlib.util.find_spec(module_name) is None:  # not installed in this checkout
            continue
        module = importlib.import_module(module_name)
        parser = commands.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0],
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(parser)
        parser.set_defaults(func=module.run)
    index = commands.add_parser("index", help="rebuild index.json of a folder of .tar shards")
    index.add_argument("root", help="the shard folder")
    index.add_argument("--kind", default=None, help="images, clips or identities (default: keep the index's)")
    index.set_defaults(func=_index)
    data.set_defaults(func=lambda args: data.print_help() or 2)


def _index(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from facelab.data.shards import INDEX, read_index, write_index

    root = Path(args.root)
    previous = read_index(root) if (root / INDEX).exists() else {}
    index = write_index(root, kind=args.kind or previous.get("kind", "images"),
                        group_size=previous.get("group_size"))
    print(json.dumps({key: index[key] for key in ("kind", "group_size", "count")}))
    print(f"{len(index['shards'])} shards indexed in {root / INDEX}")
    return 0
