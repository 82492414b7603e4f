"""`steerlab extract|evaluate|sweep|generate|demo`: the steering commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steerlab.errors import UserError
from steerlab.options import add_model_arguments, parse_floats, parse_layers

__all__ = ["add_subcommands", "load_data"]


def load_data(spec: str):
    """`builtin:NAME` or a file: A/B items (CAA .json / Anthropic .jsonl), paired texts, or prompts."""
    from steerlab import data

    if spec.startswith("builtin:"):
        return data.load_builtin(spec.split(":", 1)[1])
    path = Path(spec)
    if not path.exists():
        raise UserError(f"--data: no such data file: {path}")
    if path.suffix == ".jsonl":
        first = next((line for line in path.read_text().splitlines() if line.strip()), "{}")
        record = json.loads(first)
        if "answer_matching_behavior" in record:
            return data.load_anthropic_jsonl(path)
        return data.load_paired_texts(path) if "positive" in record else data.load_prompts(path)
    if path.suffix == ".json":
        content = json.loads(path.read_text())
        if isinstance(content, dict) and "positive" in content:
            return data.load_paired_texts(path)
        if (
            isinstance(content, list)
            and content
            and isinstance(content[0], dict)
            and "answer_matching_behavior" in content[0]
        ):
            return data.load_caa_json(path)
    return data.load_prompts(path)


def _model(args):
    from steerlab.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _default_layer(args) -> None:
    """Without --layer, a vector that stores one layer is applied there."""
    if args.layer is None and args.vector:
        from steerlab.steering import SteeringVector

        stored = SteeringVector.load(args.vector).layers
        if len(stored) != 1:
            raise UserError(f"--layer: the vector has layers {stored}; choose one with --layer")
        args.layer = stored[0]


def _multiplier(vector, layer: int, args) -> float:
    if args.multiplier is not None:
        return args.multiplier
    return vector.multiplier_for_fraction(layer, args.fraction)


def _metric(lm, dataset, words: str | None):
    """The behaviour metric for a dataset: p(matching answer) for A/B items, word preference for prompts."""
    from steerlab import data, evaluate

    if isinstance(dataset, data.ABDataset):
        prepared = evaluate.prepare_ab(lm, dataset)
        return lambda model: {
            "score": (s := evaluate.ab_scores(model, prepared)).p_matching,
            "p_first": s.p_first,
        }
    if isinstance(dataset, data.PromptSet):
        lists = json.loads(Path(words).read_text()) if words else data.load_builtin("sentiment-words")
        prepared = evaluate.prepare_word_preference(lm, dataset.prompts, lists["positive"], lists["negative"])
        return lambda model: {"score": evaluate.word_preference(model, prepared)}
    raise SystemExit("error: evaluate needs A/B items or prompts (paired texts are for extraction)")


def cmd_extract(args) -> None:
    from steerlab import data
    from steerlab.steering import extract_caa, extract_mean_difference

    dataset = load_data(args.data)
    lm = _model(args)
    if isinstance(dataset, data.ABDataset):
        vector = extract_caa(
            lm,
            dataset,
            parse_layers(args.layers),
            system_prompt=args.system_prompt,
            balance=not args.no_balance,
            batch_size=args.batch_size,
        )
    elif isinstance(dataset, data.PairedTexts):
        vector = extract_mean_difference(
            lm,
            dataset,
            parse_layers(args.layers),
            read=args.read,
            system_prompt=args.system_prompt,
            chat=args.chat,
            batch_size=args.batch_size,
        )
    else:
        raise SystemExit("error: extraction needs A/B items or paired positive/negative texts")
    path = vector.save(args.out)
    for layer in vector.layers:
        print(
            f"layer {layer:3d}  |v| = {vector.norm(layer):9.3f}   residual norm {vector.residual_norm(layer):9.2f}"
        )
    print(f"saved {path} (+ .json metadata)")


def cmd_evaluate(args) -> None:
    from steerlab import evaluate
    from steerlab.hooks import Positions
    from steerlab.steering import SteeringVector

    _default_layer(args)
    lm = _model(args)
    vector = SteeringVector.load(args.vector)
    metric = _metric(lm, load_data(args.data), args.words)
    neutral = evaluate.prepare_neutral(lm, _neutral_texts(args))
    m = _multiplier(vector, args.layer, args)
    positions = Positions.parse(args.positions)
    results = {}
    for name, mult in (("unsteered", 0.0), ("-m", -m), ("+m", m)):
        with vector.apply(lm, layer=args.layer, multiplier=mult, positions=positions):
            scores = metric(lm)
            effects = evaluate.side_effects(lm, neutral)
        mean, low, high = evaluate.bootstrap_ci(scores["score"].numpy())
        results[name] = {"score": mean, "ci": [low, high], "perplexity": effects.perplexity, "kl": effects.kl}
        if "p_first" in scores:
            results[name]["p_first"] = float(scores["p_first"].mean())
    for name, r in results.items():
        extra = f"  p(first option) {r['p_first']:.3f}" if "p_first" in r else ""
        print(
            f"{name:>10}: score {r['score']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  ppl {r['perplexity']:.2f}  KL {r['kl']:.4f}{extra}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"layer": args.layer, "multiplier": m, **results}, indent=2))


def _neutral_texts(args) -> list[str]:
    from steerlab.data import load_builtin

    if getattr(args, "neutral", None):
        return [line for line in Path(args.neutral).read_text().splitlines() if line.strip()]
    return load_builtin("neutral-text")


def cmd_sweep(args) -> None:
    from steerlab import evaluate
    from steerlab.hooks import Positions
    from steerlab.report.figures import save_png
    from steerlab.steering import SteeringVector, plots
    from steerlab.steering.sweep import Grid, sweep, write_csv

    lm = _model(args)
    vector = SteeringVector.load(args.vector)
    metric = _metric(lm, load_data(args.data), args.words)
    neutral = evaluate.prepare_neutral(lm, _neutral_texts(args))
    layers = parse_layers(args.layers) if args.layers else vector.layers
    rows = sweep(
        lm,
        vector,
        metric,
        Grid(layers, parse_floats(args.fractions, "--fractions")),
        split=args.split,
        positions=Positions.parse(args.positions),
        neutral=neutral,
    )
    write_csv(rows, args.out)
    png = Path(args.out).with_suffix(".png")
    save_png(plots.score_vs_fraction(rows, args.split, "score"), png)
    print(f"wrote {args.out} ({len(rows)} rows) and {png}")


def cmd_generate(args) -> None:
    from steerlab.evaluate import generate
    from steerlab.hooks import Positions
    from steerlab.steering import SteeringVector

    _default_layer(args)
    lm = _model(args)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    kwargs = dict(max_new_tokens=args.max_new_tokens, chat=not args.no_chat, system_prompt=args.system_prompt)
    plain = generate(lm, prompts, **kwargs)
    steered = plain
    if args.vector:
        vector = SteeringVector.load(args.vector)
        m = _multiplier(vector, args.layer, args)
        with vector.apply(lm, layer=args.layer, multiplier=m, positions=Positions.parse(args.positions)):
            steered = generate(lm, prompts, **kwargs)
    for prompt, a, b in zip(prompts, plain, steered):
        print(f"### {prompt}\n--- unsteered:\n{a}")
        if args.vector:
            print(f"--- steered (layer {args.layer}, multiplier {m:.3f}):\n{b}")
        print()


def cmd_demo(args) -> None:
    from steerlab.steering.demo import DemoConfig, run_demo
    from steerlab.steering.report import terminal_summary

    config = DemoConfig(model=args.model, progress=not args.quiet)
    if args.layers:
        config.layers = tuple(parse_layers(args.layers))
    if args.fractions:
        config.fractions = tuple(parse_floats(args.fractions, "--fractions"))
    summary = run_demo(args.out, config)
    print(terminal_summary(summary, args.out))


def _steer_args(parser: argparse.ArgumentParser, need_vector: bool = True) -> None:
    parser.add_argument("--vector", required=need_vector, help="steering vector (.safetensors + .json)")
    parser.add_argument(
        "--layer", type=int, default=None, help="layer to steer (negative counts from the end)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--multiplier", type=float, default=None, help="raw multiplier m (adds m·v)")
    group.add_argument(
        "--fraction", type=float, default=0.1, help="‖m·v‖ as a fraction of the residual norm (default 0.1)"
    )
    parser.add_argument(
        "--positions", default="all", help="all | decode | from:K | at:I,J (default all; position 0 excluded)"
    )


def add_subcommands(sub) -> None:
    """Add the steering commands to the `steerlab` parser's subparsers."""
    p = sub.add_parser("extract", help="extract a steering vector from contrast data")
    add_model_arguments(p)
    p.add_argument(
        "--data", required=True, help="builtin:NAME, CAA .json, Anthropic .jsonl or paired-text file"
    )
    p.add_argument("--layers", required=True, help="comma-separated layers, e.g. 10,12,-4")
    p.add_argument("--out", required=True, help="output path (writes .safetensors and .json)")
    p.add_argument(
        "--read",
        choices=["last", "mean"],
        default="last",
        help="paired texts: last token or mean over positions",
    )
    p.add_argument("--chat", action="store_true", help="paired texts: wrap each text in the chat template")
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--no-balance", action="store_true", help="A/B: do not balance answer letters (not recommended)"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("evaluate", help="behaviour metric at -m, 0, +m with side effects")
    add_model_arguments(p)
    _steer_args(p)
    p.add_argument(
        "--data", required=True, help="A/B items (p of the matching answer) or prompts (word preference)"
    )
    p.add_argument(
        "--words", default=None, help='JSON {"positive": [...], "negative": [...]} for prompt data'
    )
    p.add_argument(
        "--neutral", default=None, help="text file, one neutral sentence per line (perplexity, KL)"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "sweep", help="layers x multipliers grid with random-vector controls -> tidy CSV + plot"
    )
    add_model_arguments(p)
    p.add_argument("--vector", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--layers", default=None, help="default: every layer stored in the vector")
    p.add_argument(
        "--fractions",
        default="-0.1,-0.07,-0.04,0.04,0.07,0.1",
        help="signed fractions of the residual norm",
    )
    p.add_argument("--positions", default="all")
    p.add_argument("--words", default=None)
    p.add_argument("--neutral", default=None)
    p.add_argument("--split", default="validation", help="label written in the split column")
    p.add_argument("--out", default="sweep.csv")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("generate", help="greedy generations, unsteered and steered")
    add_model_arguments(p)
    _steer_args(p, need_vector=False)
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--no-chat", action="store_true", help="continue the raw text instead of a chat turn")
    p.add_argument("--system-prompt", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the end-to-end sentiment steering demo on the embedded model (offline)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="results/demo")
    p.add_argument("--layers", default=None)
    p.add_argument("--fractions", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
