"""GPU benchmark on randomly initialised Llama-family models: no network, no model files.

Per model size (default: the shapes of Llama 3.2 1B and Llama 3.1 8B, bfloat16, built on the device):
- steered / plain generation tokens/s at batch 1 and 32 (`steerlab.hooks.steer` at every position,
  greedy, fixed length, KV cache);
- CAA-style extraction (`mean_activations` over ReadSpecs of random token ids, one read position per
  sequence) / a bare forward pass to the read layer over the same batches;
- EK-FAC fit and score (`fit_factors`, `preconditioned_queries` + `pairwise_scores`) on the MLPs of the
  last layers, each / one forward+backward pass of the training loss over the same batches (the fit makes
  two passes plus the eigendecompositions; 8B is left out: its 14336-wide covariances' float64
  eigendecompositions alone would take most of the time budget);
- Hessian-vector products (`CurvatureOperator`) on the MLP parameters of the last layers / a gradient
  over the same batches.

`--pipeline`, run under `torchrun --nproc_per_node 1` (nccl on a GPU, gloo on a CPU): the streaming
influence pipeline (`pipeline.fit`, `pipeline.score`) / the in-memory fit and scores on the same data.
`--merge FILE...`: one JSON object made of the last JSON line of each file.
Repetitions are interleaved (baseline, measured, baseline, ...); medians are reported. Sections that
would start after `--budget-s` seconds are skipped (listed under "skipped", their figures null).
The last line printed is one JSON object; `benchmarks/gpu.sh` runs both parts and merges them.

    benchmarks/gpu.sh                        # on a GPU machine, about 6 minutes
    benchmarks/gpu.sh --tiny --device cpu    # a 4-layer, 64-wide model: seconds, what the tests run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from steerlab.options import DTYPES

# Llama 3.2 1B and Llama 3.1 8B shapes; "tiny" is for CPU tests.
SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}
SECTIONS = ("generation", "extraction", "ekfac", "hvp")
SKIP_SECTIONS = {"8b": ("ekfac",)}
PIPELINE_SIZE = {"tiny": "tiny", "gpu": "1b"}


@dataclass(frozen=True)
class Workload:
    """How much work each measurement does (sequence counts and lengths, repetitions)."""

    reps: int
    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    extract_seqs: int
    extract_len: int
    extract_batch: int
    train_seqs: int
    train_len: int
    train_batch: int
    queries: int
    influence_layers: int
    influence_reps: int
    hvp_seqs: int
    hvp_len: int
    hvp_layers: int


TINY = Workload(
    reps=3,
    prompt_len=12,
    new_tokens=8,
    batches=(1, 32),
    extract_seqs=32,
    extract_len=24,
    extract_batch=8,
    train_seqs=16,
    train_len=24,
    train_batch=4,
    queries=4,
    influence_layers=2,
    influence_reps=2,
    hvp_seqs=4,
    hvp_len=16,
    hvp_layers=2,
)
GPU = Workload(
    reps=3,
    prompt_len=64,
    new_tokens=64,
    batches=(1, 32),
    extract_seqs=256,
    extract_len=256,
    extract_batch=32,
    train_seqs=64,
    train_len=256,
    train_batch=8,
    queries=8,
    influence_layers=2,
    influence_reps=2,
    hvp_seqs=4,
    hvp_len=128,
    hvp_layers=1,
)


# ------------------------------------------------------------------------------------------ helpers


def build_model(size: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Llama of the given size, created directly on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        **SIZES[size], max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, with the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    base: Callable[[], object], other: Callable[[], object], reps: int, device: torch.device, warmup: bool
) -> tuple[list[float], list[float]]:
    """Seconds of `base` and `other`, alternating, `reps` times each (after one untimed call each)."""
    if warmup:
        base()
        other()
    times_base, times_other = [], []
    for _ in range(reps):
        times_base.append(clock(base, device))
        times_other.append(clock(other, device))
    return times_base, times_other


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def random_ids(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def lm_batches(ids: torch.Tensor, batch_size: int, device: torch.device, prompt_len: int = 1) -> list[dict]:
    """`LanguageModelTask` batches: loss on every next token from `prompt_len` on."""
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size].to(device)
        labels = chunk.clone()
        labels[:, :prompt_len] = -100
        out.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": labels})
    return out


# ------------------------------------------------------------------------------------- measurements


def generation(model, w: Workload, device: torch.device) -> dict[str, float]:
    """Plain and steered greedy generation tokens/s at each batch size, and their ratio."""
    from steerlab.hooks import steer
    from steerlab.models import hidden_size, num_layers

    layer = num_layers(model) // 2
    vector = torch.randn(hidden_size(model), generator=torch.Generator().manual_seed(5))
    vector = vector / vector.norm()
    out: dict[str, float] = {}
    for batch in w.batches:
        ids = random_ids(batch, w.prompt_len, model.config.vocab_size, seed=batch).to(device)
        kwargs = dict(
            attention_mask=torch.ones_like(ids),
            max_new_tokens=w.new_tokens,
            min_new_tokens=w.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

        def plain(ids=ids, kwargs=kwargs):
            with torch.no_grad():
                model.generate(ids, **kwargs)

        def steered(ids=ids, kwargs=kwargs):
            with torch.no_grad(), steer(model, {layer: vector}, multiplier=0.5):
                model.generate(ids, **kwargs)

        t_plain, t_steered = interleaved(plain, steered, w.reps, device, warmup=True)
        tokens = batch * w.new_tokens
        out[f"plain_tokens_per_s_b{batch}"] = statistics.median(tokens / t for t in t_plain)
        out[f"steered_tokens_per_s_b{batch}"] = statistics.median(tokens / t for t in t_steered)
        out[f"steered_over_plain_b{batch}"] = median_ratio(t_plain, t_steered)
    return out


def extraction(model, w: Workload, device: torch.device) -> dict[str, float]:
    """Mean-activation extraction at the middle layer / a bare forward pass to it, same batches."""
    from steerlab.data.batching import ReadSpec, batches_by_length, pad_batch
    from steerlab.hooks import run_to_layers
    from steerlab.models import LoadedModel, ModelInfo, hidden_size, num_layers
    from steerlab.steering.extract import mean_activations

    layer = num_layers(model) // 2
    g = torch.Generator().manual_seed(7)
    lengths = torch.randint(w.extract_len // 2, w.extract_len + 1, (w.extract_seqs,), generator=g).tolist()
    specs = [
        ReadSpec(ids=random_ids(1, n, model.config.vocab_size, seed=100 + i)[0].tolist(), positions=[n - 1])
        for i, n in enumerate(lengths)
    ]
    info = ModelInfo(
        name="random-llama",
        source="config",
        file_sha256=None,
        model_type="llama",
        num_layers=num_layers(model),
        hidden_size=hidden_size(model),
    )
    lm = LoadedModel(model, SimpleNamespace(pad_token_id=0), info)

    def bare():
        with torch.no_grad():
            for group in batches_by_length(lengths, w.extract_batch):
                ids, mask = pad_batch([specs[i].ids for i in group], 0, device)
                run_to_layers(
                    model, [layer], lambda _layer, _hidden: None, input_ids=ids, attention_mask=mask
                )

    def extract():
        mean_activations(lm, specs, [layer], batch_size=w.extract_batch, progress=False)

    t_bare, t_extract = interleaved(bare, extract, w.reps, device, warmup=True)
    return {
        "extraction_tokens_per_s": statistics.median(sum(lengths) / t for t in t_extract),
        "extraction_over_forward": median_ratio(t_extract, t_bare),
    }


def ekfac(model, w: Workload, device: torch.device) -> dict[str, float]:
    """EK-FAC fit and scoring on the last layers' MLPs / one forward+backward pass of the training loss."""
    from steerlab.influence import (
        LanguageModelTask,
        fit_factors,
        pairwise_scores,
        preconditioned_queries,
        query_gradients,
    )
    from steerlab.models import num_layers

    n = num_layers(model)
    task = LanguageModelTask(layers=list(range(n - w.influence_layers, n)))
    vocab = model.config.vocab_size
    train = lm_batches(random_ids(w.train_seqs, w.train_len, vocab, seed=11), w.train_batch, device)
    half = w.train_len // 2
    queries = lm_batches(random_ids(w.queries, w.train_len, vocab, seed=12), w.queries, device, half)
    tokens = w.train_seqs * (w.train_len - 1)

    def train_pass():
        for batch in train:
            task.train_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    state: dict = {}

    def fit():
        state["factors"] = fit_factors(model, task, train, seed=0)

    def score():
        pre = preconditioned_queries(query_gradients(model, task, queries), state["factors"], "ekfac")
        pairwise_scores(model, task, train, pre)

    train_pass()  # warm-up, also of the eigensolver below
    torch.linalg.eigh(torch.eye(8, dtype=torch.float64, device=device))
    t_pass, t_fit = interleaved(train_pass, fit, w.influence_reps, device, warmup=False)
    t_pass2, t_score = interleaved(train_pass, score, w.influence_reps, device, warmup=False)
    del state["factors"]
    return {
        "ekfac_fit_tokens_per_s": statistics.median(tokens / t for t in t_fit),
        "ekfac_fit_over_train_pass": median_ratio(t_fit, t_pass),
        "ekfac_score_tokens_per_s": statistics.median(tokens / t for t in t_score),
        "ekfac_score_over_train_pass": median_ratio(t_score, t_pass2),
    }


def hvp(model, w: Workload, device: torch.device) -> dict[str, float]:
    """Hessian-vector products on the last layers' MLP parameters / a gradient over the same batches."""
    from steerlab.hessian import CurvatureOperator, lm_task, select_params
    from steerlab.models import mlp, num_layers

    n = num_layers(model)
    params = select_params(model, modules=[mlp(model, i) for i in range(n - w.hvp_layers, n)])
    ids = random_ids(w.hvp_seqs, w.hvp_len, model.config.vocab_size, seed=13).to(device)
    op = CurvatureOperator(
        model, lm_task(), [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], params
    )
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    t_grad, t_hvp = interleaved(op.gradient, lambda: op.matvec(v), w.reps, device, warmup=True)
    return {
        "hvp_per_s": statistics.median(1 / t for t in t_hvp),
        "hvp_over_gradient": median_ratio(t_hvp, t_grad),
        "hvp_dim_millions": op.dim / 1e6,
    }


MEASUREMENTS: dict[str, Callable[[torch.nn.Module, Workload, torch.device], dict[str, float]]] = {
    "generation": generation,
    "extraction": extraction,
    "ekfac": ekfac,
    "hvp": hvp,
}
KEYS = {
    "generation": [
        f"{kind}_b{b}"
        for b in (1, 32)
        for kind in ("plain_tokens_per_s", "steered_tokens_per_s", "steered_over_plain")
    ],
    "extraction": ["extraction_tokens_per_s", "extraction_over_forward"],
    "ekfac": [
        "ekfac_fit_tokens_per_s",
        "ekfac_fit_over_train_pass",
        "ekfac_score_tokens_per_s",
        "ekfac_score_over_train_pass",
    ],
    "hvp": ["hvp_per_s", "hvp_over_gradient", "hvp_dim_millions"],
}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_sizes(
    sizes: list[str], w: Workload, device: torch.device, dtype: torch.dtype, budget_s: float
) -> dict:
    """Every measurement on every size; a section that would start after `budget_s` is skipped."""
    start = time.perf_counter()
    results: dict = {}
    skipped: list[str] = []
    for size in sizes:
        model = build_model(size, device, dtype)
        results[f"{size}_params_billions"] = sum(p.numel() for p in model.parameters()) / 1e9
        for section in SECTIONS:
            if section in SKIP_SECTIONS.get(size, ()):
                continue
            if time.perf_counter() - start > budget_s:
                skipped.append(f"{size}_{section}")
                results.update({f"{size}_{key}": None for key in KEYS[section]})
                continue
            figures = MEASUREMENTS[section](model, w, device)
            results.update({f"{size}_{key}": value for key, value in figures.items()})
            print(f"{size} {section}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()), flush=True)
            free(device)
        del model
        free(device)
    results["skipped"] = skipped
    results["wall_s"] = time.perf_counter() - start
    return results


# ----------------------------------------------------------------------------------------- pipeline


def pipeline(size: str, w: Workload, device: torch.device, dtype: torch.dtype) -> dict:
    """The streaming pipeline's fit and score / the in-memory fit and scores, under torchrun."""
    import torch.distributed as dist

    from steerlab.influence import (
        LanguageModelTask,
        fit_factors,
        pairwise_scores,
        preconditioned_queries,
        query_gradients,
    )
    from steerlab.influence import pipeline as streaming

    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and not dist.is_initialized():  # steerlab.distributed.init skips a world of one
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    distributed = dist.is_initialized()
    if distributed:
        check = torch.ones(1, device=device)
        dist.all_reduce(check)
        assert float(check) == dist.get_world_size()
    model = build_model(size, device, dtype)
    n = model.config.num_hidden_layers
    task = LanguageModelTask(layers=[n - 1])
    blocks = random_ids(w.train_seqs, w.train_len, model.config.vocab_size, seed=21)
    train = streaming.BlockBatches(blocks, w.train_batch)
    in_memory = lm_batches(blocks, w.train_batch, device)
    half = w.train_len // 2
    queries = lm_batches(
        random_ids(w.queries, w.train_len, model.config.vocab_size, seed=22), w.queries, device, half
    )
    tokens = w.train_seqs * (w.train_len - 1)
    for batch in in_memory[:1]:  # warm-up
        task.train_loss(model, batch).backward()
    torch.linalg.eigh(torch.eye(8, dtype=torch.float64, device=device))
    model.zero_grad(set_to_none=True)

    run = Path(tempfile.mkdtemp(prefix="steerlab-gpu-bench-"))
    try:
        fitted: dict = {}
        t_fit_mem = clock(lambda: fitted.update(factors=fit_factors(model, task, in_memory, seed=0)), device)
        t_fit = clock(lambda: streaming.fit(run, model, task, train, seed=0), device)
        factors = fitted["factors"]

        def score_in_memory():
            pre = preconditioned_queries(query_gradients(model, task, queries), factors, "ekfac")
            pairwise_scores(model, task, in_memory, pre)

        t_score_mem = clock(score_in_memory, device)
        t_score = clock(lambda: streaming.score(run, model, task, train, queries, top_k=5), device)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    world = dist.get_world_size() if distributed else 1
    if distributed:
        dist.destroy_process_group()
    return {
        "pipeline_backend": backend if distributed else "none",
        "pipeline_world_size": world,
        "pipeline_size": size,
        "pipeline_fit_tokens_per_s": tokens / t_fit,
        "pipeline_fit_over_in_memory": t_fit / t_fit_mem,
        "pipeline_score_tokens_per_s": tokens / t_score,
        "pipeline_score_over_in_memory": t_score / t_score_mem,
    }


# -------------------------------------------------------------------------------------------- output


def finite_or_none(results: dict) -> dict:
    """Non-finite numbers become null, so the line stays valid JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in results.items()}


def last_json(path: str) -> dict:
    """The last line of `path` that is a JSON object."""
    for line in reversed(Path(path).read_text().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON line found")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model and workload (CPU, seconds)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 (tiny: float32)"
    )
    parser.add_argument("--sizes", default=None, help="comma-separated among tiny, 1b, 8b (default: 1b,8b)")
    parser.add_argument(
        "--budget-s", type=float, default=240.0, help="start no section after this many seconds"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pipeline", action="store_true", help="the influence pipeline step (torchrun)")
    parser.add_argument("--merge", nargs="+", metavar="FILE", help="merge the last JSON line of each file")
    args = parser.parse_args(argv)
    if args.merge:
        merged: dict = {}
        for path in args.merge:
            merged.update(last_json(path))
        print(json.dumps(merged))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.tiny else torch.bfloat16)
    workload = TINY if args.tiny else GPU
    if args.pipeline:
        results = pipeline(PIPELINE_SIZE["tiny" if args.tiny else "gpu"], workload, device, dtype)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(finite_or_none(results)))
        return
    sizes = (args.sizes or ("tiny" if args.tiny else "1b,8b")).split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"--sizes: unknown {unknown}; use among {', '.join(SIZES)}")
    header = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "sizes": sizes}
    if device.type == "cuda":
        header["gpu"] = torch.cuda.get_device_name(device)
    results = run_sizes(sizes, workload, device, dtype, args.budget_s)
    print(json.dumps(finite_or_none({**header, **results})))


if __name__ == "__main__":
    main()
