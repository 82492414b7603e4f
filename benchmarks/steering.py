"""Steering speed on the embedded model, against baselines measured in the same run.

- the demo's sweep (steering.demo.DemoConfig: layers x signed fractions x steering/random, word
  preference on the validation prompts and perplexity/KL on the neutral text) with the prefix reused,
  against the naive loop that runs every setting from scratch (identical results: the largest absolute
  difference of any score, KL or relative perplexity is printed) and against its floor: one bare forward
  pass up to each swept layer plus, per setting, one bare pass of the blocks above it and the head, over
  the same forward calls (model forwards only, no metric arithmetic);
- steered / plain generation throughput (tokens/s) at batch 1 and 8 (KV cache, greedy, fixed length);
- hook time per decode step / forward time per decode step, from the profiler;
- CAA extraction time / a bare forward pass up to the read layer over the same batches; pairs/s;
- the cosine of steerlab's pca-diff / pca-center vectors with repeng 0.4's on the same texts (if installed).

Repetitions are interleaved (plain, steered, plain, steered, ...) so drift hits both alike; medians
with the interquartile range are printed. The last line is one JSON object.

    .venv/bin/python benchmarks/steering.py [--reps 5] [--new-tokens 32] [--pairs 64] [--sweep-reps 1]
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
from steerlab.data.sources import load_word_lists
from steerlab.evaluate import prepare_neutral, side_effects
from steerlab.hooks import Positions, StopForward, read_residual, resume_after_block, run_to_layers
from steerlab.steering import extract_caa, extract_mean_difference, extract_pca_center, extract_pca_diff
from steerlab.steering.demo import DemoConfig
from steerlab.steering.extract import ab_read_specs
from steerlab.steering.metrics import behaviour_metric
from steerlab.steering.sweep import Grid, PrefixCache, sweep

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


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def sweep_floor(lm, metric, neutral, counts: dict[int, int], reps: int) -> tuple[float, dict[int, tuple]]:
    """The floor of a sweep with `counts[layer]` settings per layer: a bare pass up to each layer plus
    `counts[layer]` bare passes of the blocks above it, over the forward calls the metric and the
    side-effect measure make (recorded once); medians of `reps` timings. Returns the total and, per
    layer, (prefix seconds, seconds of one pass above the layer)."""
    model = lm.model
    cache = PrefixCache(lm, list(counts))  # the output of each layer, for every forward call
    with torch.no_grad():
        recorder = cache.recording()
        metric(recorder)
        side_effects(recorder, neutral)

    def to_layer(layer: int) -> None:
        with read_residual(model, [layer], lambda *_: None, stop_after_last=True):
            for args, kwargs in cache.calls:
                try:
                    model(*args, **kwargs)
                except StopForward:
                    pass

    def above(layer: int) -> None:
        with resume_after_block(model, layer, cache.outputs[layer]):
            for args, kwargs in cache.calls:
                model(*args, **kwargs)

    total, per_layer = 0.0, {}
    with torch.no_grad():
        for layer, count in counts.items():
            prefix = statistics.median(timed(to_layer, layer) for _ in range(reps))
            suffix = statistics.median(timed(above, layer) for _ in range(reps))
            per_layer[layer] = (prefix, suffix)
            total += prefix + count * suffix
    return total, per_layer


def max_abs_diff(fast: list[dict], naive: list[dict]) -> dict[str, float]:
    """Largest |difference| of per-item scores, KL and relative perplexity between matching rows."""
    out = {"score": 0.0, "kl": 0.0, "perplexity_rel": 0.0}
    for a, b in zip(fast, naive, strict=True):
        assert (a["vector"], a["layer"], a["fraction"]) == (b["vector"], b["layer"], b["fraction"])
        out["score"] = max(out["score"], float((a["item_scores"] - b["item_scores"]).abs().max()))
        out["kl"] = max(out["kl"], abs(a["kl"] - b["kl"]))
        out["perplexity_rel"] = max(out["perplexity_rel"], abs(a["perplexity"] / b["perplexity"] - 1))
    return out


def demo_sweep(lm, reps: int, layers: list[int] | None) -> dict:
    """The demo's validation sweep, prefix reused vs naive, and the floor measured in the same run."""
    config = DemoConfig()
    layers = layers or list(config.layers)
    words = load_word_lists("builtin:sentiment-words", "words")
    pairs_train, _ = load_builtin("sentiment").split([0.75, 0.25], seed=config.seed)
    prompts_val, _ = load_builtin("sentiment-prompts").split([0.5, 0.5], seed=config.seed)
    vector = extract_mean_difference(lm, pairs_train, layers, read="last", progress=False)
    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    metric = behaviour_metric(lm, prompts_val, words)
    grid = Grid(layers, config.fractions)
    kwargs = dict(
        positions=Positions.parse(config.positions), neutral=neutral, seed=config.seed, progress=False
    )
    fast_s, naive_s = [], []
    for _ in range(reps):  # interleaved
        start = time.perf_counter()
        naive = sweep(lm, vector, metric, grid, reuse_prefix=False, **kwargs)
        naive_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        fast = sweep(lm, vector, metric, grid, **kwargs)
        fast_s.append(time.perf_counter() - start)
    counts = {layer: sum(r["layer"] == layer and r["vector"] != "none" for r in fast) for layer in layers}
    floor, per_layer = sweep_floor(lm, metric, neutral, counts, reps=3)
    for layer, (prefix, suffix) in per_layer.items():
        print(
            f"  layer {layer:2d}: bare pass to it {prefix:.3f}s, above it {suffix:.3f}s ({counts[layer]} settings)"
        )
    diff = max_abs_diff(fast, naive)
    print(fmt("naive sweep (s)", naive_s))
    print(fmt("sweep, prefix reused (s)", fast_s))
    print(f"{'floor (s)':<44} {floor:10.4f}")
    print(f"max |diff| fast vs naive: {diff}")
    fast_m, naive_m = statistics.median(fast_s), statistics.median(naive_s)
    return {
        "sweep_s": fast_m,
        "naive_sweep_s": naive_m,
        "sweep_floor_s": floor,
        "sweep_speedup": naive_m / fast_m,
        "sweep_over_floor": fast_m / floor,
        "naive_over_floor": naive_m / floor,
        "sweep_max_abs_diff": diff["score"],
        "sweep_max_abs_diff_kl": diff["kl"],
        "sweep_max_rel_diff_perplexity": diff["perplexity_rel"],
        "sweep_settings": sum(counts.values()),
        "sweep_layers": layers,
    }


def repeng_cosines(lm, layers: list[int]) -> dict[str, float] | None:
    """min over layers of cos(steerlab's vector, repeng 0.4's) for pca_diff and pca_center on the built-in
    sentiment pairs; None when repeng is not installed."""
    import numpy as np

    np.float_ = np.float64  # repeng 0.4 annotates with NumPy 1 names
    try:
        from repeng import extract as repeng
    except ImportError:
        return None
    pairs = load_builtin("sentiment")
    entries = [repeng.DatasetEntry(p, n) for p, n in zip(pairs.positive, pairs.negative, strict=True)]
    out = {}
    for method, ours in (("pca_diff", extract_pca_diff), ("pca_center", extract_pca_center)):
        theirs = repeng.read_representations(
            lm.model, lm.tokenizer, entries, hidden_layers=layers, batch_size=8, method=method
        )
        mine = ours(lm, pairs, layers, progress=False)
        cosines = [
            float(np.dot(mine.vectors[layer].double().numpy(), theirs[layer].astype(np.float64)))
            / float(np.linalg.norm(mine.vectors[layer].double().numpy()) * np.linalg.norm(theirs[layer]))
            for layer in layers
        ]
        print(f"repeng {method}: cosine per layer {dict(zip(layers, (round(c, 6) for c in cosines)))}")
        out[method] = min(cosines)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sweep-reps", type=int, default=1, help="repetitions of the naive and fast sweeps")
    parser.add_argument("--sweep-layers", default=None, help="a subset of the demo's layers, e.g. 6,20")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = steerlab.load_model()
    sweep_layers = [int(x) for x in args.sweep_layers.split(",")] if args.sweep_layers else None
    results = demo_sweep(lm, args.sweep_reps, sweep_layers)
    cosines = repeng_cosines(lm, [6, 13, 20])
    results["repeng_cos_min"] = min(cosines.values()) if cosines else None
    vector = extract_mean_difference(lm, load_builtin("sentiment"), [LAYER], progress=False)
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
