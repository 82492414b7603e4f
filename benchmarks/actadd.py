"""The ActAdd experiment (Turner et al. 2023) on the embedded SmolLM2-135M-Instruct.

A " weddings" - " " vector (and " shipping" - " ") is added at the front of raw-text prompts. Every
setting is scored against the unsteered model on the same prompts (paired), and against a random vector of
the same per-position norm at the same positions:

- behaviour: BERTScore F1 (and P) of each greedy continuation against a gold passage (the title and
  introduction of the topic's essay), encoder all-MiniLM-L6-v2; topic keyword counts;
- side effects: perplexity of the first 48 tokens of a Wikipedia text (steered / unsteered), and the
  wedding-essay / shipping-essay perplexity ratio (steered / unsteered; < 1: wedding text got likelier);
- stage 1, layers x coefficients, full vector: the setting with the largest validation gain is chosen;
- stage 2, at the chosen setting: the vector restricted to a fraction of the residual dimensions (first-k,
  random-k, top-|v|), each compared with the full vector rescaled to the SAME injected norm (the
  "overshooting" check) and with a random vector of that norm.

Prompts: prompts.txt without the three that mention weddings and those over 16 tokens, seeded shuffle, split into validation
(choose) and test (report). Bootstrap 95% CIs over test prompts (paired differences). Generations are
cached in OUT/generations-<configuration>.jsonl, so an interrupted run resumes. The last line is one JSON object.

    .venv/bin/python benchmarks/actadd.py [--out results/actadd] [--layers 6,12,18] [--coefficients 1,4]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

import steerlab
from steerlab.data.batching import pad_batch
from steerlab.evaluate import bootstrap_ci
from steerlab.evaluate.soft import bert_score, keyword_counts, passage_perplexity
from steerlab.hooks import add_block
from steerlab.io import write_json
from steerlab.report.figures import new_figure, save_png
from steerlab.steering import extract_actadd
from steerlab.steering.actadd import prompt_ids, sink_token_id
from steerlab.steering.dimensions import dimension_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "actadd"
DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
TOPICS = {
    "weddings": {
        "positive": " weddings",
        "essay": "chatgpt_wedding_essay_20230423.txt",
        "keywords": [
            "wedding", "weddings", "wed", "bride", "brides", "bridal", "groom", "grooms", "marriage",
            "married", "marry", "marrying", "ceremony", "vows", "honeymoon", "engagement", "engaged",
            "bridesmaid", "bridesmaids", "bouquet",
        ],
    },
    "shipping": {
        "positive": " shipping",
        "essay": "chatgpt_shipping_essay_20230423.txt",
        "keywords": [
            "shipping", "ship", "ships", "shipped", "shipment", "shipments", "cargo", "freight", "container",
            "containers", "port", "ports", "vessel", "vessels", "logistics", "maritime", "delivery",
        ],
    },
}  # fmt: skip
SELECTIONS = ("first", "random", "top")
PPL_TOKENS = 48


def gold_passage(essay: str) -> str:
    """The essay's title and introduction paragraph (up to the first section heading after it)."""
    lines = [line.strip() for line in (DATA / essay).read_text().splitlines() if line.strip()]
    return " ".join(lines[:3]).replace("Introduction:", "").replace("Introduction", "").strip()


def split_prompts(lm, n_val: int, n_test: int, seed: int, max_tokens: int) -> tuple[list[str], list[str]]:
    """Prompts without "wedding" and of at most `max_tokens` tokens, shuffled, split validation / test."""
    prompts = [p.strip() for p in (DATA / "prompts.txt").read_text().splitlines() if p.strip()]
    prompts = [p for p in prompts if "wedding" not in p.lower()]
    prompts = [
        p for p in prompts if len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) <= max_tokens
    ]
    random.Random(seed).shuffle(prompts)
    return prompts[:n_val], prompts[n_val : n_val + n_test]


def head_text(lm, text: str, n_tokens: int) -> str:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return lm.tokenizer.decode(ids)


class Cache:
    """Generations and perplexities per setting key, appended to a JSONL file (resume)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def add(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.rows[row["key"]] = row


class Runner:
    """Runs many settings at once: every (setting, prompt) is one row of a batch, each row with its own
    block (`hooks.add_block` with (B, n, D) blocks; zeros for the unsteered rows and for rows steered at
    another layer), so the CPU sees a few large batches instead of many small ones."""

    def __init__(self, lm, prompts, passages, cache: Cache, max_new_tokens: int, rows_per_batch: int):
        self.lm, self.prompts, self.cache = lm, prompts, cache
        self.max_new_tokens, self.rows_per_batch = max_new_tokens, rows_per_batch
        self.sink_id = sink_token_id(lm.tokenizer)
        self.prompt_ids = [prompt_ids(lm.tokenizer, p, self.sink_id) for p in prompts]
        self.passages = passages
        self.passage_ids = {
            name: [self.sink_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
            for name, text in passages.items()
        }

    def _blocks(self, settings, row_setting: list[int]) -> dict[int, torch.Tensor]:
        """Per layer, a (rows, n, D) block: the setting's block on its rows, zeros elsewhere."""
        width = self.lm.info.hidden_size
        n = max((b.shape[0] for _, _, b in settings if b is not None), default=1)
        blocks: dict[int, torch.Tensor] = {}
        for row, index in enumerate(row_setting):
            _, layer, block = settings[index]
            if block is None:
                continue
            if layer not in blocks:
                blocks[layer] = torch.zeros(len(row_setting), n, width)
            blocks[layer][row, : block.shape[0]] = block
        return blocks

    def _batched(self, settings, sequences, run) -> list:
        """`run(ids, mask, blocks)` over chunks of (setting, sequence) rows; results in row order."""
        rows = [(i, j) for i in range(len(settings)) for j in range(len(sequences))]
        out = []
        for start in range(0, len(rows), self.rows_per_batch):
            chunk = rows[start : start + self.rows_per_batch]
            ids, mask = pad_batch([sequences[j] for _, j in chunk], 0, self.lm.device, left=True)
            blocks = self._blocks(settings, [i for i, _ in chunk])
            if blocks:
                with add_block(self.lm.model, blocks):
                    out.extend(run(ids, mask))
            else:
                out.extend(run(ids, mask))
        return out

    def _generate(self, ids, mask) -> list[str]:
        tok = self.lm.tokenizer
        out = self.lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=0, eos_token_id=tok.eos_token_id,
        )  # fmt: skip
        return tok.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def _nll(self, ids, mask) -> list[float]:
        """Mean NLL of every token after the sink, per row (left padding masked out)."""
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.lm.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False
        ).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        weight = (mask[:, :-1] * mask[:, 1:]).float()
        return [float(x) for x in (nll * weight).sum(-1) / weight.sum(-1)]

    def run(self, settings: list[tuple[str, int | None, torch.Tensor | None]]) -> dict[str, dict]:
        """settings: (key, layer, coefficient x block or None); returns {key: {"texts", "ppl", ...}}."""
        todo = [s for s in settings if s[0] not in self.cache.rows]
        if todo:
            start = time.perf_counter()
            texts = self._batched(todo, self.prompt_ids, self._generate)
            names = list(self.passage_ids)
            nll = self._batched(todo, [self.passage_ids[n] for n in names], self._nll)
            seconds = (time.perf_counter() - start) / len(todo)
            k, m = len(self.prompts), len(names)
            for i, (key, _, _) in enumerate(todo):
                ppl = {name: math.exp(nll[i * m + j]) for j, name in enumerate(names)}
                self.cache.add(
                    {"key": key, "texts": texts[i * k : (i + 1) * k], "ppl": ppl, "seconds": seconds}
                )
        return {key: self.cache.rows[key] for key, _, _ in settings}


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    return bootstrap_ci(a - b, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/actadd")
    parser.add_argument("--layers", default="6,12,18")
    parser.add_argument("--coefficients", default="1,4")
    parser.add_argument("--fractions", default="0.25,0.5,0.7")
    parser.add_argument("--max-prompt-tokens", type=int, default=16)
    parser.add_argument("--n-val", type=int, default=4)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--topics", default="weddings,shipping", help="the first one gets stage 2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    coefficients = [float(x) for x in args.coefficients.split(",")]
    fractions = [float(x) for x in args.fractions.split(",")]
    topics = args.topics.split(",")
    started = time.perf_counter()

    lm = steerlab.load_model()
    val, test = split_prompts(lm, args.n_val, args.n_test, args.seed, args.max_prompt_tokens)
    prompts = val + test
    sink_text = lm.tokenizer.convert_ids_to_tokens([0])[0]
    assert lm.tokenizer(sink_text, add_special_tokens=False)["input_ids"] == [0]
    passages = {
        "neutral": head_text(lm, (DATA / "wikipedia_macedonia.txt").read_text(), PPL_TOKENS),
        "weddings": head_text(lm, (DATA / TOPICS["weddings"]["essay"]).read_text(), PPL_TOKENS),
        "shipping": head_text(lm, (DATA / TOPICS["shipping"]["essay"]).read_text(), PPL_TOKENS),
    }
    config = {k: getattr(args, k) for k in ("n_val", "n_test", "max_new_tokens", "seed", "max_prompt_tokens")}
    fingerprint = "-".join(f"{v}" for v in config.values()) + f"-ppl{PPL_TOKENS}"
    cache = Cache(out / f"generations-{fingerprint}.jsonl")  # another configuration never reuses these
    runner = Runner(lm, prompts, passages, cache, args.max_new_tokens, args.rows_per_batch)
    base = runner.run([("unsteered", None, None)])["unsteered"]
    check = passage_perplexity(lm, sink_text + passages["neutral"]).perplexity  # the shared metric agrees
    assert abs(check / base["ppl"]["neutral"] - 1) < 1e-3, (check, base["ppl"])
    print(f"unsteered: {base['seconds']:.0f}s, neutral perplexity {check:.2f}", flush=True)

    n_val = len(val)
    scorers = {}
    for topic in topics:
        gold = gold_passage(TOPICS[topic]["essay"])

        def score(texts, gold=gold, topic=topic) -> dict[str, np.ndarray]:
            bs = bert_score(texts, [gold] * len(texts))
            kw = keyword_counts(texts, TOPICS[topic]["keywords"])
            return {
                "f1": bs.f1.numpy(),
                "precision": bs.precision.numpy(),
                "keywords": kw.counts.double().numpy(),
            }

        scorers[topic] = score
    base_scores = {topic: scorers[topic](base["texts"]) for topic in topics}

    def summarise(topic: str, row: dict, label: dict) -> dict:
        s, b = scorers[topic](row["texts"]), base_scores[topic]
        record = dict(label, topic=topic, seconds=row["seconds"])
        for split, part in (("val", slice(0, n_val)), ("test", slice(n_val, None))):
            gain = s["f1"][part] - b["f1"][part]
            mean, low, high = bootstrap_ci(gain, seed=args.seed)
            record[f"{split}_f1_gain"] = mean
            record[f"{split}_f1_gain_ci"] = [low, high]
            record[f"{split}_precision_gain"] = float((s["precision"][part] - b["precision"][part]).mean())
            record[f"{split}_keywords"] = float(s["keywords"][part].mean())
            record[f"{split}_keyword_rate"] = float((s["keywords"][part] > 0).mean())
        record["neutral_ppl_ratio"] = row["ppl"]["neutral"] / base["ppl"]["neutral"]
        record["wedding_shipping_ppl_ratio"] = (row["ppl"]["weddings"] / row["ppl"]["shipping"]) / (
            base["ppl"]["weddings"] / base["ppl"]["shipping"]
        )
        record["_f1"] = s["f1"]
        return record

    records: list[dict] = []
    vectors = {}
    # Stage 1: layers x coefficients, the full vector and its random control, every topic.
    settings, labels = [], {}
    for topic in topics:
        for layer in layers:
            vector = extract_actadd(lm, TOPICS[topic]["positive"], " ", layer=layer)
            vectors[topic, layer] = vector
            control = vector.random_like(seed=args.seed)
            for c in coefficients:
                for kind, v in (("full", vector), ("random", control)):
                    key = f"{topic}|L{layer}|c{c:g}|{kind}"
                    settings.append((key, layer, c * v.block))
                    labels[key] = (topic, dict(stage=1, layer=layer, coefficient=c, kind=kind, fraction=1.0,
                                               selection="all", norm=v.norm() * c))  # fmt: skip
    for key, row in runner.run(settings).items():
        topic, label = labels[key]
        rec = summarise(topic, row, label)
        records.append(rec)
        print(
            f"{key:<34} val gain {rec['val_f1_gain']:+.4f} test gain {rec['test_f1_gain']:+.4f} "
            f"kw {rec['test_keywords']:.2f} ppl x{rec['neutral_ppl_ratio']:.3f}",
            flush=True,
        )
    print(f"stage 1 done: {time.perf_counter() - started:.0f}s", flush=True)
    main_topic = topics[0]
    stage1 = [r for r in records if r["topic"] == main_topic and r["kind"] == "full"]
    best = max(stage1, key=lambda r: r["val_f1_gain"])
    layer, c = best["layer"], best["coefficient"]
    print(f"chosen on validation: layer {layer}, coefficient {c:g}", flush=True)

    # Stage 2: dimension subsets at the chosen setting, each with the norm-matched full vector and a control.
    vector = vectors[main_topic, layer]
    values = vector.block.double().norm(dim=0)
    settings, labels = [], {}
    for selection in SELECTIONS:
        for fraction in fractions:
            mask = dimension_mask(values, selection, fraction, seed=args.seed)
            restricted = vector.keep_dimensions(mask)
            matched = vector.rescaled(restricted.norm())
            control = restricted.random_like(seed=args.seed)
            for kind, v in (("restricted", restricted), ("norm-matched", matched), ("random", control)):
                key = f"{main_topic}|L{layer}|c{c:g}|{selection}|{fraction:g}|{kind}"
                settings.append((key, layer, c * v.block))
                labels[key] = dict(stage=2, layer=layer, coefficient=c, kind=kind, fraction=fraction,
                                   selection=selection, norm=v.norm() * c)  # fmt: skip
    for key, row in runner.run(settings).items():
        rec = summarise(main_topic, row, labels[key])
        records.append(rec)
        low, high = rec["test_f1_gain_ci"]
        print(f"{key:<44} test gain {rec['test_f1_gain']:+.4f} [{low:+.4f}, {high:+.4f}]", flush=True)
    print(f"stage 2 done: {time.perf_counter() - started:.0f}s", flush=True)

    # Overshooting: restricted - norm-matched full at the same injected norm, paired over test prompts.
    test_part = slice(n_val, None)
    by_key = {(r["stage"], r["selection"], r["fraction"], r["kind"]): r for r in records if r["topic"] == main_topic and r["layer"] == layer and r["coefficient"] == c}  # fmt: skip
    full_rec = by_key[(1, "all", 1.0, "full")]
    comparisons = []
    for selection in SELECTIONS:
        for fraction in fractions:
            restricted = by_key[(2, selection, fraction, "restricted")]["_f1"][test_part]
            matched = by_key[(2, selection, fraction, "norm-matched")]["_f1"][test_part]
            full = full_rec["_f1"][test_part]
            vs_full = paired(restricted, full, args.seed)
            vs_matched = paired(restricted, matched, args.seed)
            comparisons.append(
                {
                    "selection": selection,
                    "fraction": fraction,
                    "restricted_minus_full": vs_full,
                    "restricted_minus_norm_matched": vs_matched,
                }
            )
    raw_nonmonotone = any(x["restricted_minus_full"][1] > 0 for x in comparisons)
    matched_nonmonotone = any(x["restricted_minus_norm_matched"][1] > 0 for x in comparisons)

    for r in records:
        r.pop("_f1")
    chosen_test = best["test_f1_gain"], best["test_f1_gain_ci"]
    random_max = max(r["test_f1_gain"] for r in records if r["kind"] == "random")
    summary = {
        "model": lm.info.name,
        "prompts": {"validation": val, "test": test},
        "gold": {t: gold_passage(TOPICS[t]["essay"]) for t in topics},
        "unsteered_ppl": base["ppl"],
        "chosen": {"layer": layer, "coefficient": c, "val_f1_gain": best["val_f1_gain"]},
        "records": records,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "summary.json", summary)
    plots(records, comparisons, main_topic, layers, coefficients, layer, c, DOCS_IMG)
    result = {
        "best_bertscore_gain": chosen_test[0],
        "best_bertscore_gain_ci_low": chosen_test[1][0],
        "best_bertscore_gain_ci_high": chosen_test[1][1],
        "best_setting": {"layer": layer, "coefficient": c},
        "random_bertscore_gain_max": random_max,
        "raw_nonmonotone": raw_nonmonotone,
        "norm_matched_nonmonotone": matched_nonmonotone,
        "best_neutral_ppl_ratio": best["neutral_ppl_ratio"],
        "best_wedding_shipping_ppl_ratio": best["wedding_shipping_ppl_ratio"],
        "n_val": len(val),
        "n_test": len(test),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


def plots(records, comparisons, topic, layers, coefficients, layer, c, folder: Path) -> None:
    """Heat-maps layer x coefficient (validation, test), the Pareto plot and the dimension curves."""
    full = {(r["layer"], r["coefficient"]): r for r in records if r["stage"] == 1 and r["topic"] == topic and r["kind"] == "full"}  # fmt: skip
    fig, axes = new_figure((10, 3.6), ncols=2)
    for ax, split in zip(axes, ("val", "test")):
        grid = np.array([[full[L, k][f"{split}_f1_gain"] for k in coefficients] for L in layers])
        bound = max(float(np.abs(grid).max()), 1e-6)
        image = ax.imshow(grid, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_xticks(range(len(coefficients)), [f"{k:g}" for k in coefficients])
        ax.set_yticks(range(len(layers)), [str(L) for L in layers])
        for i in range(len(layers)):
            for j in range(len(coefficients)):
                ax.text(j, i, f"{grid[i, j]:+.3f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("coefficient")
        ax.set_ylabel("layer")
        ax.set_title(f"BERTScore F1 gain, {'validation' if split == 'val' else 'test'} prompts")
        ax.figure.colorbar(image, ax=ax)
    save_png(fig, folder / "actadd_heatmap.png")

    fig, ax = new_figure((6.5, 4.5))
    styles = {
        "full": ("o", "C0"),
        "random": ("x", "C3"),
        "restricted": ("s", "C2"),
        "norm-matched": ("^", "C1"),
    }
    for kind, (marker, colour) in styles.items():
        rows = [r for r in records if r["topic"] == topic and r["kind"] == kind]
        ax.scatter(
            [r["neutral_ppl_ratio"] for r in rows],
            [r["test_f1_gain"] for r in rows],
            marker=marker,
            color=colour,
            label=kind,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("neutral-text perplexity, steered / unsteered (log)")
    ax.set_ylabel("BERTScore F1 gain (test)")
    ax.set_title(f"' {topic}' ActAdd: behaviour vs side effect")
    ax.legend(fontsize=8)
    save_png(fig, folder / "actadd_pareto.png")

    fig, axes = new_figure((12, 3.6), ncols=3, sharey=True)
    stage2 = [r for r in records if r["stage"] == 2]
    full_rec = full[layer, c]
    for ax, selection in zip(axes, SELECTIONS):
        for kind, (marker, colour) in styles.items():
            if kind == "full":
                continue
            rows = sorted((r for r in stage2 if r["selection"] == selection and r["kind"] == kind), key=lambda r: r["fraction"])  # fmt: skip
            xs = [r["fraction"] for r in rows] + ([1.0] if kind != "random" else [])
            ys = [r["test_f1_gain"] for r in rows] + ([full_rec["test_f1_gain"]] if kind != "random" else [])
            lo = [r["test_f1_gain_ci"][0] for r in rows] + ([full_rec["test_f1_gain_ci"][0]] if kind != "random" else [])  # fmt: skip
            hi = [r["test_f1_gain_ci"][1] for r in rows] + ([full_rec["test_f1_gain_ci"][1]] if kind != "random" else [])  # fmt: skip
            ax.errorbar(xs, ys, yerr=[np.subtract(ys, lo), np.subtract(hi, ys)], marker=marker, color=colour, label=kind, capsize=3)  # fmt: skip
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{selection}-k dimensions (layer {layer}, c {c:g})")
        ax.set_xlabel("fraction of the 576 dimensions kept")
    axes[0].set_ylabel("BERTScore F1 gain (test, 95% CI)")
    axes[0].legend(fontsize=8)
    save_png(fig, folder / "actadd_dimensions.png")


if __name__ == "__main__":
    main()
