"""Incremental detokenization: text deltas per token, never splitting a multi-byte character."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing token list a small window at a time.

    Each step decodes only the tokens since the last emitted boundary (plus a few before it for
    context, since SentencePiece drops a leading space when decoding a lone token), so the cost per
    token stays constant however long the reply grows. Text ending in U+FFFD is held back until the
    rest of the character's bytes arrive.

    The context window always starts at an earlier emission boundary, never at a fixed count of
    tokens back: a byte-fallback decoder (Gemma, Llama 2) turns a byte run that starts mid-character
    into one U+FFFD per byte, swallowing the valid bytes after it (a newline after an emoji).
    """

    CONTEXT = 4

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this are already emitted
        self._boundaries = [0]  # recent read offsets, each at a whole-character boundary

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def _advance(self) -> None:
        """Mark everything so far as emitted and move the context window along."""
        self.read_offset = len(self.tokens)
        self._boundaries.append(self.read_offset)
        while len(self._boundaries) > 1 and self._boundaries[1] <= self.read_offset - self.CONTEXT:
            self._boundaries.pop(0)
        self.prefix_offset = self._boundaries[0]

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (may be "")."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix):]
        self._advance()
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character becomes U+FFFD)."""
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        self._advance()
        return full[len(prefix):] if len(full) > len(prefix) else ""
