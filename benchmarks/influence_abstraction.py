"""Literal or abstract? The top-influence training sequences of SmolLM2-135M-Instruct and Gemma-3-270M
(base) against random ones, on the same queries and the same corpus passages (Grosse et al., 2023,
section 5.3).

Configuration (small, CPU): EK-FAC on the MLP Linear modules of the last `--n-layers` decoder layers,
empirical Fisher (data labels: the pass cache then skips the output head after the covariance pass),
default damping (0.1 x mean eigenvalue per module). Corpus: `--blocks` passages of `--words` consecutive
words taken at evenly spaced places of WikiText-2 valid, the same text for both models, each tokenised by
its model's tokenizer (its BOS included where the tokenizer adds one) and cut at `--max-tokens` tokens.
Queries: QUERIES below (prompt + completion written for this benchmark on topics of WikiText-2 valid; the
last three are paraphrases that avoid the corpus's words). Per query, its top-k training passages by
influence score and k random others are compared with the query text (prompt + completion) on word
TF-IDF cosine, longest common word n-gram and all-MiniLM-L6-v2 cosine
(`steerlab.influence.abstraction.abstraction_profile`). Per model: mean over queries of top - random,
bootstrap 95% CI over queries; between models: the paired (same queries) difference Gemma - SmolLM2 with
a bootstrap CI. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus" / "wikitext-2" / "valid.txt"
MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}
MEASURES = {"tfidf": "tfidf", "ngram": "ngram", "semantic": "embedding"}

QUERIES = [
    (
        "The tropical storm strengthened over warm waters and",
        " made landfall as a hurricane, flooding the coast.",
    ),
    (
        "The highway begins at an interchange with the interstate and",
        " runs north through several towns to a state route.",
    ),
    ("The battleship was armed with four guns in two turrets and", " served in the fleet during the war."),
    ("The European lobster is a crustacean that", " lives on rocky sea floors and is caught in pots."),
    ("The mushroom has a small cap and", " grows in clusters on decaying wood in forests."),
    ("The band released the song as a single, and", " it reached the top ten of the charts."),
    ("In the video game, the player controls a hedgehog who", " runs through levels collecting rings."),
    ("The basketball team finished the season with", " a winning record and reached the tournament."),
    ("The rowing crews of Oxford and Cambridge", " raced each other on the River Thames."),
    # paraphrases: the same topics, few of the corpus's words
    ("A violent whirlwind from the ocean slammed into the shore;", " gusts tore off roofs and rivers burst."),
    ("Troops charged the enemy hill at dawn; after hours of fierce fighting", " the defenders withdrew."),
    ("That tune climbed to the summit of the hit parade", " and sold millions of copies."),
]


def passages(path: Path, n: int, n_words: int) -> list[str]:
    """`n` passages of `n_words` consecutive words, evenly spaced over the file (headings dropped)."""
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    body = [ln for ln in lines if ln and not re.fullmatch(r"=.*=", ln)]
    tokens = " ".join(body).split()
    chunks = [" ".join(tokens[i : i + n_words]) for i in range(0, len(tokens) - n_words + 1, n_words)]
    if len(chunks) < n:
        raise SystemExit(f"--corpus {path}: only {len(chunks)} passages of {n_words} words, {n} asked")
    step = len(chunks) / n
    return [chunks[int(i * step)] for i in range(n)]


def run_model(key: str, texts: list[str], args) -> dict:
    """Influence top-k of every query for one model, and its abstraction profile."""
    from steerlab.evaluate.soft.embeddings import sentence_embeddings
    from steerlab.influence import (
        LanguageModelTask,
        eigendecompose,
        fit_covariance,
        fit_lambda,
        pairwise_scores,
        preconditioned_queries,
        query_gradients,
    )
    from steerlab.influence.abstraction import abstraction_profile
    from steerlab.influence.data import lm_batch, query_batch
    from steerlab.influence.factors import finish_lambda
    from steerlab.influence.pass_cache import cached_batch
    from steerlab.models import load_model, num_layers

    t0 = time.perf_counter()
    loaded = load_model(MODELS[key])
    model, tok = loaded.model.float().eval(), loaded.tokenizer
    ids = [tok(t)["input_ids"][: args.max_tokens] for t in texts]
    # what the model was scored on, less its BOS (kept special tokens: Gemma reads WikiText's "<unk>" as one)
    bos = tok.bos_token_id
    train_texts = [tok.decode(x[1:] if x and x[0] == bos else x) for x in ids]
    cut = sum(len(tok(t)["input_ids"]) > args.max_tokens for t in texts)
    n_layers = num_layers(model)
    layers = list(range(n_layers - args.n_layers, n_layers))
    task = LanguageModelTask(layers=layers)
    train = [lm_batch(ids[i : i + args.batch_size]) for i in range(0, len(ids), args.batch_size)]
    prompts = [tok(p)["input_ids"] for p, _ in QUERIES]
    completions = [tok(c, add_special_tokens=False)["input_ids"] for _, c in QUERIES]
    queries = [query_batch(prompts, completions)]
    cache: dict = {}
    cov = fit_covariance(model, task, train, seed=None, cache=cache)
    fast = [cached_batch(b, cache, i) for i, b in enumerate(train)]
    eigen = eigendecompose(cov, list(task.modules(model)))
    factors = finish_lambda(eigen, fit_lambda(model, task, fast, eigen, seed=None))
    t_fit = time.perf_counter() - t0
    pre = preconditioned_queries(query_gradients(model, task, queries, factored=True), factors, "ekfac")
    scores = pairwise_scores(model, task, fast, pre)["scores"]  # [Q, N]
    t_score = time.perf_counter() - t0 - t_fit
    top = scores.topk(args.top_k, dim=1).indices
    query_texts = [p + c for p, c in QUERIES]
    profile = abstraction_profile(query_texts, train_texts, top, embed=sentence_embeddings, seed=args.seed)
    for q, text in enumerate(query_texts):
        print(f"[{key}] query {q}: {text!r}", file=sys.stderr)
        print(
            f"    top-1 (score {scores[q, top[q, 0]]:.3g}): {train_texts[int(top[q, 0])][:150]!r}",
            file=sys.stderr,
        )
    print(
        f"[{key}] layers {layers[0]}-{layers[-1]} of {n_layers}, {len(ids)} passages "
        f"({cut} cut at {args.max_tokens} tokens, mean {np.mean([len(x) for x in ids]):.1f} tokens), "
        f"fit {t_fit:.0f} s, score {t_score:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return {
        "layers": layers,
        "n_layers_model": n_layers,
        "passages_cut": cut,
        "mean_tokens": float(np.mean([len(x) for x in ids])),
        "fit_s": t_fit,
        "score_s": t_score,
        "top_index": top.tolist(),
        **{
            name: {
                "gain": profile[m]["top_minus_random"],
                "ci": profile[m]["ci"],
                "top_mean": float(profile[m]["top"].mean()),
                "random_mean": float(profile[m]["random"].mean()),
                "per_query": (profile[m]["top"].mean(1) - profile[m]["random"].mean(1)).tolist(),
            }
            for name, m in MEASURES.items()
        },
    }


def bootstrap_ci(x: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=3, help="last N decoder layers' MLPs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--out", type=Path, default=None, help="write the full results here (JSON)")
    args = parser.parse_args()
    if not args.corpus.is_file():
        print(f"skipped: corpus {args.corpus} not found (--corpus PATH)", file=sys.stderr)
        print(json.dumps({"skipped": f"no corpus at {args.corpus}"}))
        return
    torch.set_num_threads(args.threads)
    texts = passages(args.corpus, args.blocks, args.words)
    results = {}
    for key in args.models.split(","):
        results[key] = run_model(key, texts, args)
        if args.out:
            args.out.write_text(json.dumps({"config": vars(args), **results}, default=str))
    summary: dict = {}
    for key, res in results.items():
        for name in MEASURES:
            summary[f"{key}_{name}_gain"] = round(res[name]["gain"], 4)
            summary[f"{key}_{name}_ci"] = [round(v, 4) for v in res[name]["ci"]]
    if len(results) == 2:
        a, b = (results[k] for k in ("smollm2", "gemma3"))
        for name in MEASURES:
            diff = np.array(b[name]["per_query"]) - np.array(a[name]["per_query"])
            summary[f"gemma3_minus_smollm2_{name}"] = round(float(diff.mean()), 4)
            summary[f"gemma3_minus_smollm2_{name}_ci"] = [round(v, 4) for v in bootstrap_ci(diff, args.seed)]
        summary["top_k_overlap"] = float(
            np.mean([len(set(x) & set(y)) / args.top_k for x, y in zip(a["top_index"], b["top_index"])])
        )
    if args.out:
        args.out.write_text(json.dumps({"config": vars(args), **results, "summary": summary}, default=str))
    print(
        json.dumps({**summary, "n_queries": len(QUERIES), "corpus_blocks": args.blocks, "top_k": args.top_k})
    )


if __name__ == "__main__":
    main()
