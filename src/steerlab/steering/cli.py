"""`steerlab extract|evaluate|sweep|generate|demo|vector`: argparse over `steering.commands`.

An option given on the command line wins over the `--experiment` file, which wins over the defaults of
the command's argument dataclass.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

from steerlab.errors import UserError
from steerlab.options import add_model_arguments, field_default, parse_floats, parse_layers
from steerlab.steering.commands import (
    DEFAULT_DIM_FRACTIONS,
    DEFAULT_DIMS,
    DEFAULT_FRACTION,
    METHODS,
    EvaluateArgs,
    ExtractArgs,
    GenerateArgs,
    SteerArgs,
    SweepArgs,
)
from steerlab.steering.demo import DemoConfig

__all__ = ["add_subcommands"]

# Argument field -> experiment-file key, per command (fields not listed come from the command line only).
COMMON_KEYS = {"model": "model", "device": "device", "dtype": "dtype"}
STEER_KEYS = {
    **COMMON_KEYS,
    "vector": "vector",
    "layer": "layer",
    "multiplier": "multiplier",
    "fraction": "fraction",
    "positions": "positions",
}
EXPERIMENT_KEYS = {
    ExtractArgs: {
        **COMMON_KEYS,
        "data": "contrast",
        "layers": "layers",
        "out": "vector",
        "read": "read",
        "chat": "chat",
        "system_prompt": "system_prompt",
    },
    EvaluateArgs: {**STEER_KEYS, "data": "evaluation", "words": "words", "neutral": "neutral"},
    SweepArgs: {
        **COMMON_KEYS,
        "vector": "vector",
        "data": "evaluation",
        "layers": "layers",
        "fractions": "fractions",
        "multipliers": "multipliers",
        "positions": "positions",
        "words": "words",
        "neutral": "neutral",
    },
    GenerateArgs: {**STEER_KEYS, "prompts": "prompts", "chat": "chat", "system_prompt": "system_prompt"},
    DemoConfig: {
        "model": "model",
        "layers": "layers",
        "fractions": "fractions",
        "positions": "positions",
        "pairs": "contrast",
        "prompts": "evaluation",
        "words": "words",
    },
}
# Options that replace each other: one given on the command line hides the experiment's others.
ALTERNATIVES = (("multiplier", "fraction"), ("multipliers", "fractions"))


def _experiment(ns: argparse.Namespace):
    from steerlab.data.experiment import load_experiment

    return load_experiment(ns.experiment) if ns.experiment else None


def _options(cls, ns: argparse.Namespace, experiment=None):
    """The command's argument dataclass from the parsed options, the experiment file and the defaults."""
    experiment = experiment or _experiment(ns)
    keys = EXPERIMENT_KEYS[cls]
    given = {f.name for f in fields(cls) if getattr(ns, f.name, None) is not None}
    hidden = {name for group in ALTERNATIVES if given & set(group) for name in group}
    values = {name: getattr(ns, name) for name in given}
    for name, key in keys.items():
        if name not in given and name not in hidden and experiment is not None:
            value = getattr(experiment, key)
            if value is not None:
                values[name] = value
    values["progress"] = not ns.quiet
    for spec in fields(cls):
        if spec.name not in values and spec.default is MISSING and spec.default_factory is MISSING:
            where = f" (or {keys[spec.name]!r} in the --experiment file)" if spec.name in keys else ""
            raise UserError(f"--{spec.name.replace('_', '-')}: required{where}")
    return cls(**values)


def _parse_lists(ns: argparse.Namespace) -> None:
    """Command-line strings to lists: --layers 12,16 / 24-29, --fractions / --multipliers -0.1,0.1."""
    if getattr(ns, "layers", None) is not None:
        ns.layers = parse_layers(ns.layers)
    for name in ("fractions", "multipliers", "dim_fractions"):
        if getattr(ns, name, None) is not None:
            setattr(ns, name, parse_floats(getattr(ns, name), f"--{name.replace('_', '-')}"))
    if getattr(ns, "dims", None) is not None:
        ns.dims = [name.strip() for name in ns.dims.split(",") if name.strip()]


def cmd_extract(ns: argparse.Namespace) -> None:
    from steerlab.io import result_paths
    from steerlab.steering.commands import extract

    _parse_lists(ns)
    args = _options(ExtractArgs, ns)
    vector = extract(args)
    for layer in vector.layers:
        residual = vector.residual_norm(layer)
        print(f"layer {layer:3d}  |v| = {vector.norm(layer):9.3f}   residual norm {residual:9.2f}")
    print(f"saved {result_paths(args.out)[0]} (+ .json metadata)")


def cmd_evaluate(ns: argparse.Namespace) -> None:
    from steerlab.steering.commands import evaluate

    results = evaluate(_options(EvaluateArgs, ns))
    for name in ("unsteered", "-m", "+m"):
        r = results[name]
        extra = f"  p(first option) {r['p_first']:.3f}  chance {r['chance']:.3f}" if "p_first" in r else ""
        print(
            f"{name:>10}: score {r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
            f"ppl {r['perplexity']:.2f}  KL {r['kl']:.4f}{extra}"
        )
    for benchmark, rows in results.get("capability", {}).items():
        for name, r in rows.items():
            print(
                f"{benchmark:>10} {name:>9}: accuracy {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
                f"n {r['n']}  chance {r['chance']:.2f}  always-first {r['always_first_accuracy']:.3f}"
            )
    print(f"layer {results['layer']}, multiplier ±{results['multiplier']:.4g}")


def cmd_sweep(ns: argparse.Namespace) -> None:
    from steerlab.steering.commands import sweep

    _parse_lists(ns)
    args = _options(SweepArgs, ns)
    rows = sweep(args)
    print(f"wrote {args.out} ({len(rows)} rows) and {Path(args.out).with_suffix('.png')}")


def cmd_generate(ns: argparse.Namespace) -> None:
    from steerlab.steering.commands import generate

    ns.prompts = ns.prompt
    out = generate(_options(GenerateArgs, ns))
    steered = out.get("steered", out["unsteered"])
    for prompt, plain, changed in zip(out["prompts"], out["unsteered"], steered):
        print(f"### {prompt}\n--- unsteered:\n{plain}")
        if "steered" in out:
            print(f"--- steered (layer {out['layer']}, multiplier {out['multiplier']:.3f}):\n{changed}")
        print()


def cmd_demo(ns: argparse.Namespace) -> None:
    from steerlab.steering.demo import run_demo
    from steerlab.steering.report import terminal_summary

    experiment = _experiment(ns)
    if experiment is not None and experiment.multipliers is not None:
        raise UserError(f"--experiment: {experiment.path} gives multipliers; the demo sweeps fractions")
    _parse_lists(ns)
    summary = run_demo(ns.out, _options(DemoConfig, ns, experiment))
    print(terminal_summary(summary, ns.out))


def cmd_export_gguf(ns: argparse.Namespace) -> None:
    from steerlab.io import check_output_file
    from steerlab.steering.commands import _load_vector
    from steerlab.steering.gguf import export_control_vector, import_control_vector

    out = check_output_file(ns.out, "--out")
    vector = _load_vector(ns.vector)
    export_control_vector(vector, out, model_hint=ns.model_hint, layers=parse_layers(ns.layers))
    written = import_control_vector(out).layers
    print(f"wrote {out}: direction.N for layers {written} (llama.cpp: --control-vector-scaled {out} M)")


def cmd_import_gguf(ns: argparse.Namespace) -> None:
    from steerlab.io import ResultFileError, check_output_file, result_paths
    from steerlab.steering.gguf import import_control_vector

    check_output_file(result_paths(ns.out)[0], "--out")
    try:
        vector = import_control_vector(ns.gguf)
    except ResultFileError as error:
        raise ResultFileError(f"--gguf: {error}") from None
    for layer in vector.layers:
        print(f"layer {layer:3d}  |v| = {vector.norm(layer):9.3f}")
    print(f"saved {vector.save(ns.out)} (+ .json metadata)")


def _common(parser: argparse.ArgumentParser) -> None:
    """--experiment, the model options and --quiet (also accepted before the command)."""
    parser.add_argument(
        "--experiment",
        default=None,
        metavar="FILE",
        help="JSON/YAML experiment file (or builtin:sentiment); options given here override it",
    )
    add_model_arguments(parser)
    parser.set_defaults(model=None)
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")


def _steer_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vector", default=None, help="steering vector (.safetensors + .json)")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer to steer (negative counts from the end; default: the vector's only layer)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--multiplier", type=float, default=None, help="raw multiplier m (adds m·v)")
    group.add_argument(
        "--fraction",
        type=float,
        default=None,
        help=f"‖m·v‖ as a fraction of the residual norm (default {DEFAULT_FRACTION})",
    )
    parser.add_argument(
        "--positions",
        default=None,
        help=f"all | decode | from:K | at:I,J (default {field_default(SteerArgs, 'positions')}; "
        "position 0 excluded)",
    )


def _metric_args(parser: argparse.ArgumentParser, cls) -> None:
    parser.add_argument(
        "--data",
        default=None,
        help="A/B items (p of the matching answer) or prompts (word preference): builtin:NAME, caa:BEHAVIOUR/test_ab or a file",
    )
    parser.add_argument(
        "--words",
        default=None,
        help='JSON {"positive": [...], "negative": [...]} of single words; required for prompts '
        "other than builtin:sentiment-prompts",
    )
    parser.add_argument(
        "--neutral",
        default=None,
        help=f"neutral texts for perplexity and KL: a file, one per line (default {field_default(cls, 'neutral')})",
    )
    parser.add_argument("--system-prompt", default=None, help="A/B items: system prompt of the chat template")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many items")


def add_subcommands(sub) -> None:
    """Add the steering commands to the `steerlab` parser's subparsers."""
    p = sub.add_parser("extract", help="extract a steering vector from contrast data")
    _common(p)
    p.add_argument(
        "--data",
        default=None,
        help="builtin:NAME, caa:BEHAVIOUR, CAA .json, Anthropic .jsonl or paired texts",
    )
    p.add_argument(
        "--split",
        default=None,
        choices=["train", "validation", "test"],
        help="use this seeded part of the data (60/20/20)",
    )
    p.add_argument("--limit", type=int, default=None, help="use at most this many items (after --split)")
    p.add_argument("--layers", default=None, help="comma-separated layers or ranges, e.g. 10,12,-4 or 10-14")
    p.add_argument("--out", default=None, help="output path (writes .safetensors and .json)")
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="mean-diff (CAA / mean difference), pca-diff, pca-center or probe "
        f"(default {field_default(ExtractArgs, 'method')})",
    )
    p.add_argument(
        "--read",
        choices=["last", "mean"],
        default=None,
        help=f"paired texts: last token or mean over positions (default {field_default(ExtractArgs, 'read')})",
    )
    p.add_argument(
        "--chat", action="store_true", default=None, help="paired texts: wrap each text in the chat template"
    )
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--no-balance",
        dest="balance",
        action="store_false",
        default=None,
        help="A/B: do not balance answer letters (not recommended)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"default {field_default(ExtractArgs, 'batch_size')}"
    )
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("evaluate", help="behaviour metric at -m, 0, +m with side effects")
    _common(p)
    _steer_args(p)
    _metric_args(p, EvaluateArgs)
    p.add_argument("--json", default=None, help="also write the results here (JSON)")
    p.add_argument(
        "--capability",
        default=None,
        help="also score capability A/B items at each setting: mmlu, truthfulqa (CAA's subsets, pinned "
        "download) or CAA-format files, comma-separated",
    )
    p.add_argument(
        "--capability-limit", type=int, default=None, help="a seeded random subset of this many items each"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sweep", help="layers x strengths grid with random-vector controls -> tidy CSV + plot")
    _common(p)
    p.add_argument("--vector", default=None, help="steering vector (.safetensors + .json)")
    _metric_args(p, SweepArgs)
    p.add_argument("--layers", default=None, help="default: every layer stored in the vector")
    group = p.add_mutually_exclusive_group()
    fractions = ",".join(f"{f:g}" for f in field_default(SweepArgs, "fractions"))
    group.add_argument(
        "--fractions", default=None, help=f"signed fractions of the residual norm (default {fractions})"
    )
    group.add_argument("--multipliers", default=None, help="raw signed multipliers m (adds m·v), e.g. -4,4")
    p.add_argument(
        "--dims",
        default=None,
        help="also restrict the vector (and its random control) to a fraction of the residual dimensions, "
        f"chosen by first | random | top (largest |v_i|), e.g. first,top (default with --dim-fractions: "
        f"{','.join(DEFAULT_DIMS)})",
    )
    p.add_argument(
        "--dim-fractions",
        default=None,
        help="fractions of the dimensions kept, in (0, 1] (1: the whole vector), e.g. 0.25,0.5,1 (default with "
        f"--dims: {','.join(f'{f:g}' for f in DEFAULT_DIM_FRACTIONS)})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the random control and of random dimensions (default 0)",
    )
    p.add_argument(
        "--positions",
        default=None,
        help=f"all | decode | from:K | at:I,J (default {field_default(SweepArgs, 'positions')})",
    )
    p.add_argument(
        "--split",
        default=None,
        help=f"label written in the split column (default {field_default(SweepArgs, 'split')})",
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"CSV path; the plot goes beside it (default {field_default(SweepArgs, 'out')})",
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate", help="greedy generations, unsteered and steered")
    _common(p)
    _steer_args(p)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="a file of prompts, one per line")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default {field_default(GenerateArgs, 'max_new_tokens')}",
    )
    p.add_argument(
        "--no-chat",
        dest="chat",
        action="store_false",
        default=None,
        help="continue the raw text instead of a chat turn",
    )
    p.add_argument("--system-prompt", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "demo",
        help="the end-to-end sentiment steering demo on the embedded model (offline); with --experiment, "
        "the demo's recipe on its paired texts (contrast), prompts (evaluation) and words",
    )
    _common(p)
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--layers", default=None, help="layers to sweep (default 6,8,...,20)")
    p.add_argument("--fractions", default=None, help="signed fractions of the residual norm")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("vector", help="convert steering vectors to and from llama.cpp control vectors (GGUF)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("export-gguf", help="write a vector as a llama.cpp control vector")
    q.add_argument("--vector", required=True, help="steering vector (.safetensors + .json)")
    q.add_argument("--out", required=True, help="the .gguf file to write")
    q.add_argument("--layers", default=None, help="layers to write, e.g. 12,16 (default: every stored layer)")
    q.add_argument(
        "--model-hint", default=None, help="model family recorded in the file (default: the vector's)"
    )
    q.set_defaults(func=cmd_export_gguf)
    q = actions.add_parser("import-gguf", help="read a llama.cpp control vector (e.g. from repeng)")
    q.add_argument("--gguf", required=True, help="the control-vector .gguf file")
    q.add_argument("--out", required=True, help="output path (writes .safetensors and .json)")
    q.set_defaults(func=cmd_import_gguf)
    add_actadd_subcommand(sub)


# --- ActAdd ------------------------------------------------------------------------------------------


def cmd_actadd(ns: argparse.Namespace) -> None:
    from steerlab.options import from_namespace
    from steerlab.steering.commands import ActAddArgs, actadd

    args = from_namespace(ActAddArgs, ns, progress=not getattr(ns, "quiet", False))
    out = actadd(args)
    print(
        f"ActAdd at layer {out['layer']}: {out['positions']} position(s) after the sink, |block| = "
        f"{out['norm']:.3f}, coefficient {out['coefficient']:g}"
    )
    if args.out:
        print(f"saved {args.out}.safetensors (+ .json metadata)")
    for prompt, plain, steered in zip(out["prompts"], out["unsteered"], out["steered"]):
        print(f"### {prompt}\n--- unsteered:\n{prompt}{plain}\n--- steered:\n{prompt}{steered}\n")


def add_actadd_subcommand(sub) -> None:
    """`steerlab actadd`: extract (or load) an ActAdd vector, generate unsteered and steered."""
    from steerlab.options import add_arguments
    from steerlab.steering.commands import ActAddArgs

    p = sub.add_parser(
        "actadd",
        help="ActAdd: a prompt pair's per-position difference added at the front of the prompt",
        description='e.g. steerlab actadd --positive " weddings" --negative " " --layer 6 --coefficient 4 '
        '--prompt "I went up to my friend and said" --out vectors/weddings',
    )
    add_arguments(p, ActAddArgs)
    p.set_defaults(func=cmd_actadd)
