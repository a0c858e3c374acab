"""SentencePiece merges for `tokenizer.json`, derived in numpy rather than in Python.

A SentencePiece GGUF (Gemma's, Llama 2's) lists no BPE merges; transformers derives them from the
vocabulary one Python string at a time, slow for Gemma's 262k tokens. `derive_merges` returns the
same list, in the same order, several times faster; anything it cannot vouch for returns None and
transformers derives the merges itself.
"""

from __future__ import annotations

import numpy as np


def sentencepiece_merges(architecture: str, tokenizer_dict: dict) -> str | None:
    """The merges transformers would derive for this SentencePiece vocabulary, as `tokenizer.json`'s
    JSON array; None where it derives none.

    A SentencePiece GGUF (Gemma's, Llama 2's) lists no merges, and transformers derives them from
    the vocabulary in Python, one string at a time. This takes the same tokens and
    scores its builders take, and derives the same list with `derive_merges`.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        gemma_tokenizer,
        phi3_tokenizer,
        select_tokenizer_builder,
        sentencepiece_tokenizer,
    )

    if "merges" in tokenizer_dict or tokenizer_dict.get("tokenizer_type") != "llama":
        return None
    builder = select_tokenizer_builder(architecture, "llama")
    tokens = tokenizer_dict.get("tokens") or []
    if builder is gemma_tokenizer:  # the same respelling and scores as `gemma_tokenizer`
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {token: -index for index, token in enumerate(tokens)}
    elif builder in (sentencepiece_tokenizer, phi3_tokenizer) and "scores" in tokenizer_dict:
        scores = dict(zip(tokens, tokenizer_dict["scores"]))
    else:
        return None
    return derive_merges({token: index for index, token in enumerate(tokens)}, scores)


_HASH_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2**64


def derive_merges(vocab: dict[str, int], scores: dict[str, float]) -> str | None:
    """What transformers' `generate_merges(vocab, scores)` returns, in a fraction of its time, as the
    JSON array of `[left, right]` pairs that `tokenizer.json` holds.

    Every cut of a token into two vocabulary tokens is a merge, ordered by the token's score (best
    first), then the longer left piece, then the longer right piece, then the token's place in
    `scores`. Rather than look up all 1.2M cuts in Python, numpy finds the cuts whose two sides are
    tokens: by hash first, then comparing the characters. None where it cannot say (the scores are
    not plain numbers, `vocab` has other tokens, two tokens share a hash): transformers then derives
    the merges itself.
    """
    if vocab.keys() != scores.keys():
        return None
    tokens = list(scores)
    if not tokens:
        return "[]"
    try:
        score = np.array([float(value) for value in scores.values()], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if np.isnan(score).any():
        return None
    try:
        text = _TokenText(tokens)
    except UnicodeEncodeError:  # a lone surrogate: not a string numpy can hold as code points
        return None
    if not text.hashes_unique:
        return None
    cuts_per_token = np.maximum(text.lengths - 1, 0)
    token_of = np.repeat(np.arange(len(tokens)), cuts_per_token)
    cut = np.arange(len(token_of)) - np.repeat(np.cumsum(cuts_per_token) - cuts_per_token, cuts_per_token) + 1
    start = text.starts[token_of]
    middle, end = start + cut, start + text.lengths[token_of]
    both = text.is_token(start, middle)
    both[both] = text.is_token(middle[both], end[both])
    token_of, cut = token_of[both], cut[both]
    order = np.lexsort((token_of, cut - text.lengths[token_of], -cut, -score[token_of]))
    return text.pairs_json(token_of[order], cut[order])


class _TokenText:
    """The tokens joined into one array of code points, to test many substrings for being tokens at once.

    A polynomial hash (mod 2**64) of any substring takes two lookups; a hash that matches a token's
    is then confirmed character by character.
    """

    def __init__(self, tokens: list[str]):
        self.codes = np.frombuffer("".join(tokens).encode("utf-32-le"), dtype="<u4").astype(np.uint64) + 1
        self.lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        self.starts = np.cumsum(self.lengths) - self.lengths
        size = len(self.codes) + 1
        powers = np.full(size, _HASH_BASE, dtype=np.uint64)
        self.inverse_powers = np.full(size, pow(_HASH_BASE, -1, 1 << 64), dtype=np.uint64)
        powers[0] = self.inverse_powers[0] = 1
        powers, self.inverse_powers = np.cumprod(powers), np.cumprod(self.inverse_powers)  # mod 2**64
        self.prefix = np.zeros(size, dtype=np.uint64)
        np.cumsum(self.codes * powers[:-1], out=self.prefix[1:])
        hashes = self.hash(self.starts, self.starts + self.lengths)
        self.by_hash = np.argsort(hashes, kind="stable")
        self.sorted_hashes = hashes[self.by_hash]
        self.hashes_unique = not np.any(self.sorted_hashes[1:] == self.sorted_hashes[:-1])

    def hash(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        return (self.prefix[ends] - self.prefix[starts]) * self.inverse_powers[starts]

    def is_token(self, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Whether each substring [start, end) of the joined text is one of the tokens."""
        hashes = self.hash(starts, ends)
        at = np.minimum(np.searchsorted(self.sorted_hashes, hashes), len(self.sorted_hashes) - 1)
        found = self.sorted_hashes[at] == hashes
        token = self.by_hash[at]
        found &= self.lengths[token] == ends - starts
        sizes = np.where(found, ends - starts, 0)
        first = np.cumsum(sizes) - sizes
        within = np.arange(sizes.sum()) - np.repeat(first, sizes)
        differs = (self.codes[np.repeat(starts, sizes) + within]
                   != self.codes[np.repeat(self.starts[token], sizes) + within])
        found[np.repeat(np.arange(len(sizes)), sizes)[differs]] = False
        return found

    def pairs_json(self, token_of: np.ndarray, cut: np.ndarray, block: int = 1 << 16) -> str:
        """`[["left","right"],...]`: each token `token_of` cut at `cut`, as JSON.

        Assembled from the code points in numpy, `block` pairs at a time: making 1M Python strings
        and serialising them takes three times as long. `"`, `\\` and control characters are
        written as `\\u00XX`.
        """
        chars = (self.codes - 1).astype(np.uint32)
        special = (chars < 0x20) | (chars == ord('"')) | (chars == ord("\\"))
        width = np.where(special, 6, 1)
        escaped = np.repeat(chars, width)
        at = (np.cumsum(width) - width)[special]
        hex_digits = np.array([ord(c) for c in "0123456789abcdef"], dtype=np.uint32)
        for offset, char in enumerate("\\u00"):
            escaped[at + offset] = ord(char)
        escaped[at + 4], escaped[at + 5] = hex_digits[chars[special] >> 4], hex_digits[chars[special] & 15]
        escaped_at = np.concatenate(([0], np.cumsum(width)))  # code point index -> escaped index
        source = np.concatenate((escaped, np.array([ord(c) for c in '["' '","' '"],'], dtype=np.uint32)))
        opening, middle, closing = len(escaped), len(escaped) + 2, len(escaped) + 5
        parts = []
        for first in range(0, len(token_of), block):
            tokens, cuts = token_of[first:first + block], cut[first:first + block]
            begin = escaped_at[self.starts[tokens]]
            split = escaped_at[self.starts[tokens] + cuts]
            end = escaped_at[self.starts[tokens] + self.lengths[tokens]]
            count = len(tokens)
            # five runs of `source` per pair: '["', left, '","', right, '"],'
            run_start = np.stack([np.full(count, opening), begin, np.full(count, middle), split,
                                  np.full(count, closing)], axis=1).ravel()
            run_length = np.stack([np.full(count, 2), split - begin, np.full(count, 3), end - split,
                                   np.full(count, 3)], axis=1).ravel()
            index = np.repeat(run_start - (np.cumsum(run_length) - run_length), run_length)
            index += np.arange(len(index))
            parts.append(source[index].tobytes().decode("utf-32-le")[:-1])  # without the last comma
        return "[" + ",".join(parts) + "]"
