"""`steerlab compare` as a library function over its argument dataclass; inputs are checked before the
model loads (the layer range right after). Each finished layer is written to `layerL-rows.json`, and a
rerun into the same folder with the same settings resumes after the last finished layer."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from steerlab.data import ABDataset, PairedTexts, PromptSet, load_builtin
from steerlab.data.sources import load_dataset, load_word_lists
from steerlab.errors import UserError
from steerlab.evaluate import prepare_ab, prepare_neutral
from steerlab.evaluate.capability import load_benchmark, parse_benchmarks
from steerlab.finetune.compare import compare_layer, measure_baseline, split_like_demo
from steerlab.finetune.train import LOSSES, TARGETS, TrainConfig, check_data
from steerlab.hooks import Positions
from steerlab.io import check_output_folder, write_json
from steerlab.models import LoadedModel
from steerlab.models.architectures import num_layers
from steerlab.options import ModelArgs, check_at_least, check_choice, option, parse_layers
from steerlab.steering import caa_items
from steerlab.steering.metrics import behaviour_metric

AB_TEST_FRACTION = 0.2
"""Without --test-data, A/B items are cut (seeded) into 80% training and 20% held-out test items."""


@dataclass(kw_only=True)
class CompareArgs(ModelArgs):
    """Steering vs a trained bias vector vs LoRA at each of `layers`, on the demo's splits."""

    out: str | os.PathLike = field(metadata=option("output folder"))
    layers: str | list[int] = field(default="15", metadata=option("layers, e.g. 15 or 9,15,21"))
    steps: int = field(default=50, metadata=option("Adam steps of each trained method"))
    lr: float = field(default=1e-2, metadata=option("Adam learning rate"))
    batch_size: int = field(default=4, metadata=option("training items (pairs or A/B items) per step"))
    rank: int = field(default=4, metadata=option("LoRA rank"))
    target: str = field(default="both", metadata=option("LoRA on attention, MLP or both", choices=TARGETS))
    loss: str = field(
        default="auto",
        metadata=option(
            "positive: NLL of positive texts; contrast: minus that of negatives; ab: -log p(matching letter) "
            "of A/B items; auto: ab for A/B items, else positive",
            choices=("auto", *LOSSES),
        ),
    )
    caa_fraction: float = field(default=0.1, metadata=option("CAA multiplier as a fraction of residual norm"))
    positions: str = field(default="all", metadata=option("where vectors are added: all, from:K, at:I,J"))
    seed: int = field(default=0, metadata=option("seed of the splits, batches and LoRA init"))
    pairs: str = field(default="builtin:sentiment", metadata=option("paired texts (training)"))
    prompts: str = field(default="builtin:sentiment-prompts", metadata=option("prompts (split; test half)"))
    words: str = field(default="builtin:sentiment-words", metadata=option("word lists of the metric"))
    data: str | None = field(
        default=None,
        metadata=option(
            "A/B items (caa:BEHAVIOUR or a file) to train on and score p(matching) on held-out items; "
            "replaces --pairs/--prompts/--words"
        ),
    )
    test_data: str | None = field(
        default=None, metadata=option("A/B test items (default: a held-out 20%% of --data)")
    )
    train_limit: int | None = field(default=None, metadata=option("at most this many A/B training items"))
    test_limit: int | None = field(default=None, metadata=option("at most this many A/B test items"))
    repeats: int = field(default=1, metadata=option("train each method with seeds seed, seed+1, ..."))
    capability: str | None = field(
        default=None, metadata=option("capability A/B items scored under each method: mmlu or a file")
    )
    capability_limit: int = field(default=50, metadata=option("capability items (seeded subset)"))
    full_mlp: bool = field(
        default=False, metadata=option("also fine-tune all of block L's MLP (upper bound)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers) or []
        if not self.layers:
            raise UserError("--layers: give at least one layer")
        check_at_least(self.steps, 1, "--steps")
        check_at_least(self.rank, 1, "--rank")
        check_at_least(self.batch_size, 1, "--batch-size")
        if not self.lr > 0:
            raise UserError(f"--lr: must be positive, got {self.lr}")
        check_choice(self.target, TARGETS, "--target")
        check_choice(self.loss, ("auto", *LOSSES), "--loss")
        check_at_least(self.repeats, 1, "--repeats")
        check_at_least(self.train_limit, 1, "--train-limit")
        check_at_least(self.test_limit, 1, "--test-limit")
        check_at_least(self.capability_limit, 1, "--capability-limit")
        if self.test_data is not None and self.data is None:
            raise UserError("--test-data: give the training items with --data")
        if self.capability is not None:
            parse_benchmarks(self.capability)
        Positions.parse(self.positions)


def _load_data(args: CompareArgs) -> tuple[PairedTexts | ABDataset, PromptSet | ABDataset, dict, str]:
    """(training data, test items, word lists or {}, behaviour description), checked before a model loads."""
    if args.data is None:
        pairs = load_dataset(args.pairs, (PairedTexts,), "--pairs", "compare")
        prompts = load_dataset(args.prompts, (PromptSet,), "--prompts", "compare")
        words = load_word_lists(args.words, "--words")
        pairs_train, _, prompts_test = split_like_demo(pairs, prompts, args.seed)
        if not len(pairs_train) or not len(prompts_test):
            raise UserError(
                f"--pairs/--prompts: too few items to split ({len(pairs)} pairs, {len(prompts)} prompts)"
            )
        return pairs_train, prompts_test, words, f"{pairs.name}: p(positive next word) on {prompts.name}"
    data = load_dataset(args.data, (ABDataset, PairedTexts), "--data", "compare")
    if isinstance(data, PairedTexts):
        raise UserError("--data: paired texts go to --pairs (with --prompts and --words for the metric)")
    if args.test_data is not None:
        train, test = data, load_dataset(args.test_data, (ABDataset,), "--test-data", "compare")
    else:
        train, test = data.split([1 - AB_TEST_FRACTION, AB_TEST_FRACTION], seed=args.seed)
    train, test = train[: args.train_limit], test[: args.test_limit]
    if not len(train) or not len(test):
        raise UserError(f"--data: too few A/B items to split ({len(data)} items)")
    train = caa_items(train, seed=args.seed)
    return train, test, {}, f"{data.name}: p(matching answer) on {test.name or 'held-out items'}"


def _resumed(path: Path, config: dict) -> list[dict] | None:
    """The rows of a layer finished by an earlier run with the same `config`, else None."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved["rows"] if saved.get("config") == config else None


def run_compare(args: CompareArgs, lm: LoadedModel | None = None) -> dict:
    """Write the comparison (rows.json, report.md/html, figures, trained results) into `args.out`."""
    from steerlab.finetune.report import write_report

    out = check_output_folder(args.out, "--out")
    train, test, words, behaviour = _load_data(args)
    loss = args.loss if args.loss != "auto" else ("ab" if isinstance(train, ABDataset) else "positive")
    check_data(train, loss)
    capability_set = (
        load_benchmark(args.capability, limit=args.capability_limit, seed=args.seed)
        if args.capability is not None
        else None
    )
    started = time.perf_counter()
    lm = lm or args.load()
    n = num_layers(lm.model)
    for layer in args.layers:
        if not 0 <= layer < n:
            raise UserError(f"--layers: layer {layer} is out of range; the model has layers 0..{n - 1}")
    out.mkdir(parents=True, exist_ok=True)
    metric = behaviour_metric(lm, test, words or None)
    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    capability_items = prepare_ab(lm, capability_set) if capability_set is not None else None
    baseline = measure_baseline(lm, metric, neutral, capability_items)
    positions = Positions.parse(args.positions)
    seeds = [args.seed + i for i in range(args.repeats)]
    rows = []
    for layer in args.layers:
        config = TrainConfig(layer, args.steps, args.lr, args.batch_size, args.seed, loss)
        settings = {
            **vars(config), "rank": args.rank, "target": args.target, "seeds": seeds, "model": lm.info.name,
            "caa_fraction": args.caa_fraction, "positions": args.positions, "behaviour": behaviour,
            "n_train": len(train), "n_test": len(test), "capability": args.capability,
            "capability_limit": args.capability_limit, "full_mlp": args.full_mlp,
        }  # fmt: skip
        done = out / f"layer{layer}-rows.json"
        layer_rows = _resumed(done, settings)
        if layer_rows is None:
            layer_rows, results = compare_layer(
                lm, train, metric, neutral, config, rank=args.rank, target=args.target,
                caa_fraction=args.caa_fraction, positions=positions, progress=args.progress, seeds=seeds,
                capability_items=capability_items, baseline=baseline, full_mlp=args.full_mlp,
            )  # fmt: skip
            for name, result in results.items():
                result.save(out / f"layer{layer}-{name}")
            write_json(done, {"config": settings, "rows": layer_rows})
        rows += layer_rows
    summary = {
        "title": f"Steering vs trained interventions on {lm.info.name}",
        "behaviour": behaviour,
        "model": lm.info.name,
        "layers": list(args.layers),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": loss,
        "rank": args.rank,
        "target": args.target,
        "seed": args.seed,
        "seeds": seeds,
        "n_pairs_train": len(train),
        "n_prompts_test": len(test),
        "capability": args.capability,
        "capability_limit": args.capability_limit if args.capability else None,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "rows.json", rows)
    write_json(out / "summary.json", summary)
    write_report(out, rows, summary)
    return {**summary, "rows": rows}
