"""BERTScore (Zhang et al., 2020): greedy cosine matching of contextual token embeddings.

Computed as the reference package bert-score 0.3.13 does (tests compare the two to 1e-5), with one
exception: bert-score's batched matching multiplies the similarity matrix by the padding mask, so at its
default batch size a token whose best cosine with the other text's real tokens is negative scores 0
instead (its result then depends on which other pairs share the batch); here a token is matched with real
tokens only, which equals bert-score run with `batch_size=1`.

- each text is stripped and encoded with its special tokens ([CLS] ... [SEP]), truncated to the encoder's
  maximum length; the hidden states at `layer` (0 = embeddings, L = output of block L; bert-score's
  `num_layers=L`) are L2-normalised per token;
- precision averages, over the candidate's tokens, each token's highest cosine with any reference token;
  recall does the same the other way round; F1 = 2PR / (P + R);
- the averages are weighted: [CLS] and [SEP] weigh 0 (they still stand as match partners, as in
  bert-score), every other token 1, or with `idf=True` idf(w) = log((M + 1) / (df(w) + 1)) over the M
  references (an unseen word-piece: log(M + 1));
- a candidate or reference with no token besides the specials scores P = R = F = 0;
- with several references per candidate, each of P, R and F is the best over them;
- `baseline` rescales x -> (x - b) / (1 - b) with given baselines (b_P, b_R, b_F) or a baseline file in
  bert-score's format (CSV `LAYER,P,R,F`, one row per layer). bert-score's own baseline files cover none of
  the embedded encoder's layers and computing one needs its Common Crawl sample, so none is built in.
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from steerlab.errors import UserError
from steerlab.evaluate.stats import bootstrap_ci
from steerlab.models.encoders import DEFAULT_ENCODER, Encoder, get_encoder

METRICS = ("precision", "recall", "f1")


@dataclass(frozen=True)
class BERTScore:
    """Per candidate: BERTScore precision, recall and F1 (float64 tensors of shape (N,))."""

    precision: torch.Tensor
    recall: torch.Tensor
    f1: torch.Tensor
    encoder: str
    layer: int
    idf: bool
    baseline: tuple[float, float, float] | None = None

    def __len__(self) -> int:
        return len(self.f1)

    def ci(self, metric: str = "f1", n_boot: int = 2000, alpha: float = 0.05, seed: int = 0):
        """(mean, low, high): the mean of `metric` and its percentile bootstrap interval over candidates."""
        if metric not in METRICS:
            raise UserError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
        return bootstrap_ci(getattr(self, metric).numpy(), n_boot=n_boot, alpha=alpha, seed=seed)

    def summary(self, n_boot: int = 2000, alpha: float = 0.05) -> dict:
        """{"n", "encoder", "layer", "idf", "rescaled", and per metric {"mean", "ci"}}."""
        out: dict = {
            "n": len(self),
            "encoder": self.encoder,
            "layer": self.layer,
            "idf": self.idf,
            "rescaled": self.baseline is not None,
        }
        for metric in METRICS:
            mean, low, high = self.ci(metric, n_boot=n_boot, alpha=alpha)
            out[metric] = {"mean": mean, "ci": [low, high]}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        from steerlab.io import save_result

        tensors = {metric: getattr(self, metric) for metric in METRICS}
        meta = {"encoder": self.encoder, "layer": self.layer, "idf": self.idf, "baseline": self.baseline}
        return save_result(path, tensors, meta, kind="BERTScore")

    @classmethod
    def load(cls, path: str | os.PathLike) -> BERTScore:
        from steerlab.io import load_result

        tensors, meta = load_result(path, "BERTScore")
        baseline = tuple(meta["baseline"]) if meta.get("baseline") is not None else None
        return cls(**{m: tensors[m] for m in METRICS}, encoder=meta["encoder"], layer=meta["layer"],
                   idf=meta["idf"], baseline=baseline)  # fmt: skip


def encode_text(encoder: Encoder, text: str) -> list[int]:
    """Token ids with the special tokens, as bert-score encodes a sentence (stripped, truncated)."""
    tokenizer = encoder.tokenizer
    ids = tokenizer(text.strip(), add_special_tokens=True, max_length=encoder.max_positions, truncation=True)
    return list(ids["input_ids"])


def _special_ids(encoder: Encoder) -> set[int]:
    tokenizer = encoder.tokenizer
    return {i for i in (tokenizer.cls_token_id, tokenizer.sep_token_id) if i is not None}


def idf_weights(
    references: Sequence[str], encoder: Encoder | str = DEFAULT_ENCODER
) -> defaultdict[int, float]:
    """Word-piece id -> log((M + 1) / (df + 1)) over the M `references`; unseen ids get log(M + 1)."""
    encoder = get_encoder(encoder)
    df: Counter[int] = Counter()
    for text in references:
        df.update(set(encode_text(encoder, text)))
    m = len(references)
    weights: defaultdict[int, float] = defaultdict(lambda: math.log(m + 1))
    weights.update({token: math.log((m + 1) / (count + 1)) for token, count in df.items()})
    return weights


def read_baseline(
    path: str | os.PathLike, layer: int, option: str = "baseline"
) -> tuple[float, float, float]:
    """(b_P, b_R, b_F) at `layer` from a bert-score baseline file (CSV header `LAYER,P,R,F`, row k = layer k)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}: no such file: {path}")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if layer >= len(rows):
        raise UserError(f"{option}: {path} has baselines for layers 0..{len(rows) - 1}, not layer {layer}")
    try:
        return tuple(float(rows[layer][key]) for key in ("P", "R", "F"))  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{option}: {path}: expected the columns LAYER,P,R,F with numbers") from None


def _pair_scores(
    cand: torch.Tensor, ref: torch.Tensor, w_cand: torch.Tensor, w_ref: torch.Tensor, empty: bool
) -> tuple[float, float, float]:
    if empty:
        return 0.0, 0.0, 0.0
    sim = cand @ ref.T
    precision = float((sim.max(dim=1).values.double() * w_cand).sum() / w_cand.sum())
    recall = float((sim.max(dim=0).values.double() * w_ref).sum() / w_ref.sum())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall != 0 else 0.0
    return precision, recall, 0.0 if math.isnan(f1) else f1


def bert_score(
    candidates: Sequence[str],
    references: Sequence[str | Sequence[str]],
    encoder: Encoder | str = DEFAULT_ENCODER,
    layer: int | None = None,
    idf: bool | Mapping[int, float] = False,
    baseline: str | os.PathLike | tuple[float, float, float] | None = None,
    batch_size: int = 64,
) -> BERTScore:
    """BERTScore of each candidate against its reference (or the best of its references).

    `encoder`: an `Encoder` or a name for `load_encoder` (default the embedded all-MiniLM-L6-v2); `layer`:
    the hidden states used (default the last layer; bert-score has no default for this encoder); `idf`:
    False, True (idf from the references) or a precomputed {token id: weight}; `baseline`: see the module.
    """
    if len(candidates) != len(references):
        raise UserError(f"bert_score: {len(candidates)} candidates but {len(references)} references")
    if not candidates:
        raise UserError("bert_score: no candidates given")
    encoder = get_encoder(encoder)
    layer = encoder.resolve_layer(layer)
    groups = [[r] if isinstance(r, str) else list(r) for r in references]
    if any(not group for group in groups):
        raise UserError("bert_score: a candidate has an empty list of references")
    flat_refs = [r for group in groups for r in group]
    if isinstance(idf, Mapping):
        weights: Mapping[int, float] = idf
    elif idf:
        weights = idf_weights(flat_refs, encoder)
    else:
        weights = defaultdict(lambda: 1.0, dict.fromkeys(_special_ids(encoder), 0.0))
    if isinstance(baseline, str | os.PathLike):
        baseline = read_baseline(baseline, layer)

    texts = list(dict.fromkeys([*candidates, *flat_refs]))
    ids = [encode_text(encoder, t) for t in texts]
    states = encoder.hidden_states(ids, layer, batch_size)
    special = _special_ids(encoder)
    table = {}
    for text, tokens, h in zip(texts, ids, states):
        w = torch.tensor([weights[t] for t in tokens], dtype=torch.float64)
        table[text] = (h / h.norm(dim=-1, keepdim=True), w, all(t in special for t in tokens))

    rows = []
    for cand, group in zip(candidates, groups):
        c, wc, c_empty = table[cand]
        scores = [_pair_scores(c, table[r][0], wc, table[r][1], c_empty or table[r][2]) for r in group]
        rows.append(torch.tensor(scores, dtype=torch.float64).max(dim=0).values)
    prf = torch.stack(rows)
    if baseline is not None:
        b = torch.tensor(baseline, dtype=torch.float64)
        prf = (prf - b) / (1 - b)
    return BERTScore(
        prf[:, 0], prf[:, 1], prf[:, 2], encoder.name, layer, bool(idf),
        tuple(float(x) for x in baseline) if baseline is not None else None,  # type: ignore[arg-type]
    )  # fmt: skip
