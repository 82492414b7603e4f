"""Influence runs on disk, the functions behind `steerlab influence fit|score|self|report`.

    factors = fit_run("runs/demo", FitArgs(train="corpus.txt", block_size=128, n_blocks=64, layers=[24, 25]))
    outcome = score_run("runs/demo", ScoreArgs(queries="queries.jsonl", top_k=10))
    top = self_run("runs/demo", SelfArgs(top_k=20))
    page = report_run("runs/demo", ReportArgs(png=True))

A run directory holds `config.json` (the `FitArgs`), `tokens/` (the corpus blocks, with the sha256 of
the corpus bytes they were read from), the pipeline's stages and the reports. Only `fit` reads the
corpus: scoring, self-influence and reports use the stored blocks, so a run keeps working when the
corpus file moves. Under `torchrun`, call `steerlab.distributed.init()` first.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from steerlab.distributed import barrier, is_main
from steerlab.errors import UserError
from steerlab.influence.config import FitArgs, ReportArgs, ScoreArgs, SelfArgs
from steerlab.influence.corpus import check_corpus, prefix_sha256, read_blocks
from steerlab.influence.pipeline import SCORES, BlockBatches
from steerlab.influence.queries import query_batches, read_queries, same_queries, tokenize_queries
from steerlab.influence.stages import StageArgumentsError, differences
from steerlab.io import (
    check_output_file,
    check_output_folder,
    load_result,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from steerlab.options import DTYPES

__all__ = [
    "Run",
    "RunError",
    "ScoreOutcome",
    "fit_run",
    "open_run",
    "read_config",
    "report_run",
    "score_run",
    "self_run",
]


class RunError(UserError):
    """A run directory lacks what a command needs (it was not fitted or scored yet)."""


@dataclass
class Run:
    """A fitted run, opened: its settings, model, tokenizer and training blocks."""

    path: Path
    args: FitArgs
    model: torch.nn.Module
    tokenizer: object
    train: BlockBatches
    model_info: dict


@dataclass
class ScoreOutcome:
    """Tokenised query rows, the scores (top/bottom-k per query, ...) and the prefilter's recall."""

    rows: list[dict]
    result: dict[str, torch.Tensor]
    recall: float | None = None


def _tokens_path(run: Path) -> Path:
    return run / "tokens" / "result.safetensors"


def read_config(run_dir: str | Path) -> FitArgs:
    """The `FitArgs` a run was fitted with."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RunError(
            f"{run_dir} has no config.json: run `steerlab influence fit --run {run_dir} ...` first"
        )
    return FitArgs.from_saved(read_json(path))


def _same_corpus_bytes(run: Path, train: str) -> bool:
    """Whether `train` starts with the very bytes the run's blocks were read from."""
    path = _tokens_path(run)
    if not path.exists():
        return False
    meta = load_tensors(path)[1]
    return "bytes" in meta and prefix_sha256(train, meta["bytes"]) == meta.get("sha256")


def _check_config(run: Path, args: FitArgs) -> None:
    """Refuse a run directory whose saved settings differ from `args` (naming the keys); a corpus that
    only moved (same bytes) is accepted."""
    if not (run / "config.json").exists():
        return
    saved, requested = read_config(run).saved(), args.saved()
    changed = {k for k in saved if saved[k] != requested[k]}
    if changed == {"train"} and _same_corpus_bytes(run, args.train):
        return
    if changed:
        diffs = differences(saved, requested)
        raise StageArgumentsError(
            f"{run / 'config.json'} holds a run with other settings ({'; '.join(diffs)}); "
            "use another --run directory, or the saved settings"
        )


def load_run_model(args: FitArgs):
    """(model loaded in `args.model_dtype`, eval mode; tokenizer; model identity)."""
    from steerlab.models import load_model

    loaded = load_model(args.model, dtype=DTYPES[args.model_dtype])
    return loaded.model.eval(), loaded.tokenizer, loaded.info.to_dict()


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _has_tokens(run: Path) -> bool:
    """Whether the run holds its corpus blocks (blocks without a config are from an interrupted fit)."""
    return _tokens_path(run).exists() and (run / "config.json").exists()


def _tokenize_corpus(run: Path, args: FitArgs, tokenizer) -> None:
    """Store the corpus blocks in `run/tokens/` (nothing is written when reading the corpus fails)."""
    if _has_tokens(run):
        return
    corpus = read_blocks(
        args.train, tokenizer, args.block_size, args.n_blocks
    )  # on every process: an error stops all
    if is_main():
        meta = {"train": args.train, "sha256": corpus.sha256, "bytes": corpus.bytes_read}
        save_tensors(_tokens_path(run), {"blocks": corpus.blocks}, meta)
        write_json(
            run / "tokens" / "args.json", {**meta, "block_size": args.block_size, "n_blocks": args.n_blocks}
        )
    barrier()


def _require_tokens(run: Path) -> Path:
    path = _tokens_path(run)
    if not path.exists():
        raise RunError(
            f"{path} is missing: the fit did not finish; rerun `steerlab influence fit --run {run} ...`"
        )
    return path


def _blocks(run: Path, args: FitArgs, tokenizer) -> BlockBatches:
    blocks = load_tensors(_require_tokens(run))[0]["blocks"].long()
    return BlockBatches(blocks, args.batch_size, pad_id=_pad_id(tokenizer))


def _task(args: FitArgs):
    from steerlab.influence.tasks import LanguageModelTask

    return LanguageModelTask(layers=args.layers)


def fit_run(run_dir: str | Path, args: FitArgs, *, progress: bool = False):
    """Fit EK-FAC factors of `args.train` into `run_dir` (resumed when interrupted) and return them.
    Inputs are checked before the model loads and `config.json` is written only once the corpus has
    been read: a failed fit leaves nothing that refuses the corrected command."""
    from steerlab.influence.pipeline import fit

    run = check_output_folder(run_dir, "--run")
    args = replace(args, train=str(Path(args.train).resolve()))
    _check_config(run, args)
    if not _has_tokens(run):
        check_corpus(args.train)
    model, tokenizer, info = load_run_model(args)
    _tokenize_corpus(run, args, tokenizer)
    if is_main():
        write_json(run / "config.json", args.saved())
    return fit(
        run,
        model,
        _task(args),
        _blocks(run, args, tokenizer),
        seed=None if args.empirical else args.seed,
        dtype=DTYPES.get(args.capture_dtype) if args.capture_dtype else None,
        diagonal=args.diagonal,
        block_max_params=args.block_max_params,
        unit_max_params=args.unit_max_params,
        prefix_cache=args.prefix_cache,
        samples=args.samples,
        checkpoint_every=args.checkpoint_every,
        progress=progress,
        model_info=info,
    )


def open_run(run_dir: str | Path, args: FitArgs | None = None) -> Run:
    """A fitted run's settings, model, tokenizer and stored training blocks (the corpus is not read)."""
    run = Path(run_dir)
    args = args or read_config(run)
    _require_tokens(run)
    model, tokenizer, info = load_run_model(args)
    return Run(run, args, model, tokenizer, _blocks(run, args, tokenizer), info)


def _check_queries(run: Path, args: ScoreArgs, rows: list[dict]) -> None:
    saved = run / args.name / "queries.json"
    if saved.exists() and not same_queries(rows, read_json(saved)):
        raise StageArgumentsError(
            f"{run / args.name} holds the scores of other queries; score {args.queries} in the same run "
            "under another name, e.g. --name scores2 (no refit needed)"
        )


def _prefilter_recall(run: Path, args: ScoreArgs, candidates: torch.Tensor, n_queries: int) -> float | None:
    """Recall of the unfiltered top-10 among the candidates, when this run holds unfiltered scores of
    the same queries."""
    unfiltered = run / "scores" / "result.safetensors"
    if args.name == "scores" or not unfiltered.exists():
        return None
    reference = load_result(unfiltered, SCORES)[0]["top_index"][:, :10]
    if reference.shape[0] != n_queries:
        return None
    from steerlab.influence.topk import topk_recall

    return topk_recall(candidates, reference)


def score_run(run_dir: str | Path, args: ScoreArgs, *, progress: bool = False) -> ScoreOutcome:
    """Score the queries of `args.queries` against the run's corpus; stored in `run/<args.name>/`
    (with `queries.json`, and `recall.json` for a prefiltered variant beside the unfiltered scores)."""
    from steerlab.influence.pipeline import score
    from steerlab.influence.topk import tfidf_candidates

    run = check_output_folder(run_dir, "--run")
    config = read_config(run)
    requested = read_queries(args.queries)
    _check_queries(run, args, requested)
    opened = open_run(run, config)
    rows = tokenize_queries(args.queries, requested, opened.tokenizer)
    candidates = None
    if args.prefilter:
        candidates = tfidf_candidates(
            [r["prompt_ids"] + r["completion_ids"] for r in rows],
            [b.tolist() for b in opened.train.blocks],
            args.prefilter,
            vocab=len(opened.tokenizer),
        )
    result = score(
        run,
        opened.model,
        _task(config),
        opened.train,
        query_batches(rows, _pad_id(opened.tokenizer)),
        strategy=args.strategy,
        damping=args.damping,
        weight_decay=args.weight_decay,
        rank_=args.rank,
        top_k=args.top_k,
        candidates=candidates,
        sample_stride=args.sample_stride,
        full_scores=args.full_scores,
        name=args.name,
        checkpoint_every=args.checkpoint_every,
        progress=progress,
        model_info=opened.model_info,
    )
    recall = None if candidates is None else _prefilter_recall(run, args, candidates, len(rows))
    if is_main():
        write_json(run / args.name / "queries.json", rows)
        if recall is not None:
            write_json(
                run / args.name / "recall.json",
                {"recall_of_unfiltered_top10": recall, "keep": args.prefilter},
            )
    return ScoreOutcome(rows, result, recall)


def self_run(run_dir: str | Path, args: SelfArgs, *, progress: bool = False) -> list[dict]:
    """Self-influence of every training sequence (`run/self/`); returns the `args.top_k` highest as
    {index, self_influence, text}, also written to `run/self/top.json`."""
    from steerlab.influence.pipeline import self_influence

    opened = open_run(check_output_folder(run_dir, "--run"))
    result = self_influence(
        opened.path,
        opened.model,
        _task(opened.args),
        opened.train,
        strategy=args.strategy,
        damping=args.damping,
        weight_decay=args.weight_decay,
        checkpoint_every=args.checkpoint_every,
        progress=progress,
        model_info=opened.model_info,
    )
    order = result["values"].argsort(descending=True)[: args.top_k]
    top = [
        {
            "index": int(result["index"][i]),
            "self_influence": float(result["values"][i]),
            "text": opened.tokenizer.decode(opened.train.sequences([int(result["index"][i])])[0]),
        }
        for i in order
    ]
    if is_main():
        write_json(opened.path / "self" / "top.json", top)
    return top


def _explained(opened: Run, args: ReportArgs, result: dict, pre, n_queries: int) -> list[dict]:
    """Per query, per-token explanations of the `args.show` most positive and negative sequences, kept in
    `run/report/explained.json` and reused while the scores and `show` stay the same."""
    from steerlab.influence.report import explain

    run = opened.path
    folder = run / ("report" if args.name == "scores" else f"report_{args.name}")
    key = {"scores": read_json(run / args.name / "args.json"), "show": args.show}
    if (folder / "args.json").exists() and (folder / "explained.json").exists():
        if read_json(folder / "args.json") == key:
            return read_json(folder / "explained.json")
    task = _task(opened.args)
    explained = [
        {
            sign: explain(
                opened.model, task, opened.train, pre, qi, [int(i) for i in result[index][qi, : args.show]]
            )
            for sign, index in (("positive", "top_index"), ("negative", "bottom_index"))
        }
        for qi in range(n_queries)
    ]
    if is_main():
        write_json(folder / "explained.json", explained)
        write_json(folder / "args.json", key)
    return explained


def report_run(run_dir: str | Path, args: ReportArgs) -> Path:
    """Write the self-contained HTML report of a scored run (and, with `args.png`, one PNG per query
    beside it, `<out>-query<i>.png`), every file atomically; returns the HTML path."""
    from steerlab.influence.report import layer_share, render_html, render_png
    from steerlab.influence.scores import Preconditioned
    from steerlab.io import atomic_write_text

    run = Path(run_dir)
    config = read_config(run)
    scored = run / args.name / "result.safetensors"
    if not scored.exists() or not (run / args.name / "queries.json").exists():
        raise RunError(
            f"{run} has no scores named {args.name!r}: run `steerlab influence score --run {run} ...` first"
        )
    out = Path(args.out) if args.out else run / "report.html"
    check_output_file(out, "--out")
    rows = read_json(run / args.name / "queries.json")
    result = load_result(scored, SCORES)[0]
    pre = Preconditioned.from_tensors(load_tensors(run / f"{args.name}_queries" / "result.safetensors")[0])
    opened = open_run(run, config)
    explained = _explained(opened, args, result, pre, len(rows))
    shares = layer_share(result["layer_abs"], result["layers"].tolist())
    decode = opened.tokenizer.decode
    queries = []
    for qi, row in enumerate(rows):
        q = {
            "prompt": row["prompt"],
            "completion": row["completion"],
            "layer_share": shares[qi],
            "sample_scores": result["sample_values"][qi].tolist() if "sample_values" in result else [],
        }
        for key in ("positive", "negative"):
            q[key] = [
                {**ex, "tokens": [decode([t]) for t in opened.train.sequences([ex["index"]])[0]]}
                for ex in explained[qi][key]
            ]
        queries.append(q)
    sargs = read_json(run / args.name / "args.json")
    meta = {
        "model": config.model,
        "training blocks": len(opened.train.blocks),
        "block size": config.block_size,
        "layers": config.layers or "all",
        "strategy": sargs["strategy"],
        "damping": sargs["damping"] if sargs["damping"] is not None else "0.1 x mean eigenvalue",
    }
    atomic_write_text(out, render_html("steerlab influence report", meta, queries))
    if args.png:
        for qi, q in enumerate(queries):
            render_png(q, out.with_name(f"{out.stem}-query{qi}.png"))
    return out
