"""Steering overhead on the embedded model, against baselines measured in the same run.

- steered / plain generation throughput (tokens/s) at batch 1 and 8 (KV cache, greedy, fixed length);
- hook time per decode step / forward time per decode step, from the profiler;
- CAA extraction time / a bare forward pass up to the read layer over the same batches; pairs/s.

Repetitions are interleaved (plain, steered, plain, steered, ...) so drift hits both alike; medians
with the interquartile range are printed. The last line is one JSON object.

    .venv/bin/python benchmarks/steering.py [--reps 5] [--new-tokens 32] [--pairs 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import steerlab
from steerlab.data import load_builtin, load_caa_json
from steerlab.data.batching import batches_by_length, pad_batch
from steerlab.hooks import Positions, run_to_layers
from steerlab.steering import extract_caa
from steerlab.steering.extract import ab_read_specs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LAYER = 13


def median_iqr(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), q[0], q[2]


def fmt(name: str, values: list[float], unit: str = "") -> str:
    med, lo, hi = median_iqr(values)
    return f"{name:<44} median {med:10.4f}{unit}  IQR [{lo:.4f}, {hi:.4f}]  n={len(values)}"


def fixed_length(lm, new_tokens: int) -> dict:
    """generate() arguments for exactly `new_tokens` greedy tokens."""
    return dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )


def generation_tokens_per_s(
    lm, batch: int, new_tokens: int, vector, reps: int
) -> tuple[list[float], list[float]]:
    prompts = load_builtin("sentiment-prompts").prompts[:batch]
    ids, mask = pad_batch(
        [lm.tokenizer(p).input_ids for p in prompts], lm.tokenizer.pad_token_id, lm.device, left=True
    )
    kwargs = dict(attention_mask=mask, **fixed_length(lm, new_tokens))
    m = vector.multiplier_for_fraction(LAYER, 0.1)
    lm.model.generate(ids, **kwargs)  # warm-up
    plain, steered = [], []
    for _ in range(reps):
        start = time.perf_counter()
        lm.model.generate(ids, **kwargs)
        plain.append(batch * new_tokens / (time.perf_counter() - start))
        with vector.apply(lm, layer=LAYER, multiplier=m, positions=Positions.all()):
            start = time.perf_counter()
            lm.model.generate(ids, **kwargs)
            steered.append(batch * new_tokens / (time.perf_counter() - start))
    return plain, steered


def hook_share(lm, vector, new_tokens: int, reps: int) -> list[float]:
    """Profiled CPU time inside steerlab's hooks / total time per decode step, batch 1."""
    from torch.profiler import ProfilerActivity, profile, record_function

    ids = torch.tensor([lm.tokenizer("The weather this weekend was").input_ids])
    kwargs = fixed_length(lm, new_tokens)
    m = vector.multiplier_for_fraction(LAYER, 0.1)
    shares = []
    for _ in range(reps):
        with vector.apply(lm, layer=LAYER, multiplier=m):
            for registry in (lm.model._forward_pre_hooks, *(b._forward_hooks for b in lm.model.model.layers)):
                for key, fn in list(registry.items()):

                    def timed(*args, _fn=fn, **kw):
                        with record_function("steerlab_hook"):
                            return _fn(*args, **kw)

                    registry[key] = timed
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                lm.model.generate(ids, **kwargs)
                total_us = (time.perf_counter() - start) * 1e6
        hook_us = sum(e.cpu_time_total for e in prof.events() if e.name == "steerlab_hook")
        shares.append(hook_us / total_us)
    return shares


def extraction_vs_forward(lm, pairs: int, reps: int) -> tuple[list[float], list[float]]:
    path = SHARED / "caa" / "sycophancy" / "generate.json"
    dataset = load_caa_json(path)[:pairs] if path.exists() else load_builtin("sentiment-ab")[:pairs]
    dataset = dataset.balance_letters()
    positive, negative = ab_read_specs(lm, dataset, None)
    sequences = [s.ids for s in positive] + [s.ids for s in negative]

    def bare_forward():
        with torch.no_grad():
            for group in batches_by_length([len(s) for s in sequences], 8):
                ids, mask = pad_batch([sequences[i] for i in group], lm.tokenizer.pad_token_id, lm.device)
                run_to_layers(lm.model, [LAYER], lambda layer, h: None, input_ids=ids, attention_mask=mask)

    bare_forward()  # warm-up
    ratios, rates = [], []
    for _ in range(reps):
        start = time.perf_counter()
        bare_forward()
        bare = time.perf_counter() - start
        start = time.perf_counter()
        extract_caa(lm, dataset, [LAYER], progress=False)
        full = time.perf_counter() - start
        ratios.append(full / bare)
        rates.append(len(dataset) / full)
    return ratios, rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = steerlab.load_model()
    vector = steerlab.steering.extract_mean_difference(lm, load_builtin("sentiment"), [LAYER], progress=False)
    results = {}
    for batch in (1, 8):
        plain, steered = generation_tokens_per_s(lm, batch, args.new_tokens, vector, args.reps)
        ratios = [s / p for s, p in zip(steered, plain)]
        print(fmt(f"plain generation, batch {batch} (tokens/s)", plain))
        print(fmt(f"steered generation, batch {batch} (tokens/s)", steered))
        print(fmt(f"steered / plain, batch {batch}", ratios))
        results[f"steered_over_plain_b{batch}"] = statistics.median(ratios)
    shares = hook_share(lm, vector, args.new_tokens, args.reps)
    print(fmt("hook time / decode time (profiled)", shares))
    results["hook_share"] = statistics.median(shares)
    ratios, rates = extraction_vs_forward(lm, args.pairs, args.reps)
    print(fmt(f"CAA extraction / bare forward to layer {LAYER}", ratios))
    print(fmt("CAA extraction pairs/s", rates))
    results["extraction_over_forward"] = statistics.median(ratios)
    results["pairs_per_s"] = statistics.median(rates)
    results.update(
        reps=args.reps, new_tokens=args.new_tokens, pairs=args.pairs, threads=torch.get_num_threads()
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
