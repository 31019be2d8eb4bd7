"""``algm-viz``: the command-line tool. Each sub-command lives in its own module of this package with
``add_parser(subparsers)`` (registering the command and its ``run(args)`` handler), a thin layer of
options over library calls; no module of the library imports this package."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from . import analyze, app_benchmark, balance, bench, calibrate, compare, gpu_check, sweep, train

#: Modules that define sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = (bench, train, sweep, calibrate, analyze, balance, compare, gpu_check, app_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="algm-viz", description="See and measure ALGM token merging in ViT segmentation models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parser(subparsers)
    for command in subparsers.choices.values():
        _add_common_options(command)
    return parser


def _add_common_options(command: argparse.ArgumentParser) -> None:
    """Every command shows its defaults in ``--help`` and takes ``--threads``."""
    command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    try:
        command.add_argument("--threads", type=int, help="torch and OpenCV CPU threads (None: the libraries' choice)")
    except argparse.ArgumentError:  # the command defines its own --threads
        return


def _apply_threads(threads: int | None) -> None:
    if threads:
        import cv2
        import torch

        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        _apply_threads(getattr(args, "threads", None))
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        logging.getLogger("algm_viz").error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
