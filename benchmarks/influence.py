"""steerlab.influence vs Kronfluence on SmolLM2-135M: wall time per stage, peak RSS, score agreement.

Configuration: MLPs of layers 24-29, 128 training blocks of 128 tokens from wikitext-2 valid, 8 queries
of 64 prompt + 32 completion tokens (4 copied from training blocks), empirical Fisher (the same labels on
both sides), the same explicit damping, float32. Each library runs in its own subprocess (peak RSS is
the subprocess's), `--repeats` times. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "wikitext-2" / "valid.txt"
COPIED = [5, 40, 75, 110]  # training blocks whose first 96 tokens become queries
HELD_OUT = [200, 210, 220, 230]  # blocks beyond the training set


def build_inputs(tokenizer, n_blocks: int, block_size: int):
    from steerlab.influence.data import query_batch, text_blocks

    ids = tokenizer(CORPUS.read_text(), add_special_tokens=False)["input_ids"]
    blocks = text_blocks(ids, block_size)
    train_blocks = blocks[:n_blocks]
    sources = [train_blocks[i] for i in COPIED if i < n_blocks] + [blocks[i] for i in HELD_OUT]
    queries = [query_batch([b[:64] for b in sources], [b[64:96] for b in sources])]
    return train_blocks, queries


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    from steerlab.influence import LanguageModelTask
    from steerlab.influence.data import lm_batch
    from steerlab.models import load_model

    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    train_blocks, queries = build_inputs(tokenizer, args.n_blocks, args.block_size)
    train = [
        lm_batch(train_blocks[i : i + args.batch_size]) for i in range(0, len(train_blocks), args.batch_size)
    ]
    task = LanguageModelTask(layers=list(range(args.first_layer, args.first_layer + args.n_layers)))
    times: dict[str, float] = {}
    if args.worker == "steerlab":
        from steerlab.influence import (
            eigendecompose,
            fit_covariance,
            fit_lambda,
            pairwise_scores,
            preconditioned_queries,
            query_gradients,
        )
        from steerlab.influence.factors import finish_lambda
        from steerlab.influence.pass_cache import cached_batch

        t0 = time.perf_counter()
        cache: dict = {}  # hidden states entering layer 24, recorded by the covariance pass
        dt = {"float32": None, "bfloat16": torch.bfloat16}[args.capture_dtype]
        cov = fit_covariance(
            model, task, train, seed=None, dtype=dt, cache=cache if args.prefix_cache else None
        )
        fast = [cached_batch(b, cache, i) for i, b in enumerate(train)]
        t1 = time.perf_counter()
        peaks = {"covariance": peak_rss_gb()}
        eigen = eigendecompose(cov, list(task.modules(model)))
        del cov
        t2 = time.perf_counter()
        peaks["eigen"] = peak_rss_gb()
        factors = finish_lambda(eigen, fit_lambda(model, task, fast, eigen, seed=None, dtype=dt))
        t3 = time.perf_counter()
        peaks["lambda"] = peak_rss_gb()
        pre = preconditioned_queries(
            query_gradients(model, task, queries, dtype=dt, factored=True),
            factors,
            "ekfac",
            args.damping,
            consume=True,
        )
        del factors, eigen  # scoring needs only the preconditioned queries (the pipeline frees them too)
        scores = pairwise_scores(model, task, fast, pre, dtype=dt)["scores"]
        t4 = time.perf_counter()
        peaks["score"] = peak_rss_gb()
        print(f"steerlab peak RSS (GB) after each stage: {peaks}", file=sys.stderr)
        times = {"covariance": t1 - t0, "eigen": t2 - t1, "lambda": t3 - t2, "fit": t3 - t0, "score": t4 - t3}
    else:
        from steerlab.influence.kronfluence_compat import kronfluence_pairwise_scores

        with tempfile.TemporaryDirectory() as tmp:
            scores = kronfluence_pairwise_scores(
                model,
                list(task.modules(model)),
                train,
                queries,
                damping=args.damping,
                output_dir=tmp,
                dtype=torch.float32,
                train_batch_size=args.batch_size,
                stage_times=times,
            )
    peak_gb = peak_rss_gb()
    save_file({"scores": scores.double().contiguous()}, str(Path(args.out) / f"{args.worker}.safetensors"))
    (Path(args.out) / f"{args.worker}.json").write_text(json.dumps({**times, "peak_rss_gb": peak_gb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-blocks", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--first-layer", type=int, default=24)
    parser.add_argument("--n-layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--libs", default="steerlab,kronfluence")
    parser.add_argument(
        "--capture-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="steerlab's stored activations/gradients (bfloat16: mixed precision, float32 sums)",
    )
    parser.add_argument(
        "--prefix-cache", type=int, default=1, help="start later passes at layer 24 (1) or not (0)"
    )
    parser.add_argument("--kronfluence-from", default=None, help="reuse a kronfluence worker's --out folder")
    parser.add_argument("--keep", default=None, help="keep each worker's scores in KEEP/<library>-<repeat>/")
    parser.add_argument("--worker", choices=["steerlab", "kronfluence"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from safetensors.torch import load_file
    from scipy.stats import spearmanr

    libs = args.libs.split(",")
    runs: dict[str, list[dict]] = {lib: [] for lib in libs}
    scores = {}
    passthrough = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k
        in (
            "n_blocks",
            "block_size",
            "first_layer",
            "n_layers",
            "batch_size",
            "damping",
            "threads",
            "prefix_cache",
            "capture_dtype",
        )
    ]
    for rep in range(args.repeats):
        for lib in libs:
            if lib == "kronfluence" and args.kronfluence_from:
                out = args.kronfluence_from
                runs[lib].append(json.loads((Path(out) / f"{lib}.json").read_text()))
                scores[lib] = load_file(str(Path(out) / f"{lib}.safetensors"))["scores"]
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(args.keep) / f"{lib}-{rep}" if args.keep else Path(tmp)
                out.mkdir(parents=True, exist_ok=True)
                cmd = [sys.executable, __file__, "--worker", lib, "--out", str(out), *passthrough]
                subprocess.run(cmd, check=True)
                runs[lib].append(json.loads((out / f"{lib}.json").read_text()))
                scores[lib] = load_file(str(out / f"{lib}.safetensors"))["scores"]
            print(f"repeat {rep} {lib}: {runs[lib][-1]}", file=sys.stderr, flush=True)

    def med(lib, key):
        return statistics.median(r[key] for r in runs[lib])

    result = {
        "repeats": args.repeats,
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
    }
    for lib in libs:
        result[lib] = {k: round(med(lib, k), 3) for k in runs[lib][0]}
    n_copied = sum(i < args.n_blocks for i in COPIED)
    for lib in libs:
        result[lib]["copied_query_rank1"] = [
            int(scores[lib][q].argmax()) == COPIED[q] for q in range(n_copied)
        ]
    if set(libs) == {"steerlab", "kronfluence"}:
        ours = scores["steerlab"]
        theirs = scores["kronfluence"]
        rhos = [float(spearmanr(ours[q], theirs[q]).statistic) for q in range(len(ours))]
        result.update(
            {
                "spearman_vs_kronfluence_min": round(min(rhos), 5),
                "spearman_vs_kronfluence": [round(r, 5) for r in rhos],
                "relative_error_vs_kronfluence": float((ours - theirs).norm() / theirs.norm()),
                "fit_speedup_vs_kronfluence": round(med("kronfluence", "fit") / med("steerlab", "fit"), 3),
                "score_speedup_vs_kronfluence": round(
                    med("kronfluence", "score") / med("steerlab", "score"), 3
                ),
                "peak_mem_ratio_vs_kronfluence": round(
                    med("steerlab", "peak_rss_gb") / med("kronfluence", "peak_rss_gb"), 3
                ),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
