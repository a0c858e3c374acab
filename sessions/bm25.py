"""Okapi BM25 ranking, small and deterministic.

Chosen over embeddings because it needs no second model on a small CPU box,
gives the same answer every time, and matches code identifiers and exact
terms well. Identifiers also index their parts (``parseHttpHeader`` ->
``parse``, ``http``, ``header``) so "parse header" finds them.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter

_WORD = re.compile(r"\w+")
_PART = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def tokenize(text: str) -> list[str]:
    """Lowercased words, plus the parts of snake_case and camelCase identifiers."""
    terms: list[str] = []
    for word in _WORD.findall(text):
        lower = word.lower()
        terms.append(lower)
        if lower.isalpha() and word[1:] == lower[1:]:  # a plain word (or Capitalized): it has no parts
            continue
        parts = _PART.findall(word)
        if len(parts) > 1:
            terms.extend(part.lower() for part in parts)
    return terms


class Postings:
    """The BM25 index of one document's chunks, kept between queries: for each term, the chunks it occurs in
    and how often, and each chunk's length, in arrays (compact, and nothing for the garbage collector to
    walk). Indexes of several documents are scored together by :func:`bm25_scores`."""

    def __init__(self, corpus: list[list[str]]):
        self.lengths = array("I", (len(doc) for doc in corpus))
        self.total_length = sum(self.lengths)
        self.postings: dict[str, tuple[array, array]] = {}
        for index, doc in enumerate(corpus):
            for term, tf in Counter(doc).items():
                entry = self.postings.get(term)
                if entry is None:
                    entry = self.postings[term] = (array("I"), array("I"))
                entry[0].append(index)
                entry[1].append(tf)

    def __len__(self) -> int:
        return len(self.lengths)


def bm25_scores(indexes: list[Postings], query: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25: one score per chunk of `indexes` (in order, one document after the other), the chunks of
    all of them taken as one corpus; 0.0 where no query term occurs. The work grows with the chunks that
    hold a query term, not with all of them. The "+1" form of idf stays positive for terms in most chunks."""
    n = sum(len(index) for index in indexes)
    avg_length = (sum(index.total_length for index in indexes) / n) if n else 0.0
    scores = [0.0] * n
    for term in dict.fromkeys(query):
        df = sum(len(index.postings[term][0]) for index in indexes if term in index.postings)
        if not df:
            continue
        idf = math.log((n - df + 0.5) / (df + 0.5) + 1.0)
        offset = 0
        for index in indexes:
            entry = index.postings.get(term)
            if entry is not None:
                for chunk, tf in zip(*entry):
                    norm = k1 * (1 - b + b * index.lengths[chunk] / (avg_length or 1.0))
                    scores[offset + chunk] += idf * tf * (k1 + 1) / (tf + norm)
            offset += len(index)
    return scores
