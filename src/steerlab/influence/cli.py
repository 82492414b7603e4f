"""`steerlab influence fit|score|self|report`: EK-FAC influence of a text corpus on prompt/completion queries.

    steerlab influence fit --model smollm2-135m --train corpus.txt --block-size 128 --n-blocks 128 \\
        --layers 24-29 --run runs/demo
    steerlab influence score --run runs/demo --queries queries.jsonl --top-k 10 [--prefilter 64]
    steerlab influence self --run runs/demo --top-k 20
    steerlab influence report --run runs/demo --out runs/demo/report.html

queries.jsonl: one {"prompt": ..., "completion": ...} (or {"prompt_ids": [...], "completion_ids": [...]})
per line. The commands parse their options into the dataclasses of `influence.config` and call
`influence.commands`; under `torchrun`, fit, score and self shard their batches across processes.
"""

from __future__ import annotations

import argparse

from steerlab.influence.config import FitArgs, ReportArgs, ScoreArgs, SelfArgs
from steerlab.options import add_arguments, from_namespace

__all__ = ["add_subcommands"]


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "influence", help="EK-FAC influence functions (fit factors, score queries, self-influence, report)"
    )
    sub = parser.add_subparsers(dest="influence_command", required=True)
    commands = (
        ("fit", "fit K-FAC/EK-FAC factors on a text corpus", FitArgs, cmd_fit),
        ("score", "score queries against the corpus (top/bottom-k per query)", ScoreArgs, cmd_score),
        (
            "self",
            "self-influence of every training sequence (atypical or memorised ones rank high)",
            SelfArgs,
            cmd_self,
        ),
        ("report", "self-contained HTML report with per-token heat-maps", ReportArgs, cmd_report),
    )
    for name, help_, cls, func in commands:
        command = sub.add_parser(name, help=help_)
        command.add_argument(
            "--run", required=True, help="run directory (stages are stored and resumed here)"
        )
        add_arguments(command, cls)
        if cls is not ReportArgs:
            command.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        command.set_defaults(func=func)
    return parser


def _start(args) -> bool:
    """Threads and torch.distributed (under torchrun); whether this process prints."""
    import torch

    from steerlab import distributed

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    distributed.init()
    return distributed.is_main()


def cmd_fit(args) -> None:
    from steerlab.influence.commands import fit_run

    fit_args = from_namespace(FitArgs, args)
    main = _start(args)
    factors = fit_run(args.run, fit_args, progress=main and not args.quiet)
    if main:
        print(f"factors for {len(factors.modules)} modules in {args.run}")


def cmd_score(args) -> None:
    from steerlab.influence.commands import score_run

    score_args = from_namespace(ScoreArgs, args)
    main = _start(args)
    outcome = score_run(args.run, score_args, progress=main and not args.quiet)
    if not main:
        return
    if outcome.recall is not None:
        print(
            f"TF-IDF prefilter keeping {score_args.prefilter}: recall of the unfiltered top-10 = {outcome.recall:.3f}"
        )
    for qi, row in enumerate(outcome.rows):
        top = outcome.result["top_index"][qi, :3].tolist()
        values = [round(v, 4) for v in outcome.result["top_values"][qi, :3].tolist()]
        print(f"query {qi} {row['completion'][:40]!r}: top {top} scores {values}")


def cmd_self(args) -> None:
    from steerlab.influence.commands import self_run

    self_args = from_namespace(SelfArgs, args)
    main = _start(args)
    top = self_run(args.run, self_args, progress=main and not args.quiet)
    if main:
        for row in top:
            print(f"#{row['index']:<6} {row['self_influence']:.4g}  {row['text'][:80]!r}")


def cmd_report(args) -> None:
    from steerlab.influence.commands import report_run

    print(f"report: {report_run(args.run, from_namespace(ReportArgs, args))}")
