"""The `steerlab` command: dispatches to each capability's commands; bad input ends in one line, status 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys

from steerlab.errors import UserError

EXAMPLES = """examples:
  steerlab demo --out results/demo
  steerlab extract --data builtin:sentiment --layers 12,16 --out vectors/sentiment
  steerlab evaluate --vector vectors/sentiment --data builtin:sentiment-prompts --layer 16 --fraction 0.1
  steerlab sweep --vector vectors/sentiment --data builtin:sentiment-prompts --layers 12,16 --fractions -0.1,0.1
  steerlab generate --vector vectors/sentiment --layer 16 --fraction 0.1 --no-chat --prompt "My weekend was"
  steerlab extract --experiment builtin:sentiment --out vectors/sentiment
  steerlab extract --data caa:sycophancy --split train --limit 200 --layers 13 --out vectors/syco
  steerlab evaluate --vector vectors/syco --data caa:sycophancy/test_ab --limit 50 --layer 13
  steerlab serve --vectors vectors --results results
  steerlab organism build --name smollm2-135m-refusal
  steerlab organism evaluate --out results/organism
  steerlab compare --layers 15 --steps 30 --rank 4 --out results/compare
  steerlab redteam run --model smollm2-135m-refusal --data DATA/refusal_direction --layers 6,12 --out results/rt
(caa:BEHAVIOUR downloads the pinned CAA file once; everything else runs offline)
"""

# A value such as -0.1,0.1 or -1e9 that argparse would take for an option.
NEGATIVE_VALUE = re.compile(r"-\.?\d")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerlab",
        description="Steer and analyse language models through their internals.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step (INFO)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    importlib.import_module("steerlab.steering.cli").add_subcommands(sub)
    for package in (
        "steerlab.influence",
        "steerlab.hessian",
        "steerlab.organisms",
        "steerlab.finetune",
        "steerlab.playground",
        "steerlab.redteam",
    ):
        importlib.import_module(f"{package}.cli").add_subcommands(sub)
    return parser


def join_negative_values(argv: list[str]) -> list[str]:
    """`--fractions -0.1,0.1` -> `--fractions=-0.1,0.1`: a long option followed by a negative number (list)."""
    out: list[str] = []
    for token in argv:
        previous = out[-1] if out else ""
        if (
            NEGATIVE_VALUE.match(token)
            and previous.startswith("--")
            and "=" not in previous
            and previous != "--"
        ):
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one command. A `UserError` prints `steerlab: error: ...` and returns 2 (traceback with -v)."""
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else argv))
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    logging.getLogger("steerlab").setLevel(level)
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
