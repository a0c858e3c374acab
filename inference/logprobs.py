"""Per-token log probabilities, for the requests that ask for them (OpenAI's `logprobs`).

The decode loop hands a request that asks the row's logits; `sampling.token_logprobs` takes the
chosen token's log probability and the best alternatives' from the model's own distribution (the
log-softmax of the raw logits, before penalties, temperature, top-k and top-p), and `TokenTexts`
names each token as OpenAI does: its text and its exact UTF-8 bytes (a token that is only part of
a character, such as one byte of an emoji, has bytes that do not decode alone; its text is then
written `bytes:\\xf0\\x9f`, as OpenAI writes such tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass
class TokenLogprob:
    """One token as the API reports it: text, bytes, log probability, and the best alternatives there."""

    token: str
    bytes: list[int]
    logprob: float
    top: list["TokenLogprob"] = field(default_factory=list)

    def to_openai(self, with_top: bool = True) -> dict:
        entry = {"token": self.token, "logprob": self.logprob, "bytes": self.bytes}
        if with_top:
            entry["top_logprobs"] = [alt.to_openai(with_top=False) for alt in self.top]
        return entry


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character that byte-level BPE (GPT-2's scheme) writes for each byte, inverted:
    printable Latin-1 bytes stand for themselves, the others for 256 + their rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + rank): b for rank, b in enumerate(others)})
    return table


class TokenTexts:
    """Each token id's exact bytes and text for one tokenizer, computed once per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = _is_byte_level(tokenizer)
        self._alphabet = _byte_level_alphabet() if self._byte_level else {}
        self._specials = set(getattr(tokenizer, "all_special_tokens", []) or [])

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._bytes(token_id)
            cached = self._cache[token_id] = (_text_of(raw), list(raw))
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(piece, str):
            return b""
        if piece in self._specials:
            return piece.encode()
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:  # sentencepiece's byte fallback
            return bytes([int(byte.group(1), 16)])
        if self._byte_level and all(char in self._alphabet for char in piece):
            return bytes(self._alphabet[char] for char in piece)
        return piece.replace("\u2581", " ").encode()  # sentencepiece writes a space as U+2581


def _text_of(raw: bytes) -> str:
    """A token's text; one that is only part of a character is written as its bytes, `bytes:\\xe2\\x80`,
    as OpenAI writes such tokens."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"
