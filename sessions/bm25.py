"""Okapi BM25 ranking, small and deterministic.

Chosen over embeddings because it needs no second model on a small CPU box,
gives the same answer every time, and matches code identifiers and exact
terms well. Identifiers also index their parts (``parseHttpHeader`` ->
``parse``, ``http``, ``header``) so "parse header" finds them.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"\w+")
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def tokenize(text: str) -> list[str]:
    """Lowercased words, plus the parts of snake_case and camelCase identifiers."""
    terms: list[str] = []
    for word in _WORD.findall(text):
        terms.append(word.lower())
        parts = _PART.findall(word)
        if len(parts) > 1:
            terms.extend(part.lower() for part in parts)
    return terms


def count_terms(corpus: list[list[str]]) -> list[tuple[Counter, int]]:
    """(term counts, length) of each document: the part of a BM25 index that is per document."""
    return [(Counter(doc), len(doc)) for doc in corpus]


class BM25:
    """Score a fixed corpus of token lists against queries."""

    def __init__(self, corpus: list[list[str]], k1: float = 1.5, b: float = 0.75,
                 counted: list[tuple[Counter, int]] | None = None):
        """`counted`: the corpus as (term counts, length) per document, already counted (then `corpus`
        is ignored): what a caller keeps per document between queries."""
        self.k1, self.b = k1, b
        counted = counted if counted is not None else count_terms(corpus)
        self.freqs = [freq for freq, _ in counted]
        self.lengths = [length for _, length in counted]
        self.avg_length = (sum(self.lengths) / len(counted)) if counted else 0.0
        df = Counter(term for freq in self.freqs for term in freq)
        n = len(counted)
        # The "+1" form of idf stays positive for terms in most documents.
        self.idf = {t: math.log((n - d + 0.5) / (d + 0.5) + 1.0) for t, d in df.items()}

    def scores(self, query: list[str]) -> list[float]:
        """One score per corpus document; 0.0 where no query term occurs."""
        terms = [t for t in dict.fromkeys(query) if t in self.idf]
        out = []
        for freq, length in zip(self.freqs, self.lengths):
            norm = self.k1 * (1 - self.b + self.b * length / (self.avg_length or 1.0))
            score = 0.0
            for term in terms:
                tf = freq.get(term, 0)
                if tf:
                    score += self.idf[term] * tf * (self.k1 + 1) / (tf + norm)
            out.append(score)
        return out
