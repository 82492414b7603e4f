"""The steering commands as library functions. One dataclass of arguments per command, shared by the
Python API, `--experiment` files and argparse (whose defaults come from these dataclasses).

Every function validates all its inputs (data, word lists, vector, output folder) before it loads the
model, so a wrong path costs nothing; errors are `UserError`s naming the option and the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from steerlab.data import ABDataset, PairedTexts, PromptSet
from steerlab.data.sources import DataRef, Dataset, load_dataset, load_texts, load_word_lists
from steerlab.errors import UserError
from steerlab.io import check_output_file
from steerlab.models import LoadedModel
from steerlab.options import ModelArgs, option

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.1
SENTIMENT_PROMPTS = "builtin:sentiment-prompts"
SENTIMENT_WORDS = "builtin:sentiment-words"
NEUTRAL_TEXT = "builtin:neutral-text"
DEFAULT_DIMS = ("first", "random", "top")
DEFAULT_DIM_FRACTIONS = (0.25, 0.5, 0.7, 1.0)
"""The dimension subsets of `sweep --dims` / `--dim-fractions` when only the other is given."""
METHODS = ("mean-diff", "pca-diff", "pca-center", "probe")
"""The extraction methods of `extract` (`--method`)."""

DataSpec = DataRef | str | os.PathLike | Dataset
Words = dict[str, list[str]] | str | os.PathLike


@dataclass(kw_only=True)
class ExtractArgs(ModelArgs):
    data: DataSpec
    layers: list[int]
    out: str | os.PathLike
    method: str = "mean-diff"
    read: str = "last"
    chat: bool = False
    system_prompt: str | None = None
    balance: bool = True
    batch_size: int = 8
    split: str | None = None
    limit: int | None = None


@dataclass(kw_only=True)
class SteerArgs(ModelArgs):
    """Where and how strongly a stored vector is applied (one layer, one strength)."""

    vector: str | os.PathLike | None = None
    layer: int | None = None
    multiplier: float | None = None
    fraction: float | None = None
    positions: str = "all"


@dataclass(kw_only=True)
class EvaluateArgs(SteerArgs):
    data: DataSpec
    words: Words | None = None
    neutral: str | os.PathLike | list[str] = NEUTRAL_TEXT
    system_prompt: str | None = None
    limit: int | None = None
    json: str | os.PathLike | None = None
    capability: str | list[str] | None = None  # "mmlu,truthfulqa" or files (steerlab.evaluate.capability)
    capability_limit: int | None = None


@dataclass(kw_only=True)
class SweepArgs(ModelArgs):
    vector: str | os.PathLike
    data: DataSpec
    layers: list[int] | None = None
    fractions: list[float] = field(default_factory=lambda: [-0.1, -0.07, -0.04, 0.04, 0.07, 0.1])
    multipliers: list[float] | None = None
    dims: list[str] | None = None
    dim_fractions: list[float] | None = None
    positions: str = "all"
    words: Words | None = None
    neutral: str | os.PathLike | list[str] = NEUTRAL_TEXT
    system_prompt: str | None = None
    limit: int | None = None
    split: str = "validation"
    seed: int = 0
    out: str | os.PathLike = "sweep.csv"


@dataclass(kw_only=True)
class GenerateArgs(SteerArgs):
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | os.PathLike | None = None
    max_new_tokens: int = 48
    chat: bool = True
    system_prompt: str | None = None


def _data_ref(data: DataSpec, split: str | None = None, limit: int | None = None) -> DataRef:
    ref = data if isinstance(data, DataRef) else DataRef(data)
    return DataRef(
        ref.source, split if split is not None else ref.split, limit if limit is not None else ref.limit
    )


def _word_lists(data: DataSpec, dataset: Dataset, words: Words | None) -> dict[str, list[str]] | None:
    """Word lists for prompt data: given, or the sentiment words for the built-in sentiment prompts only."""
    if not isinstance(dataset, PromptSet):
        if words is not None:
            log.warning("--words is ignored: the data holds A/B items, scored by p(matching answer)")
        return None
    if words is None:
        source = data.source if isinstance(data, DataRef) else data
        if source != SENTIMENT_PROMPTS:
            raise UserError(
                '--words: prompt data is scored by word preference; give a JSON file {"positive": [...], '
                f'"negative": [...]}} (only {SENTIMENT_PROMPTS} defaults to {SENTIMENT_WORDS})'
            )
        words = SENTIMENT_WORDS
    return words if isinstance(words, dict) else load_word_lists(words)


def _texts(value: str | os.PathLike | list[str], option: str) -> list[str]:
    return list(value) if isinstance(value, list) else load_texts(value, option)


def extract(args: ExtractArgs, lm: LoadedModel | None = None):
    """Extract a steering vector and save it: `method` "mean-diff" (CAA on A/B items, mean difference on
    paired texts), "pca-diff", "pca-center" or "probe"."""
    from steerlab.steering import caa_items, extract_caa, extract_mean_difference
    from steerlab.steering.extract import check_system_prompt
    from steerlab.steering.methods import extract_pca_center, extract_pca_diff, extract_probe, require_sklearn

    if args.method not in METHODS:
        raise UserError(f"--method: expected one of {', '.join(METHODS)}, got {args.method!r}")
    if args.method == "probe":
        require_sklearn()
    ref = _data_ref(args.data, args.split, args.limit)
    dataset = load_dataset(ref, (ABDataset, PairedTexts), "--data", "extraction")
    if isinstance(dataset, ABDataset):
        items = caa_items(dataset, balance=args.balance)  # refuses data that balancing would empty, now
    else:
        check_system_prompt(args.system_prompt, args.chat)
    out = check_output_file(Path(f"{args.out}.safetensors"), "--out").with_suffix("")
    log.info("extracting from %d items of %s at layers %s", len(dataset), ref.describe(), args.layers)
    lm = lm or args.load()
    common = dict(
        system_prompt=args.system_prompt,
        batch_size=args.batch_size,
        progress=args.progress,
        source=dataset.source or ref.describe(),
    )
    if args.method != "mean-diff":
        extractor = {"pca-diff": extract_pca_diff, "pca-center": extract_pca_center, "probe": extract_probe}
        data = items if isinstance(dataset, ABDataset) else dataset
        vector = extractor[args.method](
            lm, data, args.layers, read=args.read, chat=args.chat, balance=False, **common
        )
    elif isinstance(dataset, ABDataset):
        vector = extract_caa(lm, items, args.layers, balance=False, unbalanced=dataset, **common)
    else:
        vector = extract_mean_difference(lm, dataset, args.layers, read=args.read, chat=args.chat, **common)
    vector.save(out)
    return vector


def _load_vector(path):
    """`SteeringVector.load`, its errors prefixed with the option that named the file."""
    from steerlab.io import ResultFileError
    from steerlab.steering import SteeringVector

    try:
        return SteeringVector.load(path)
    except ResultFileError as error:
        raise ResultFileError(f"--vector: {error}") from None


def _vector_and_layer(args: SteerArgs):
    """The stored vector and the stored layer to steer (default: the vector's only layer), before loading."""
    vector = _load_vector(args.vector)
    if args.layer is not None:
        return vector, vector.stored_layer(args.layer)
    if len(vector.layers) != 1:
        raise UserError(f"--layer: the vector has layers {vector.layers}; choose one with --layer")
    return vector, vector.layers[0]


def _multiplier(vector, layer: int, args: SteerArgs) -> float:
    if args.multiplier is not None:
        return args.multiplier
    fraction = DEFAULT_FRACTION if args.fraction is None else args.fraction
    return vector.multiplier_for_fraction(layer, fraction)


def _capability(lm, vector, layer: int, multiplier: float, benchmarks, positions, args: EvaluateArgs) -> dict:
    """{benchmark: {"unsteered" | "-m" | "+m": CapabilityResult.summary()}}."""
    from steerlab.evaluate.capability import capability, prepare_benchmark

    out: dict = {}
    for dataset in benchmarks:
        prompts = prepare_benchmark(lm, dataset, args.system_prompt)
        for name, mult in (("unsteered", 0.0), ("-m", -multiplier), ("+m", multiplier)):
            with vector.apply(lm, layer=layer, multiplier=mult, positions=positions):
                result = capability(lm, prompts, dataset.name, progress=args.progress)
            out.setdefault(dataset.name, {})[name] = result.summary()
    return out


def evaluate(args: EvaluateArgs, lm: LoadedModel | None = None) -> dict:
    """The behaviour metric unsteered, at -m and at +m, with perplexity / KL on neutral text, and with
    `capability` the accuracy on MMLU / TruthfulQA A/B items at the same three settings.

    Returns {"layer", "multiplier", "unsteered", "-m", "+m"[, "capability"]} and writes it to `args.json`.
    """
    from steerlab.evaluate import prepare_neutral
    from steerlab.evaluate.capability import load_benchmark, parse_benchmarks
    from steerlab.hooks import Positions
    from steerlab.io import write_json
    from steerlab.steering.metrics import behaviour_metric, compare

    vector, layer = _vector_and_layer(args)
    multiplier = _multiplier(vector, layer, args)
    positions = Positions.parse(args.positions)
    ref = _data_ref(args.data, limit=args.limit)
    dataset = load_dataset(ref, (ABDataset, PromptSet), "--data", "evaluate")
    words = _word_lists(args.data, dataset, args.words)
    neutral_texts = _texts(args.neutral, "--neutral")
    benchmarks = [load_benchmark(b, args.capability_limit) for b in parse_benchmarks(args.capability)]
    json_path = check_output_file(args.json, "--json") if args.json else None
    lm = lm or args.load()
    vector.check_compatible(lm.model)
    log.info("preparing %d items of %s", len(dataset), ref.describe())
    metric = behaviour_metric(lm, dataset, words, system_prompt=args.system_prompt, progress=args.progress)
    neutral = prepare_neutral(lm, neutral_texts, progress=args.progress)
    results = compare(
        lm, vector, metric, layer, multiplier, neutral=neutral, positions=positions, progress=args.progress
    )
    out = {"layer": layer, "multiplier": multiplier, **results}
    if benchmarks:
        out["capability"] = _capability(lm, vector, layer, multiplier, benchmarks, positions, args)
    if json_path is not None:
        write_json(json_path, out)
    return out


def sweep(args: SweepArgs, lm: LoadedModel | None = None) -> list[dict]:
    """Layers x strengths (x dimension subsets) with a random-vector control; writes the tidy CSV and its
    plot (`out`, `.png`; with dimension subsets, one `<out>.<selection>-<fraction>.png` per subset)."""
    from steerlab.evaluate import prepare_neutral
    from steerlab.hooks import Positions
    from steerlab.report.figures import save_png
    from steerlab.steering import plots
    from steerlab.steering.metrics import behaviour_metric
    from steerlab.steering.sweep import FULL, Grid, write_csv
    from steerlab.steering.sweep import sweep as run_grid

    vector = _load_vector(args.vector)
    layers = [vector.stored_layer(layer) for layer in args.layers] if args.layers else vector.layers
    dims = dict(dims=args.dims or (), dim_fractions=args.dim_fractions or ())
    if args.dims and not args.dim_fractions:
        dims["dim_fractions"] = DEFAULT_DIM_FRACTIONS
    if args.dim_fractions and not args.dims:
        dims["dims"] = DEFAULT_DIMS
    if args.multipliers is not None:
        grid = Grid(layers, multipliers=args.multipliers, **dims)
    else:
        grid = Grid(layers, fractions=args.fractions, **dims)
    grid.settings(vector)  # a fraction needs the residual norm recorded at extraction
    positions = Positions.parse(args.positions)
    ref = _data_ref(args.data, limit=args.limit)
    dataset = load_dataset(ref, (ABDataset, PromptSet), "--data", "sweep")
    words = _word_lists(args.data, dataset, args.words)
    neutral_texts = _texts(args.neutral, "--neutral")
    csv_path = check_output_file(args.out, "--out")
    lm = lm or args.load()
    vector.check_compatible(lm.model)
    log.info("preparing %d items of %s", len(dataset), ref.describe())
    metric = behaviour_metric(lm, dataset, words, system_prompt=args.system_prompt)
    rows = run_grid(
        lm,
        vector,
        metric,
        grid,
        split=args.split,
        positions=positions,
        neutral=prepare_neutral(lm, neutral_texts, progress=args.progress),
        seed=args.seed,
        progress=args.progress,
    )
    write_csv(rows, csv_path)
    x = "multiplier" if args.multipliers is not None else "fraction"
    for selection, fraction in grid.dimension_options():
        shown = [
            r
            for r in rows
            if r["vector"] == "none" or (r["dims"], r["dim_fraction"]) == (selection, fraction)
        ]
        name = "" if (selection, fraction) == FULL or not args.dims else f".{selection}-{fraction:g}"
        save_png(
            plots.score_vs_fraction(shown, args.split, "score", x=x),
            csv_path.with_name(f"{csv_path.stem}{name}.png"),
        )
    return rows


def generate(args: GenerateArgs, lm: LoadedModel | None = None) -> dict:
    """Greedy generations unsteered and (with a vector) steered: {"prompts", "unsteered", "steered", ...}."""
    from steerlab.evaluate import generate as run_generation
    from steerlab.hooks import Positions

    prompts = list(args.prompts)
    if args.prompts_file:
        prompts += load_texts(args.prompts_file, "--prompts-file")
    if not prompts:
        raise UserError("--prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    positions = Positions.parse(args.positions)
    vector = layer = multiplier = None
    if args.vector:
        vector, layer = _vector_and_layer(args)
        multiplier = _multiplier(vector, layer, args)
    lm = lm or args.load()
    if vector is not None:
        vector.check_compatible(lm.model)
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        chat=args.chat,
        system_prompt=args.system_prompt,
        progress=args.progress,
    )
    log.info("generating for %d prompt(s), unsteered", len(prompts))
    out: dict = {"prompts": prompts, "unsteered": run_generation(lm, prompts, **kwargs)}
    if vector is not None:
        log.info("generating steered at layer %d, multiplier %.4g", layer, multiplier)
        with vector.apply(lm, layer=layer, multiplier=multiplier, positions=positions):
            out["steered"] = run_generation(lm, prompts, **kwargs)
        out.update(layer=layer, multiplier=multiplier)
    return out


# --- ActAdd: one prompt pair, added at the front of the prompt ---------------------------------------


@dataclass(kw_only=True)
class ActAddArgs(ModelArgs):
    """Extract (or load) an ActAdd vector and generate unsteered and steered continuations."""

    positive: str | None = field(default=None, metadata=option('positive side of the pair, e.g. " weddings"'))
    negative: str = field(default=" ", metadata=option("negative side of the pair"))
    layer: int = field(default=6, metadata=option("layer whose output receives the block"))
    coefficient: float = field(default=4.0, metadata=option("the block is multiplied by this"))
    prompt: list[str] = field(
        default_factory=list, metadata=option("a raw-text prompt (repeatable)", append=True)
    )
    prompts_file: str | None = field(default=None, metadata=option("a file of prompts, one per line"))
    max_new_tokens: int = field(default=32, metadata=option("tokens generated per prompt"))
    pad: str = field(default=" ", metadata=option("one-token text that right-pads the shorter side"))
    sink: str | None = field(
        default=None, metadata=option("position-0 token (default: BOS, else <|endoftext|>)")
    )
    truncate: bool = field(
        default=False,
        metadata=option("add only the block positions that fit a short prompt (default: error)"),
    )
    vector: str | None = field(default=None, metadata=option("a saved ActAdd vector instead of a pair"))
    out: str | None = field(
        default=None, metadata=option("save the extracted vector here (.safetensors + .json)")
    )


def actadd(args: ActAddArgs, lm: LoadedModel | None = None) -> dict:
    """Extract the ActAdd vector of a pair (or load one) and generate greedily without and with it.

    Returns {"prompts", "unsteered", "steered", "layer", "coefficient", "positions", "norm"}.
    """
    import math

    from steerlab.steering.actadd import ActAddVector, extract_actadd, generate_actadd

    if (args.vector is None) == (args.positive is None):
        raise UserError(
            "--positive: give a prompt pair (--positive, --negative) or a saved --vector, not both"
        )
    for option_name, text in (
        ("--positive", args.positive),
        ("--negative", args.negative),
        ("--pad", args.pad),
    ):
        if args.vector is None and text == "":
            raise UserError(
                f"{option_name}: empty text encodes to no token (ActAdd's neutral side is ' ', a space)"
            )
    if not math.isfinite(args.coefficient):
        raise UserError(f"--coefficient: {args.coefficient} is not a finite number")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, got {args.max_new_tokens}")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += load_texts(args.prompts_file, "--prompts-file")
    if not prompts:
        raise UserError("--prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    out = check_output_file(Path(f"{args.out}.safetensors"), "--out").with_suffix("") if args.out else None
    loaded = None
    if args.vector is not None:
        from steerlab.io import ResultFileError

        try:
            loaded = ActAddVector.load(args.vector)
        except ResultFileError as error:
            raise ResultFileError(f"--vector: {error}") from None
    lm = lm or args.load()
    if loaded is None:
        vector = extract_actadd(lm, args.positive, args.negative, args.layer, pad=args.pad, sink=args.sink)
    else:
        vector = loaded
    if out is not None:
        vector.save(out)
    sink = args.sink if args.sink is not None else (vector.metadata.get("sink") or {}).get("token")
    common = dict(max_new_tokens=args.max_new_tokens, truncate=args.truncate, sink=sink)
    log.info("generating for %d prompt(s), unsteered and steered", len(prompts))
    plain = generate_actadd(lm, prompts, None, **common)
    steered = generate_actadd(lm, prompts, vector, args.coefficient, **common)
    return {
        "prompts": prompts,
        "unsteered": plain,
        "steered": steered,
        "layer": vector.layer,
        "coefficient": args.coefficient,
        "positions": vector.positions,
        "norm": vector.norm(),
    }
