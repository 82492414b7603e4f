"""`steerlab influence fit|score|self|report`: EK-FAC influence of a text corpus on prompt/completion queries.

    steerlab influence fit --model smollm2-135m --train corpus.txt --block-size 128 --n-blocks 128 \\
        --layers 24-29 --run runs/demo
    steerlab influence score --run runs/demo --queries queries.jsonl --top-k 10 [--prefilter 64]
    steerlab influence self --run runs/demo --top-k 20
    steerlab influence report --run runs/demo --out runs/demo/report.html

queries.jsonl: one {"prompt": ..., "completion": ...} (or {"prompt_ids": [...], "completion_ids": [...]})
per line. Wiring: `steerlab.cli` calls `add_subcommands(subparsers)`; each leaf sets `func(args)`.
Under `torchrun`, fit, score and self shard their batches across processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

__all__ = ["add_subcommands", "parse_layers"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_layers(text: str | None) -> list[int] | None:
    """'24-29' -> [24..29]; '0,3,-1' -> [0, 3, -1]; None/'all' -> None (every layer)."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    for part in text.split(","):
        if "-" in part[1:]:
            lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
            out.extend(range(int(lo), int(hi) + 1))
        else:
            out.append(int(part))
    return out


def add_subcommands(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "influence", help="EK-FAC influence functions (fit factors, score queries, self-influence, report)"
    )
    sub = parser.add_subparsers(dest="influence_command", required=True)

    fit = sub.add_parser("fit", help="fit K-FAC/EK-FAC factors on a text corpus")
    fit.add_argument("--run", required=True, help="run directory (stages are stored and resumed here)")
    fit.add_argument("--model", default="smollm2-135m")
    fit.add_argument("--train", required=True, help="plain-text training corpus")
    fit.add_argument("--block-size", type=int, default=128)
    fit.add_argument("--n-blocks", type=int, default=None)
    fit.add_argument("--layers", default=None, help="MLP layers to track, e.g. 24-29 (default: all)")
    fit.add_argument("--batch-size", type=int, default=8)
    fit.add_argument("--seed", type=int, default=0, help="seed of the sampled labels (true Fisher)")
    fit.add_argument("--empirical", action="store_true", help="empirical Fisher: use the data labels")
    fit.add_argument(
        "--samples", type=int, default=1, help="sampled labels per token (true Fisher; more: less noise)"
    )
    fit.add_argument(
        "--capture-dtype", choices=sorted(DTYPES), default=None, help="e.g. bfloat16 activations"
    )
    fit.add_argument("--model-dtype", choices=sorted(DTYPES), default="float32")
    fit.add_argument("--diagonal", action="store_true", help="also fit the diagonal Fisher")
    fit.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="recompute the layers below the first tracked one in every pass (default: cache their output on disk)",
    )
    fit.add_argument("--checkpoint-every", type=int, default=8)
    fit.add_argument("--threads", type=int, default=None)
    fit.set_defaults(func=cmd_fit)

    score = sub.add_parser("score", help="score queries against the corpus (top/bottom-k per query)")
    score.add_argument("--run", required=True)
    score.add_argument("--queries", required=True, help="jsonl of {prompt, completion}")
    score.add_argument("--strategy", choices=["identity", "diagonal", "kfac", "ekfac"], default="ekfac")
    score.add_argument(
        "--damping", type=float, default=None, help="default: 0.1 x mean eigenvalue per module"
    )
    score.add_argument(
        "--rank", type=int, default=None, help="compress preconditioned query gradients to this rank"
    )
    score.add_argument("--top-k", type=int, default=10)
    score.add_argument(
        "--prefilter", type=int, default=None, help="score only this many TF-IDF candidates per query"
    )
    score.add_argument("--sample-stride", type=int, default=1, help="keep every n-th score for histograms")
    score.add_argument(
        "--name", default="scores", help="stage name (e.g. a prefiltered variant beside 'scores')"
    )
    score.add_argument("--checkpoint-every", type=int, default=8)
    score.add_argument("--threads", type=int, default=None)
    score.set_defaults(func=cmd_score)

    self_ = sub.add_parser(
        "self", help="self-influence of every training sequence (atypical or memorised ones rank high)"
    )
    self_.add_argument("--run", required=True)
    self_.add_argument("--strategy", choices=["identity", "diagonal", "kfac", "ekfac"], default="ekfac")
    self_.add_argument(
        "--damping", type=float, default=None, help="default: 0.1 x mean eigenvalue per module"
    )
    self_.add_argument("--top-k", type=int, default=10, help="list this many highest sequences")
    self_.add_argument("--checkpoint-every", type=int, default=8)
    self_.add_argument("--threads", type=int, default=None)
    self_.set_defaults(func=cmd_self)

    report = sub.add_parser("report", help="self-contained HTML report with per-token heat-maps")
    report.add_argument("--run", required=True)
    report.add_argument("--out", default=None, help="default: RUN/report.html")
    report.add_argument("--show", type=int, default=3, help="sequences per sign and query")
    report.add_argument("--png", action="store_true", help="also write a static picture per query (for docs)")
    report.add_argument("--name", default="scores", help="which score stage to report")
    report.set_defaults(func=cmd_report)
    return parser


# ------------------------------------------------------------------ shared helpers


def _config(run: Path) -> dict:
    path = run / "config.json"
    if not path.exists():
        raise SystemExit(f"{run} has no config.json: run `steerlab influence fit --run {run} ...` first")
    return json.loads(path.read_text())


def _load(cfg: dict):
    from steerlab.models import load_model

    loaded = load_model(cfg["model"])
    model = loaded.model.to(DTYPES[cfg.get("model_dtype", "float32")]).eval()
    return model, loaded.tokenizer


def _blocks(run: Path, cfg: dict, tokenizer):
    from steerlab.influence.pipeline import BlockBatches
    from steerlab.influence.stages import check_stage
    from steerlab.io import load_tensors, save_tensors

    text_path = Path(cfg["train"])
    digest = hashlib.sha256(text_path.read_bytes()).hexdigest()[:16]
    args = {
        "train": str(text_path),
        "sha256": digest,
        "block_size": cfg["block_size"],
        "n_blocks": cfg["n_blocks"],
        "model": cfg["model"],
    }
    path = run / "tokens" / "result.safetensors"
    if not check_stage(run, "tokens", args):
        from steerlab.distributed import barrier, is_main
        from steerlab.influence.data import text_blocks

        if is_main():
            ids = tokenizer(text_path.read_text(), add_special_tokens=False)["input_ids"]
            blocks = text_blocks(ids, cfg["block_size"], cfg["n_blocks"])
            if not blocks:
                raise SystemExit(f"{text_path} has fewer than {cfg['block_size']} tokens")
            save_tensors(path, {"blocks": torch.tensor(blocks, dtype=torch.int32)})
        barrier()
    blocks = load_tensors(path)[0]["blocks"].long()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return BlockBatches(blocks, cfg["batch_size"], pad_id=pad)


def _task(cfg: dict):
    from steerlab.influence.tasks import LanguageModelTask

    return LanguageModelTask(layers=cfg["layers"])


def read_queries(path: str | Path, tokenizer) -> list[dict]:
    """Rows of {prompt, completion, prompt_ids, completion_ids} from a jsonl file."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}:{n}: invalid JSON ({error})") from None
        if "prompt_ids" not in row:
            if "prompt" not in row or "completion" not in row:
                raise SystemExit(
                    f"{path}:{n}: needs 'prompt' and 'completion' (or 'prompt_ids' and 'completion_ids')"
                )
            row["prompt_ids"] = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            row["completion_ids"] = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        row.setdefault("prompt", tokenizer.decode(row["prompt_ids"]))
        row.setdefault("completion", tokenizer.decode(row["completion_ids"]))
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no queries")
    return rows


def _query_batches(rows: list[dict], pad: int, size: int = 8) -> list[dict]:
    from steerlab.influence.data import query_batch

    return [
        query_batch(
            [r["prompt_ids"] for r in rows[i : i + size]],
            [r["completion_ids"] for r in rows[i : i + size]],
            pad,
        )
        for i in range(0, len(rows), size)
    ]


def _threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _open_run(args):
    """Threads, torch.distributed (under torchrun), and the fitted run's config, model and corpus."""
    from steerlab import distributed

    _threads(args)
    distributed.init()
    run = Path(args.run)
    cfg = _config(run)
    model, tokenizer = _load(cfg)
    return run, cfg, model, tokenizer, _blocks(run, cfg, tokenizer)


# ------------------------------------------------------------------ commands


def cmd_fit(args) -> None:
    from steerlab import distributed
    from steerlab.influence.pipeline import fit
    from steerlab.io import write_json

    _threads(args)
    distributed.init()
    run = Path(args.run)
    cfg = {
        "model": args.model,
        "train": str(Path(args.train).resolve()),
        "block_size": args.block_size,
        "n_blocks": args.n_blocks,
        "layers": parse_layers(args.layers),
        "batch_size": args.batch_size,
        "model_dtype": args.model_dtype,
    }
    config_path = run / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != json.loads(json.dumps(cfg)):
        raise SystemExit(f"{config_path} exists with other settings; use another --run directory")
    if distributed.is_main():
        write_json(config_path, cfg)
    model, tokenizer = _load(cfg)
    train = _blocks(run, cfg, tokenizer)
    factors = fit(
        run,
        model,
        _task(cfg),
        train,
        seed=None if args.empirical else args.seed,
        dtype=DTYPES.get(args.capture_dtype),
        diagonal=args.diagonal,
        prefix_cache=not args.no_prefix_cache,
        samples=args.samples,
        checkpoint_every=args.checkpoint_every,
        progress=distributed.is_main(),
    )
    if distributed.is_main():
        print(f"factors for {len(factors.modules)} modules in {run}/lambda/factors.safetensors")


def cmd_score(args) -> None:
    from steerlab import distributed
    from steerlab.influence.pipeline import score
    from steerlab.influence.topk import tfidf_candidates
    from steerlab.io import write_json

    run, cfg, model, tokenizer, train = _open_run(args)
    rows = read_queries(args.queries, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    candidates = None
    if args.prefilter:
        candidates = tfidf_candidates(
            [r["prompt_ids"] + r["completion_ids"] for r in rows],
            [b.tolist() for b in train.blocks],
            args.prefilter,
            vocab=len(tokenizer),
        )
    result = score(
        run,
        model,
        _task(cfg),
        train,
        _query_batches(rows, pad),
        strategy=args.strategy,
        damping=args.damping,
        rank_=args.rank,
        top_k=args.top_k,
        candidates=candidates,
        sample_stride=args.sample_stride,
        name=args.name,
        checkpoint_every=args.checkpoint_every,
        progress=distributed.is_main(),
    )
    if distributed.is_main():
        write_json(run / args.name / "queries.json", rows)
        unfiltered = run / "scores" / "result.safetensors"
        if candidates is not None and args.name != "scores" and unfiltered.exists():
            from steerlab.influence.topk import topk_recall
            from steerlab.io import load_tensors

            reference = load_tensors(unfiltered)[0]["top_index"][:, :10]
            if reference.shape[0] == len(rows):
                recall = topk_recall(candidates, reference)
                write_json(
                    run / args.name / "recall.json",
                    {"recall_of_unfiltered_top10": recall, "keep": args.prefilter},
                )
                print(
                    f"TF-IDF prefilter keeping {args.prefilter}: recall of the unfiltered top-10 = {recall:.3f}"
                )
        for qi, row in enumerate(rows):
            top = result["top_index"][qi, :3].tolist()
            print(
                f"query {qi} {row['completion'][:40]!r}: top {top} scores {[round(v, 4) for v in result['top_values'][qi, :3].tolist()]}"
            )


def cmd_self(args) -> None:
    from steerlab import distributed
    from steerlab.influence.pipeline import self_influence
    from steerlab.io import write_json

    run, cfg, model, tokenizer, train = _open_run(args)
    result = self_influence(
        run,
        model,
        _task(cfg),
        train,
        strategy=args.strategy,
        damping=args.damping,
        checkpoint_every=args.checkpoint_every,
        progress=distributed.is_main(),
    )
    if distributed.is_main():
        order = result["values"].argsort(descending=True)[: args.top_k]
        top = [
            {
                "index": int(result["index"][i]),
                "self_influence": float(result["values"][i]),
                "text": tokenizer.decode(train.sequences([int(result["index"][i])])[0]),
            }
            for i in order
        ]
        write_json(run / "self" / "top.json", top)
        for row in top:
            print(f"#{row['index']:<6} {row['self_influence']:.4g}  {row['text'][:80]!r}")


def cmd_report(args) -> None:
    from steerlab.influence.report import explain, layer_share, render_html
    from steerlab.influence.scores import Preconditioned
    from steerlab.influence.stages import check_stage
    from steerlab.io import load_tensors, read_json, write_json

    run = Path(args.run)
    cfg = _config(run)
    if not (run / args.name / "result.safetensors").exists():
        raise SystemExit(f"{run} has no scores: run `steerlab influence score --run {run} ...` first")
    model, tokenizer = _load(cfg)
    train = _blocks(run, cfg, tokenizer)
    task = _task(cfg)
    rows = read_json(run / args.name / "queries.json")
    result = load_tensors(run / args.name / "result.safetensors")[0]
    pre = Preconditioned.from_tensors(load_tensors(run / f"{args.name}_queries" / "result.safetensors")[0])
    sargs = read_json(run / args.name / "args.json")
    stage = "report" if args.name == "scores" else f"report_{args.name}"
    explained_path = run / stage / "explained.json"
    if not check_stage(run, stage, {"scores": sargs, "show": args.show}) or not explained_path.exists():
        explained = []
        for qi in range(len(rows)):
            pos = [int(i) for i in result["top_index"][qi, : args.show]]
            neg = [int(i) for i in result["bottom_index"][qi, : args.show]]
            explained.append(
                {
                    "positive": explain(model, task, train, pre, qi, pos),
                    "negative": explain(model, task, train, pre, qi, neg),
                }
            )
        write_json(explained_path, explained)
    explained = read_json(explained_path)
    shares = layer_share(result["layer_abs"], result["layers"].tolist())
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
                {**ex, "tokens": [tokenizer.decode([t]) for t in train.sequences([ex["index"]])[0]]}
                for ex in explained[qi][key]
            ]
        queries.append(q)
    meta = {
        "model": cfg["model"],
        "training blocks": len(train.blocks),
        "block size": cfg["block_size"],
        "layers": cfg["layers"] or "all",
        "strategy": sargs["strategy"],
        "damping": sargs["damping"] if sargs["damping"] is not None else "0.1 x mean eigenvalue",
    }
    out = Path(args.out) if args.out else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html("steerlab influence report", meta, queries))
    if args.png:
        from steerlab.influence.report import render_png

        for qi, q in enumerate(queries):
            render_png(q, out.with_name(f"{out.stem}-query{qi}.png"))
    print(f"report: {out}")
