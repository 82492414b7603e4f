"""A/B contrast items (CAA / Anthropic model-written-evals formats), their loaders and letter balancing."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

from steerlab.data.errors import DataFormatError, get_str, read_json, read_jsonl
from steerlab.data.splitting import fingerprint, split_indices
from steerlab.errors import UserError

log = logging.getLogger(__name__)

_LABEL = re.compile(r"\s*\(([A-Z])\)")
# An option line: optional indentation, then "(X)" (real CAA data has lines like " (A)No", without a space).
_OPTION_LINE = re.compile(r"^[ \t]*\(([A-Z])\)", re.MULTILINE)
_CHOICES = "Choices:"


def normalise_label(value: str) -> str | None:
    """'(A)' for '(A)' or ' (A)'; None when `value` is not an answer label."""
    match = _LABEL.fullmatch(value)
    return f"({match[1]})" if match else None


def option_spans(question: str) -> dict[str, tuple[int, int]]:
    """Label -> (start, end) of that option's text in `question`.

    Options are lines like "(A) text" / " (A) text" after the last "Choices:" (or anywhere when there is
    none). An option's text runs to the next option line; the last one to the next blank line or the end.
    Trailing whitespace is excluded. A label offered twice keeps its first span.
    """
    start = question.rfind(_CHOICES)
    start = 0 if start < 0 else start + len(_CHOICES)
    markers = list(_OPTION_LINE.finditer(question, start))
    spans: dict[str, tuple[int, int]] = {}
    for k, marker in enumerate(markers):
        begin = marker.end()
        if question[begin : begin + 1] in (" ", "\t"):
            begin += 1
        if k + 1 < len(markers):
            end = markers[k + 1].start()
        else:
            blank = question.find("\n\n", begin)
            end = len(question) if blank < 0 else blank
        end = begin + len(question[begin:end].rstrip())
        spans.setdefault(f"({marker[1]})", (begin, end))
    return spans


def parse_options(question: str) -> tuple[str, ...]:
    """Every option label offered in `question`, in order of appearance (empty if none is found)."""
    return tuple(option_spans(question))


@dataclass(frozen=True)
class ABItem:
    """One multiple-choice item: which answer label shows the behaviour and which does not."""

    question: str
    matching: str
    not_matching: str
    options: tuple[str, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        for name in ("matching", "not_matching"):
            if normalise_label(getattr(self, name)) != getattr(self, name):
                raise UserError(f"ABItem.{name} must be a label like '(A)', got {getattr(self, name)!r}")
        if self.matching == self.not_matching:
            raise UserError(f"ABItem: matching and not_matching are both {self.matching!r}")
        if not self.options:
            parsed = parse_options(self.question)
            options = parsed or tuple(sorted({self.matching, self.not_matching}))
            object.__setattr__(self, "options", options)
        object.__setattr__(self, "options", tuple(self.options))

    def option_text(self, label: str) -> str | None:
        """The text of option `label` as written in the question (None if it cannot be found)."""
        span = option_spans(self.question).get(label)
        return None if span is None else self.question[span[0] : span[1]]

    @property
    def swappable(self) -> bool:
        """Whether both answers' texts can be found in the question, so `swapped` works."""
        spans = option_spans(self.question)
        return self.matching in spans and self.not_matching in spans

    def swapped(self) -> ABItem:
        """The same item with the two answers' texts traded between their labels.

        The matching label becomes the old not-matching label and still names the same answer text.
        """
        spans = option_spans(self.question)
        if self.matching not in spans or self.not_matching not in spans:
            raise UserError(
                f"cannot find the texts of {self.matching} and {self.not_matching} in {self.source}"
            )
        (a0, a1), (b0, b1) = sorted([spans[self.matching], spans[self.not_matching]])
        q = self.question
        question = q[:a0] + q[b0:b1] + q[a1:b0] + q[a0:a1] + q[b1:]
        return replace(self, question=question, matching=self.not_matching, not_matching=self.matching)

    def to_dict(self) -> dict[str, Any]:
        """The canonical content used for fingerprints (no provenance)."""
        return {
            "question": self.question,
            "matching": self.matching,
            "not_matching": self.not_matching,
            "options": list(self.options),
        }


@dataclass
class ABDataset:
    """A list of A/B items with a name and the file they came from ("" when built in Python)."""

    items: list[ABItem]
    name: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ABItem]:
        return iter(self.items)

    @overload
    def __getitem__(self, index: int) -> ABItem: ...
    @overload
    def __getitem__(self, index: slice) -> ABDataset: ...
    def __getitem__(self, index: int | slice) -> ABItem | ABDataset:
        if isinstance(index, slice):
            return replace(self, items=self.items[index])
        return self.items[index]

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the items (question, matching, not_matching, options)."""
        return fingerprint([item.to_dict() for item in self.items])

    def split(self, fractions: Sequence[float], seed: int = 0) -> tuple[ABDataset, ...]:
        """Shuffled (seeded), disjoint parts with sizes round(n * fraction) that sum to len(self)."""
        parts = split_indices(len(self.items), fractions, seed)
        return tuple(replace(self, items=[self.items[i] for i in part]) for part in parts)

    def letter_counts(self) -> dict[str, int]:
        """How often each label is the matching one (labels that only ever fail to match count 0)."""
        labels = sorted({item.matching for item in self.items} | {item.not_matching for item in self.items})
        counts = dict.fromkeys(labels, 0)
        for item in self.items:
            counts[item.matching] += 1
        return counts

    def pair_counts(self) -> dict[str, dict[str, int]]:
        """Per unordered label pair ("(A)/(B)"), how often each of the two labels is the matching one."""
        counts: dict[str, dict[str, int]] = {}
        for item in self.items:
            low, high = sorted((item.matching, item.not_matching))
            counts.setdefault(f"{low}/{high}", {low: 0, high: 0})[item.matching] += 1
        return dict(sorted(counts.items()))

    def balance_letters(self, seed: int = 0) -> ABDataset:
        """A copy in which, for each pair of labels, each label is the matching one equally often.

        Items are grouped by their unordered pair {matching, not_matching} ({(A), (B)} for ordinary A/B
        items). Within a group of odd size one seeded-random item is dropped; then a seeded-random subset of
        the majority's items is swapped (`ABItem.swapped`: the two answers' texts trade places in the
        question and the labels follow the texts) until exactly half the group has the lower label as the
        matching one. So two-option items end with "(A)" matching in exactly half of them, and the letter
        identity cancels out of any matching-minus-not-matching mean. Items with more options stay in the
        data (only their two answers trade places). Items whose answer texts cannot be found in the
        question are dropped (with a warning). The item order is kept. Raises a `DataFormatError` when
        no item is left.
        """
        rng = random.Random(seed)
        groups: dict[tuple[str, str], list[int]] = {}
        unswappable = 0
        for i, item in enumerate(self.items):
            if item.swappable:
                pair = (min(item.matching, item.not_matching), max(item.matching, item.not_matching))
                groups.setdefault(pair, []).append(i)
            else:
                unswappable += 1
        keep: set[int] = set()
        swap: set[int] = set()
        for (low, _high), members in sorted(groups.items()):
            members = list(members)
            if len(members) % 2:
                members.remove(rng.choice(members))
            with_low = [i for i in members if self.items[i].matching == low]
            with_high = [i for i in members if self.items[i].matching != low]
            majority = with_low if len(with_low) > len(with_high) else with_high
            swap.update(rng.sample(majority, (len(majority) - len(members) // 2)))
            keep.update(members)
        dropped = len(self.items) - len(keep)
        where = self.source or self.name or "A/B items"
        reasons = []
        if unswappable:
            reasons.append(
                f"{unswappable} without both answers among their option lines (like ' (A) text' after "
                "'Choices:'), so their letters cannot be swapped"
            )
        if dropped > unswappable:
            reasons.append(f"{dropped - unswappable} to make each group of label pairs even")
        why = "; ".join(reasons)
        if not keep:
            raise DataFormatError(
                where,
                f"balancing the answer letters keeps none of the {len(self)} item(s)"
                + (f" ({why})" if why else "")
                + "; it needs two or more items with the same pair of answer labels and their option lines "
                "(or extract without balancing: balance=False, --no-balance)",
            )
        if dropped:
            log.warning(
                "%s: balancing the answer letters dropped %d of %d item(s): %s",
                where,
                dropped,
                len(self),
                why,
            )
        items = [self.items[i].swapped() if i in swap else self.items[i] for i in sorted(keep)]
        return replace(self, items=items)


def _item(path: Path, obj: Any, loc: dict[str, int], source: str, keys: tuple[str, str, str]) -> ABItem:
    """Validate one record and build its ABItem."""
    q_key, m_key, n_key = keys
    question = get_str(path, obj, q_key, loc)
    labels = []
    for key in (m_key, n_key):
        raw = get_str(path, obj, key, loc, allow_empty=True)
        label = normalise_label(raw)
        if label is None:
            raise DataFormatError(path, f'expected an answer label like "(A)", got {raw!r}', field=key, **loc)
        labels.append(label)
    matching, not_matching = labels
    if matching == not_matching:
        raise DataFormatError(path, f"is the same label as {m_key!r} ({matching})", field=n_key, **loc)
    options = parse_options(question)
    for key, label in ((m_key, matching), (n_key, not_matching)):
        if options and label not in options:
            offered = ", ".join(options)
            raise DataFormatError(
                path, f"{label} is not among the choices in the question ({offered})", field=key, **loc
            )
    return ABItem(question, matching, not_matching, options, source)


def _default_name(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def load_caa_json(
    path: str | os.PathLike,
    *,
    question: str = "question",
    matching: str = "answer_matching_behavior",
    not_matching: str = "answer_not_matching_behavior",
    name: str | None = None,
) -> ABDataset:
    """Load a CAA-format file: a JSON list of {question, answer_matching_behavior, answer_not_matching_behavior}.

    Other field names can be given (e.g. CAA's mmlu.json: question="prompt", matching="correct",
    not_matching="incorrect"). Records are numbered from 0 in errors and in `ABItem.source`.
    """
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(
            path, f"expected a JSON list of records at the top level, got {type(data).__name__}"
        )
    if not data:
        raise DataFormatError(path, "the list holds no records")
    keys = (question, matching, not_matching)
    items = [_item(path, obj, {"record": i}, f"{path.name}#record {i}", keys) for i, obj in enumerate(data)]
    return ABDataset(items, name if name is not None else _default_name(path), str(path))


def load_anthropic_jsonl(
    path: str | os.PathLike,
    *,
    question: str = "question",
    matching: str = "answer_matching_behavior",
    not_matching: str = "answer_not_matching_behavior",
    name: str | None = None,
) -> ABDataset:
    """Load Anthropic model-written-evals JSONL: one {question, answer_matching_behavior, ...} per line.

    Answers like " (A)" are normalised to "(A)". Blank lines are skipped; lines count from 1.
    """
    path = Path(path)
    keys = (question, matching, not_matching)
    items = [_item(path, obj, {"line": n}, f"{path.name}:{n}", keys) for n, obj in read_jsonl(path)]
    return ABDataset(items, name if name is not None else _default_name(path), str(path))


def load_ab(path: str | os.PathLike, **fields: str) -> ABDataset:
    """Load A/B items from a .json (CAA) or .jsonl (Anthropic) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return load_caa_json(path, **fields)
    if suffix == ".jsonl":
        return load_anthropic_jsonl(path, **fields)
    raise DataFormatError(
        path, f"unknown A/B file type {suffix!r}: expected .json (CAA) or .jsonl (Anthropic)"
    )


__all__ = [
    "ABDataset",
    "ABItem",
    "load_ab",
    "load_anthropic_jsonl",
    "load_caa_json",
    "normalise_label",
    "option_spans",
    "parse_options",
]
