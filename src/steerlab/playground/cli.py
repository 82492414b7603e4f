"""`steerlab serve`: argparse over `playground.commands`."""

from __future__ import annotations

import argparse

from steerlab.options import add_arguments, from_namespace

__all__ = ["add_subcommands"]


def cmd_serve(ns: argparse.Namespace) -> None:
    from steerlab.playground.commands import ServeArgs, serve

    serve(from_namespace(ServeArgs, ns, progress=not ns.quiet))


def add_subcommands(sub) -> None:
    from steerlab.playground.commands import ServeArgs

    p = sub.add_parser("serve", help="the steering playground in the browser (local server)")
    add_arguments(p, ServeArgs)
    p.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    p.set_defaults(func=cmd_serve)
