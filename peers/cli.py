"""The `swarm` command line.

Each subcommand lives in its own module with ``register(subparsers)``, which adds its
parser and sets ``handler`` (a function of the parsed arguments returning an exit
code) and, optionally, ``fix_arguments`` (checks of the parsed arguments that argparse
cannot express; it calls ``parser.error``). A subcommand is listed here only once it works.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

# Modules that provide subcommands, in the order `swarm --help` lists them.
SUBCOMMAND_MODULES: list[str] = [
    "peers.join",
    "peers.generate",
    "peers.api",
    "peers.finetune",
    "peers.train",
    "peers.health_server",
    "peers.status",
    "peers.demo",
]


def software_version() -> str:
    try:
        return version("tensorswarm")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Swarm: pool GPUs across the internet for layer-sharded inference and DiLoCo training.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {software_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    fix_arguments = getattr(args, "fix_arguments", None)
    if fix_arguments is not None:  # checks argparse cannot express, e.g. a prompt after nargs="+"
        fix_arguments(args)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
