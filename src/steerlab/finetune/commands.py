"""`steerlab compare` as a library function over its argument dataclass; inputs are checked before the
model loads (the layer range right after). Each finished layer is written to `layerL-rows.json`, and a
rerun into the same folder with the same settings resumes after the last finished layer."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from steerlab.data import ABDataset, PairedTexts, PromptSet, load_builtin, load_prompts
from steerlab.data.sources import data_root, load_dataset, load_word_lists
from steerlab.errors import UserError
from steerlab.evaluate import prepare_ab, prepare_neutral
from steerlab.evaluate.capability import load_benchmark, parse_benchmarks
from steerlab.finetune.compare import (
    compare_layer,
    measure_baseline,
    refusal_metric,
    split_like_demo,
    target_replies,
)
from steerlab.finetune.train import LOSSES, TARGETS, Replies, TrainConfig, check_data
from steerlab.hooks import Positions
from steerlab.io import check_output_folder, write_json
from steerlab.models import LoadedModel
from steerlab.models.architectures import num_layers
from steerlab.options import ModelArgs, check_at_least, check_choice, option, parse_layers
from steerlab.steering import caa_items
from steerlab.steering.metrics import behaviour_metric

AB_TEST_FRACTION = 0.2
"""Without --test-data, A/B items are cut (seeded) into 80% training and 20% held-out test items."""
ORGANISM_SPLITS = ("harmful_train", "harmless_train", "harmful_test", "harmless_test")


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
    test_limit: int | None = field(
        default=None, metadata=option("at most this many A/B test items (--organism: prompts per side)")
    )
    organism: str | None = field(
        default=None,
        metadata=option(
            "a target model (e.g. smollm2-135m-refusal) whose greedy replies to --organism-data's train "
            "prompts are the training data (loss: reply); metric: P(refusal start) on its harmful test "
            "prompts, control: the same on harmless ones; replaces --pairs/--prompts/--words"
        ),
    )
    organism_data: str = field(
        default="redteam/refusal_direction",
        metadata=option(
            "folder of harmful_train/harmless_train/harmful_test/harmless_test JSON (relative: under the "
            "data folder, $STEERLAB_DATA)"
        ),
    )
    reply_tokens: int = field(default=24, metadata=option("--organism: tokens of each greedy reply"))
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
        check_at_least(self.reply_tokens, 1, "--reply-tokens")
        if self.organism is not None and self.data is not None:
            raise UserError("--organism and --data: give one behaviour")
        if self.organism is not None and self.loss not in ("auto", "reply"):
            raise UserError(f"--loss {self.loss}: a target model's replies train with --loss reply")
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


def _organism_prompts(args: CompareArgs) -> dict[str, list[str]]:
    """The four prompt splits of --organism-data (train: --train-limit per side, test: --test-limit)."""
    folder = Path(args.organism_data).expanduser()
    folder = folder if folder.is_absolute() else data_root() / folder
    prompts = {}
    for split in ORGANISM_SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            raise UserError(f"--organism-data {folder}: no {split}.json (set STEERLAB_DATA or give a folder)")
        limit = args.train_limit if split.endswith("train") else args.test_limit
        prompts[split] = load_prompts(path).prompts[:limit]
    return prompts


def _organism_replies(args: CompareArgs, lm: LoadedModel, prompts: dict, out: Path) -> Replies:
    """The target model's and the base model's replies to the train prompts, cached in `out` under the
    target's source (an organism's folder names its recipe hash), so a rebuilt target is answered anew."""
    from steerlab.models import load_model

    train = prompts["harmful_train"] + prompts["harmless_train"]
    target = load_model(args.organism, device=str(lm.device))
    name = Path(target.info.source).name or args.organism
    path = out / "replies.json"
    key = {"target": target.info.source, "model": lm.info.name, "tokens": args.reply_tokens, "prompts": train}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return Replies(train, saved["replies"], saved["base_replies"], name)
    replies = replace(target_replies(lm, target, train, args.reply_tokens, progress=args.progress), name=name)
    write_json(path, {"key": key, "replies": replies.replies, "base_replies": replies.base_replies})
    return replies


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
    if args.organism is not None:
        organism_prompts = _organism_prompts(args)
        loss = "reply"
    else:
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
    if args.organism is not None:
        train = _organism_replies(args, lm, organism_prompts, out)
        test = organism_prompts["harmful_test"]
        behaviour = f"{train.name}: P(refusal start) on {len(test)} harmful prompts"
        metric = refusal_metric(test, organism_prompts["harmless_test"])
    else:
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


DISTILL_METHODS = ("vectors", "lowrank", "lora", "actadd")


def load_user_prompts(spec: str, option: str = "--prompts") -> dict[str, list[str]]:
    """`builtin:distill-prompts` or a JSON object with "train" and "test" lists of user prompts."""
    from steerlab.io import read_json

    if spec.startswith("builtin:"):
        try:
            data = load_builtin(spec[len("builtin:") :])
        except KeyError as error:
            raise UserError(f"{option}: {error.args[0]}") from None
    else:
        if not os.path.isfile(spec):
            raise UserError(f"{option}: no such file {spec}")
        data = read_json(spec)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("train", "test")):
        raise UserError(f'{option}: expected a JSON object with "train" and "test" lists of user prompts')
    for key in ("train", "test"):
        if not data[key] or not all(isinstance(p, str) and p.strip() for p in data[key]):
            raise UserError(f'{option}: "{key}" must be a non-empty list of non-empty strings')
    return {"train": list(data["train"]), "test": list(data["test"])}


@dataclass(kw_only=True)
class DistillArgs(ModelArgs):
    """Distil a system prompt into an injection; compare methods on held-out user prompts."""

    system_prompt: str = field(metadata=option("system prompt: a text file or builtin:NAME", required=True))
    out: str | os.PathLike = field(metadata=option("output folder"))
    layers: str | list[int] = field(default="15", metadata=option("injection layers, e.g. 15 or 6,12,18,24"))
    methods: str | list[str] = field(
        default="vectors,actadd,lora",
        metadata=option(f"comma-separated, from {', '.join(DISTILL_METHODS)} (actadd after vectors)"),
    )
    rank: int = field(default=4, metadata=option("rank of lowrank and LoRA"))
    steps: int = field(default=60, metadata=option("Adam steps of each trained method"))
    lr: float = field(default=5e-2, metadata=option("Adam learning rate of the injections"))
    lora_lr: float = field(default=1e-2, metadata=option("Adam learning rate of LoRA"))
    batch_size: int = field(default=8, metadata=option("user prompts per step"))
    reply_tokens: int = field(default=24, metadata=option("teacher reply tokens per prompt (KL positions)"))
    prompts: str = field(
        default="builtin:distill-prompts", metadata=option('JSON {"train": [...], "test": [...]}')
    )
    generations: int = field(default=4, metadata=option("test prompts shown side by side in the report"))
    seed: int = field(default=0, metadata=option("seed of the batches and initialisations"))

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            self.layers = parse_layers(self.layers) or []
        if not self.layers:
            raise UserError("--layers: give at least one layer")
        if isinstance(self.methods, str):
            self.methods = [m.strip() for m in self.methods.split(",") if m.strip()]
        if not self.methods:
            raise UserError("--methods: give at least one method")
        for method in self.methods:
            check_choice(method, DISTILL_METHODS, "--methods")
        check_at_least(self.rank, 1, "--rank")
        check_at_least(self.steps, 1, "--steps")
        check_at_least(self.batch_size, 1, "--batch-size")
        check_at_least(self.reply_tokens, 1, "--reply-tokens")
        check_at_least(self.generations, 0, "--generations")
        for name, value in (("--lr", self.lr), ("--lora-lr", self.lora_lr)):
            if not value > 0:
                raise UserError(f"{name}: must be positive, got {value}")

    def configs(self) -> list:
        """One DistillConfig per method, in the given order."""
        from steerlab.finetune.distill import DistillConfig

        return [
            DistillConfig(
                method=m,
                layers=tuple(self.layers),
                rank=self.rank,
                steps=self.steps,
                lr=self.lora_lr if m == "lora" else self.lr,
                batch_size=self.batch_size,
                seed=self.seed,
            )
            for m in self.methods
        ]


def run_distill(args: DistillArgs, lm: LoadedModel | None = None) -> dict:
    """Write the distilled injections, rows.json, summary.json and report.html into `args.out`."""
    from steerlab.finetune.distill import (
        check_prompts,
        compare_methods,
        read_system_prompt,
        side_by_side,
        teacher_targets,
        tokens_saved,
    )
    from steerlab.finetune.distill_report import write_distill_report

    out = check_output_folder(args.out, "--out")
    system_prompt = read_system_prompt(args.system_prompt)
    prompts = load_user_prompts(args.prompts)
    configs = args.configs()
    started = time.perf_counter()
    lm = lm or args.load()
    for config in configs:
        config.check(num_layers(lm.model))
    check_prompts(lm, system_prompt, prompts["train"] + prompts["test"], args.reply_tokens)
    out.mkdir(parents=True, exist_ok=True)
    train = teacher_targets(lm, system_prompt, prompts["train"], args.reply_tokens, args.progress)
    test = teacher_targets(lm, system_prompt, prompts["test"], args.reply_tokens, args.progress)
    rows, results = compare_methods(lm, system_prompt, train, test, configs, args.progress, out)
    shown = prompts["test"][: args.generations]
    generations = side_by_side(lm, system_prompt, shown, results) if shown else []
    summary = {
        "title": f"Distilling a system prompt into an injection on {lm.info.name}",
        "model": lm.info.name,
        "system_prompt": args.system_prompt,
        "system_prompt_text": system_prompt,
        "tokens_saved_per_call": tokens_saved(lm, system_prompt, prompts["test"]),
        "layers": list(args.layers),
        "methods": list(args.methods),
        "rank": args.rank,
        "steps": args.steps,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "batch_size": args.batch_size,
        "reply_tokens": args.reply_tokens,
        "seed": args.seed,
        "n_train": len(train),
        "n_test": len(test),
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "rows.json", rows)
    write_json(out / "generations.json", generations)
    write_json(out / "summary.json", summary)
    write_distill_report(out, rows, summary, generations)
    return {**summary, "rows": rows}


@dataclass(kw_only=True)
class PairSearchArgs(ModelArgs):
    """Search a pool of contrast pairs (greedy subset, gradient-guided token edits) for a stronger steering
    vector than the hand-written pairs', on the demo's splits; effect per norm against pair length."""

    out: str | os.PathLike = field(metadata=option("output folder (a rerun with the same settings resumes)"))
    layer: int = field(default=20, metadata=option("layer the vectors are read at and added after"))
    fraction: float = field(default=0.1, metadata=option("injected norm as a fraction of the residual norm"))
    max_pairs: int = field(default=5, metadata=option("most pairs the greedy selection keeps"))
    steps: int = field(default=8, metadata=option("token-search steps"))
    top_k: int = field(default=16, metadata=option("token-search substitutions per position (by gradient)"))
    candidates: int = field(default=24, metadata=option("token-search swaps scored per step"))
    seed: int = field(default=0, metadata=option("seed of the splits and the token search"))
    pool: str = field(default="builtin:sentiment-pool", metadata=option("candidate pairs to search"))
    lengths: str = field(
        default="builtin:sentiment-lengths",
        metadata=option("pairs by length, JSON {LENGTH: {positive, negative}}; 'none' to skip"),
    )
    positions: str = field(default="all", metadata=option("where vectors are added: all, from:K, at:I,J"))
    pairs: str = field(default="builtin:sentiment", metadata=option("hand-written pairs (training split)"))
    prompts: str = field(default="builtin:sentiment-prompts", metadata=option("prompts (validation/test)"))
    words: str = field(default="builtin:sentiment-words", metadata=option("word lists of the metric"))

    def __post_init__(self) -> None:
        for value, name in (
            (self.max_pairs, "--max-pairs"),
            (self.steps, "--steps"),
            (self.top_k, "--top-k"),
            (self.candidates, "--candidates"),
        ):
            check_at_least(value, 1, name)
        check_at_least(self.layer, 0, "--layer")
        if not self.fraction > 0:
            raise UserError(f"--fraction: must be positive, got {self.fraction}")
        Positions.parse(self.positions)


def load_lengths(spec: str, option: str = "--lengths") -> dict[int, PairedTexts] | None:
    """Pairs by length from `builtin:NAME` or a JSON file; None for 'none'."""
    from steerlab.data.builtin import load_length_pairs
    from steerlab.data.errors import check_file

    if spec.lower() == "none":
        return None
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name != "sentiment-lengths":
            raise UserError(
                f"{option}: {spec} holds no pairs by length; use builtin:sentiment-lengths or a file"
            )
        return load_builtin(name)
    path = check_file(spec, option)
    return load_length_pairs(path, path.stem)


def run_pair_search(args: PairSearchArgs, lm: LoadedModel | None = None) -> dict:
    """Write result (safetensors + JSON), summary.json, report.md/html and the plots into `args.out`;
    checkpoints in `args.out`/checkpoints let a rerun resume."""
    from steerlab.finetune.pair_search import SearchConfig, run_search
    from steerlab.finetune.pair_search_report import write_report

    out = check_output_folder(args.out, "--out")
    pairs = load_dataset(args.pairs, (PairedTexts,), "--pairs", "pair-search")
    pool = load_dataset(args.pool, (PairedTexts,), "--pool", "pair-search")
    prompts = load_dataset(args.prompts, (PromptSet,), "--prompts", "pair-search")
    words = load_word_lists(args.words, "--words")
    lengths = load_lengths(args.lengths)
    pairs_train, prompts_val, prompts_test = split_like_demo(pairs, prompts, args.seed)
    if not len(pairs_train) or not len(prompts_val) or not len(prompts_test):
        raise UserError(
            f"--pairs/--prompts: too few items to split ({len(pairs)} pairs, {len(prompts)} prompts)"
        )
    config = SearchConfig(
        args.layer, args.fraction, args.max_pairs, args.steps, args.top_k, args.candidates, args.seed
    )
    config.check()
    started = time.perf_counter()
    lm = lm or args.load()
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    neutral = prepare_neutral(lm, load_builtin("neutral-text"))
    result = run_search(
        lm, pairs_train, pool, prompts_val, prompts_test, words, config, neutral=neutral, lengths=lengths,
        checkpoints=out / "checkpoints", positions=Positions.parse(args.positions), progress=args.progress,
    )  # fmt: skip
    result.save(out / "result")
    summary = {
        "model": lm.info.name,
        "layer": args.layer,
        "fraction": args.fraction,
        **result.test,
        "found_pairs": result.greedy["pairs"],
        "token_search": {
            "start": result.gcg["start"],
            "found": [result.gcg["positive"], result.gcg["negative"]],
        },
        "n_pairs_handwritten": len(pairs_train),
        "n_pool": len(pool),
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "summary.json", summary)
    write_report(out, result)
    return {**summary, "candidates": result.candidates, "lengths": result.lengths}
