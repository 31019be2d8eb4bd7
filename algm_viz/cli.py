"""``algm-viz``: the command-line tool. Each sub-command lives in its own module with
``add_parser(subparsers)`` (registering the command and its ``run(args)`` handler)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

#: Modules that define sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = ("algm_viz.bench", "algm_viz.train_cli", "algm_viz.eval_cli", "algm_viz.compare_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="algm-viz", description="See and measure ALGM token merging in ViT segmentation models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logging.getLogger("algm_viz").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
