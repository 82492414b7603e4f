"""Keyword counts: how often words of a list occur in texts, case-insensitive and as whole words."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steerlab.errors import UserError

WORD = re.compile(r"\w+(?:['’]\w+)*")
"""A word, for the per-100-words rate: letters and digits, joined by inner apostrophes ("don't"); hyphens
separate words, as they separate a keyword from its neighbours ("wedding" counts in "wedding-cake")."""


@dataclass(frozen=True)
class KeywordCounts:
    """Per text (N) and keyword (K): occurrences, the total, the number of words and the rate per 100 words."""

    keywords: list[str]
    per_keyword: torch.Tensor  # (N, K) int64
    n_words: torch.Tensor  # (N,) int64

    @property
    def counts(self) -> torch.Tensor:
        """(N,) occurrences of any keyword (a phrase and a word inside it both count)."""
        return self.per_keyword.sum(-1)

    @property
    def per_100_words(self) -> torch.Tensor:
        """(N,) float64 occurrences per 100 words (0 for a text without words)."""
        return torch.where(self.n_words > 0, 100.0 * self.counts / self.n_words.clamp(min=1), 0.0).double()


def _pattern(keyword: str) -> re.Pattern:
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def keyword_counts(texts: Sequence[str], keywords: Sequence[str]) -> KeywordCounts:
    """Count each keyword (a word or a phrase; case-insensitive, whole words only) in each text.

    "wed" does not count inside "wedding"; list inflections ("wedding", "weddings") separately.
    """
    if isinstance(texts, str):
        raise UserError("keyword_counts: expected a list of texts, got one string")
    if isinstance(keywords, str) or not keywords:
        raise UserError("keywords: expected a non-empty list of words")
    for i, word in enumerate(keywords):
        if not isinstance(word, str) or not word.strip():
            raise UserError(f"keywords[{i}]: expected a non-empty string, got {word!r}")
    patterns = [_pattern(word) for word in keywords]
    counts = [[len(p.findall(text)) for p in patterns] for text in texts]
    n_words = [len(WORD.findall(text)) for text in texts]
    return KeywordCounts(
        [w.strip() for w in keywords],
        torch.tensor(counts, dtype=torch.long).reshape(len(texts), len(keywords)),
        torch.tensor(n_words, dtype=torch.long),
    )
