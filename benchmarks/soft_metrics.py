"""Soft metrics and capability side effects, against baselines measured in the same run.

- BERTScore (P/R/F1, layers 6 and 3, with and without idf) against the reference package bert-score 0.3.13
  on identical inputs and encoder (the embedded all-MiniLM-L6-v2): max |difference| with bert-score scoring
  one pair per batch, and at its default batch size (whose zero-padded similarity matrix lifts a token's
  negative best cosine to 0); the time ratio bert-score / ours with each side's model loaded once
  (bert_score.BERTScorer, default batch size), interleaved repetitions;
- sentence embeddings: texts/s batched, and the ratio against one text per forward pass (same pooling);
- base-model (embedded SmolLM2-135M-Instruct) accuracy on CAA's MMLU and TruthfulQA A/B subsets, with
  bootstrap 95% CIs, chance (0.5) and the "always (A)" control; the ActAdd essays' perplexity.

Inputs are real: sentences of the ActAdd wedding and shipping essays paired line by line, and the ActAdd
prompts paired with the next prompt. The last line is one JSON object.

    .venv/bin/python benchmarks/soft_metrics.py [--reps 3] [--capability-limit N] [--parts bertscore,...]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

import steerlab
from steerlab.evaluate.capability import evaluate_capability, load_benchmark
from steerlab.evaluate.soft import bert_score, passage_perplexity, sentence_embeddings
from steerlab.models.encoders import load_encoder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def sentences(path: Path) -> list[str]:
    text = path.read_text()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if len(s.split()) >= 4]


def pairs() -> tuple[list[str], list[str]]:
    wedding = sentences(SHARED / "actadd" / "chatgpt_wedding_essay_20230423.txt")
    shipping = sentences(SHARED / "actadd" / "chatgpt_shipping_essay_20230423.txt")
    n = min(len(wedding), len(shipping))
    prompts = [p for p in (SHARED / "actadd" / "prompts.txt").read_text().splitlines() if p.strip()]
    return wedding[:n] + prompts[:-1], shipping[:n] + prompts[1:]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


PARTS = ("bertscore", "embeddings", "capability")


def bench_bertscore(encoder, cands: list[str], refs: list[str], reps: int) -> dict:
    import bert_score as reference

    diffs, batched_diffs, affected = {}, {}, 0
    for layer in (6, 3):
        for idf in (False, True):
            ours = bert_score(cands, refs, encoder, layer=layer, idf=idf)
            common = dict(model_type=encoder.source, num_layers=layer, idf=idf, nthreads=0)
            for size, store in ((1, diffs), (64, batched_diffs)):
                P, R, F = reference.score(cands, refs, batch_size=size, **common)
                gaps = torch.stack(
                    [
                        (mine - theirs.double()).abs()
                        for mine, theirs in ((ours.precision, P), (ours.recall, R), (ours.f1, F))
                    ]
                ).amax(0)
                store[f"layer{layer}_idf{int(idf)}"] = float(gaps.max())
                if size == 64:
                    affected = max(affected, int((gaps > 1e-5).sum()))
            print(
                f"BERTScore layer {layer} idf {idf!s:<5}: max |ours - bert-score| = {diffs[f'layer{layer}_idf{int(idf)}']:.2e} "
                f"(bert-score batch 1), {batched_diffs[f'layer{layer}_idf{int(idf)}']:.2e} (its default batch 64)"
            )
    print(
        f"bert-score's batched matching pads with zero similarities, so a token whose best real cosine is "
        f"negative scores 0 there: {affected} of {len(cands)} pairs differ by > 1e-5 at its default batch size"
    )

    scorer = reference.BERTScorer(model_type=encoder.source, num_layers=6, nthreads=0)
    ours_t, theirs_t = [], []
    for _ in range(reps):
        ours_t.append(timed(lambda: bert_score(cands, refs, encoder, layer=6))[0])
        theirs_t.append(timed(lambda: scorer.score(cands, refs))[0])
    ratio = statistics.median(theirs_t) / statistics.median(ours_t)
    print(
        f"BERTScore time: ours {statistics.median(ours_t):.3f} s, bert-score {statistics.median(theirs_t):.3f} s "
        f"(median of {reps}); bert-score / ours = {ratio:.2f}"
    )
    return {
        "bertscore_max_abs_diff": max(diffs.values()),
        "bertscore_max_abs_diff_batched_reference": max(batched_diffs.values()),
        "bertscore_pairs_affected_by_reference_padding": affected,
        "bertscore_speed_ratio": round(ratio, 3),
        "bertscore_pairs": len(cands),
    }


def bench_embeddings(encoder, texts: list[str], reps: int) -> dict:
    batched_t, single_t = [], []
    for _ in range(reps):
        batched_t.append(timed(lambda: sentence_embeddings(texts, encoder))[0])
        single_t.append(timed(lambda: [sentence_embeddings([t], encoder) for t in texts])[0])
    emb_ratio = statistics.median(single_t) / statistics.median(batched_t)
    per_s = len(texts) / statistics.median(batched_t)
    print(f"sentence embeddings: {per_s:.0f} texts/s batched; one-at-a-time / batched time = {emb_ratio:.2f}")
    return {"embedding_texts_per_s": round(per_s, 1), "embedding_batch_speed_ratio": round(emb_ratio, 3)}


def bench_capability(limit: int | None) -> dict:
    lm = steerlab.load_model()
    result: dict = {}
    for name in ("mmlu", "truthfulqa"):
        local = SHARED / "caa" / ("mmlu/mmlu.json" if name == "mmlu" else "truthfulqa/truthful_qa.json")
        dataset = load_benchmark(local if local.is_file() else name, limit)
        start = time.perf_counter()
        cap = evaluate_capability(lm, dataset, batch_size=16)
        seconds = time.perf_counter() - start
        s = cap.summary()
        print(
            f"{name:>10}: accuracy {s['accuracy']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]  n {s['n']}  chance "
            f"{s['chance']:.2f}  always-(A) {s['always_first_accuracy']:.3f}  mean p(correct) "
            f"{s['mean_p_correct']:.3f}  ({seconds:.0f} s)"
        )
        result.update(
            {
                f"{name}_accuracy": round(s["accuracy"], 4),
                f"{name}_ci": [round(x, 4) for x in s["ci"]],
                f"{name}_n": s["n"],
                f"{name}_chance": s["chance"],
                f"{name}_always_a": round(s["always_first_accuracy"], 4),
                f"{name}_mean_p_correct": round(s["mean_p_correct"], 4),
            }
        )
    for essay in ("wedding", "shipping"):
        text = (SHARED / "actadd" / f"chatgpt_{essay}_essay_20230423.txt").read_text()
        ppl = passage_perplexity(lm, text)
        print(f"{essay} essay: perplexity {ppl.perplexity:.2f} over {ppl.n_tokens} predicted tokens")
        result[f"{essay}_essay_perplexity"] = round(ppl.perplexity, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--capability-limit", type=int, default=None, help="items per benchmark (default all)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result: dict = {}
    if "bertscore" in parts or "embeddings" in parts:
        encoder = load_encoder()
        cands, refs = pairs()
        print(f"{len(cands)} candidate/reference pairs; encoder {encoder.name} ({encoder.source})")
        if "bertscore" in parts:
            result.update(bench_bertscore(encoder, cands, refs, args.reps))
        if "embeddings" in parts:
            result.update(bench_embeddings(encoder, cands + refs, args.reps))
    if "capability" in parts:
        result.update(bench_capability(args.capability_limit))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
