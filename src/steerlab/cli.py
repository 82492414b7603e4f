"""The `steerlab` command: dispatches to each capability's commands; bad input ends in one line, status 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from steerlab.errors import UserError

EXAMPLES = """examples:
  steerlab demo --out results/demo
  steerlab extract --data builtin:sentiment --layers 12,16 --out vectors/sentiment
  steerlab extract --data ../shared/data/caa/sycophancy/generate.json --layers 13 --out vectors/syco
  steerlab evaluate --vector vectors/syco --data ../shared/data/caa/sycophancy/test_ab.json --layer 13 --fraction 0.1
  steerlab sweep --vector vectors/sentiment --data builtin:sentiment-prompts --layers 12,16 --fractions -0.1,0.1
  steerlab generate --vector vectors/sentiment --layer 16 --fraction 0.1 --prompt "My weekend was"
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerlab",
        description="Steer and analyse language models through their internals.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    importlib.import_module("steerlab.steering.cli").add_subcommands(sub)
    for package in ("steerlab.influence", "steerlab.hessian"):
        importlib.import_module(f"{package}.cli").add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `UserError` prints `steerlab: error: ...` and returns 2 (traceback with -v)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        args.func(args)
    except UserError as error:
        if args.verbose:
            raise
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
