"""Constrained decoding: replies that are JSON, or JSON that follows a schema (OpenAI's `response_format`).

A request with a `response_format` gets its own grammar matcher (`Constraint`). Before each token is
drawn, the matcher says which tokens of the vocabulary may come next and every other logit is masked
out; the token drawn is fed back to it. The reply ends as soon as the grammar is complete. The
grammars and matchers are llguidance's (README says why this library: measured on Gemma's 262,144-token
vocabulary, a mask costs ~0.1-0.2 ms a token, and its wheel has no dependencies).

`check_response_format` validates and normalises what a client sends (used by `GenerationParams`, so
every route gets the same 400s); `constraint_for` builds a request's matcher for a loaded model.
"""

from __future__ import annotations

import logging
import re
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

# Whitespace the grammar lets the model put between JSON tokens: one space at most. With JSON's usual
# "any whitespace" (or even a line break and an indent), the bundled base model fills its whole budget
# with runs of spaces and never closes the object.
JSON_WHITESPACE = r"[ ]"
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FIELD = "response_format"


class GrammarError(ValueError):
    """A response_format the server cannot carry out; the message names the field at fault."""


def check_response_format(value) -> dict | None:
    """OpenAI's `response_format`, checked and normalised: None for plain text, else
    `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.

    Raises `GrammarError` naming the field at fault, including a schema keyword that is not supported."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise GrammarError(f"{FIELD}: must be an object with a 'type' of text, json_object or json_schema")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise GrammarError(f"{FIELD}.type: {kind!r} is not supported; use text, json_object or json_schema")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError(f"{FIELD}.json_schema: must be an object with 'name' and 'schema'")
    name, schema, strict = spec.get("name"), spec.get("schema", {}), spec.get("strict", False)
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise GrammarError(f"{FIELD}.json_schema.name: required, 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(schema, dict):
        raise GrammarError(f"{FIELD}.json_schema.schema: must be a JSON Schema object")
    if not isinstance(strict, bool) and strict is not None:
        raise GrammarError(f"{FIELD}.json_schema.strict: must be true or false")
    normalised = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": bool(strict)}}
    _check_grammar(grammar_source(normalised), f"{FIELD}.json_schema.schema")
    return normalised


def grammar_source(response_format: dict) -> str:
    """The llguidance grammar for a normalised response_format."""
    import llguidance

    if response_format["type"] == "json_object":
        schema = {"type": "object"}
    else:
        schema = response_format["json_schema"]["schema"]
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": JSON_WHITESPACE})
    except (ValueError, TypeError, RecursionError) as error:
        raise GrammarError(f"{FIELD}.json_schema.schema: {_short(error)}") from None


def _check_grammar(grammar: str, field: str) -> None:
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, None, limits=_limits())
    if failed:
        raise GrammarError(f"{field}: {_short(messages[0] if messages else 'not supported')}")


def _short(message) -> str:
    """A library's message, cut to a length fit for an error reply."""
    message = str(message).strip()
    return message if len(message) <= 300 else message[:300] + "…"


def _limits():
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)  # errors must not dump the grammar or parser state


class Constraint:
    """One request's grammar matcher: the tokens allowed next, and each token drawn fed back."""

    def __init__(self, matcher, vocab_size: int, stop_ids: list[int]):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def allowed(self, size: int) -> torch.Tensor:
        """A boolean mask over `size` logits: True where the token may come next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        mask = torch.zeros(size, dtype=torch.bool)
        count = min(size, self.vocab_size)
        mask[:count] = torch.from_numpy(bits[:count].view(np.bool_))
        if not mask.any():  # the matcher failed (it never should): let the reply end rather than fail the batch
            log.warning("grammar matcher allows no token (%s); ending the reply", self.matcher.get_error())
            mask[[i for i in self.stop_ids if i < size]] = True
        return mask

    def advance(self, token: int) -> bool:
        """Feed the token drawn; True once the grammar is complete (nothing more may follow)."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the reply left its grammar: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


def request_grammar(params, lm) -> str | None:
    """The grammar a request's reply must follow with the loaded model `lm`: forced tool calls
    (inference/tools.py), else its response_format; None for free text."""
    import llguidance

    if params.tools is not None and params.tools.forced:
        from .tools import forced_grammar

        return llguidance.LLMatcher.grammar_from_lark(forced_grammar(params.tools, lm))
    if params.response_format:
        return grammar_source(params.response_format)
    return None


def constraint_for(lm, grammar: str) -> Constraint:
    """A fresh matcher of `grammar` (llguidance's) for the loaded model `lm`."""
    import llguidance

    tokenizer, vocab_size = _lltokenizer(lm)
    matcher = llguidance.LLMatcher(tokenizer, grammar, limits=_limits())
    if matcher.is_error():
        raise GrammarError(f"{FIELD}: {matcher.get_error()}")
    return Constraint(matcher, vocab_size, sorted(lm.stop_token_ids))


_tokenizer_lock = threading.Lock()


def _lltokenizer(lm):
    """The model's tokenizer as llguidance sees it (bytes of every token), built once per loaded model."""
    with _tokenizer_lock:
        cached = lm.runtime.get("llguidance_tokenizer")
        if cached is None:
            cached = lm.runtime["llguidance_tokenizer"] = build_lltokenizer(lm.tokenizer, sorted(lm.stop_token_ids),
                                                                            _vocab_size(lm))
        return cached


def _vocab_size(lm) -> int:
    config = getattr(lm.model, "config", None)
    config = getattr(config, "text_config", None) or config
    return max(len(lm.tokenizer), getattr(config, "vocab_size", 0) or 0)


def build_lltokenizer(hf_tokenizer, stop_ids: list[int], vocab_size: int):
    """(llguidance tokenizer, vocabulary size) from the model's tokenizer (transformers' or ours).

    llguidance's own `hf.from_tokenizer` re-parses the tokenizer's JSON, which takes ~8 s for Gemma's
    vocabulary here; the token bytes go in directly in ~2 s (tests check both give the same tokens)."""
    import llguidance

    tokens = token_bytes(hf_tokenizer)
    tokens += [b""] * (vocab_size - len(tokens))
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(hf_tokenizer, tokens, stop_ids))
    return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=stop_ids), vocab_size


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: the token bytes, special ids, and a text -> ids function."""

    def __init__(self, hf_tokenizer, tokens: list[bytes], stop_ids: list[int]):
        self.hf_tokenizer, self.tokens = hf_tokenizer, tokens
        self.eos_token_id = stop_ids[0] if stop_ids else hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        self.special_token_ids = [i for i, token in hf_tokenizer.added_tokens_decoder.items() if _special(token)]

    def __call__(self, text):
        if not isinstance(text, str):
            raise TypeError("text only")
        return self.hf_tokenizer.encode(text, add_special_tokens=False)


def token_bytes(hf_tokenizer) -> list[bytes]:
    """The bytes each token stands for. Special tokens (`<eos>`, `<|im_end|>`, and added tokens that look
    like one, `<...>`) get a leading 0xFF, llguidance's convention: a grammar never spells them out as text."""
    pieces = hf_tokenizer.convert_ids_to_tokens(list(range(len(hf_tokenizer))))
    added = hf_tokenizer.added_tokens_decoder
    decoder = getattr(getattr(hf_tokenizer, "backend_tokenizer", None), "decoder", None)  # none: SentencePiece
    byte_level = decoder is not None and "ByteLevel" in decoder.__getstate__().decode("utf-8", "replace")
    unicode_to_byte = {char: byte for byte, char in _bytes_to_unicode().items()}
    out = []
    for token_id, piece in enumerate(pieces):
        if token_id in added and _special(added[token_id]):
            out.append(b"\xff" + added[token_id].content.encode())
        elif token_id in added:
            out.append(added[token_id].content.encode())
        elif piece is None:
            out.append(b"")
        elif byte_level:  # GPT-2's byte-level BPE (Qwen2, Llama 3): each byte drawn as one printable character
            out.append(bytes(unicode_to_byte.get(char, 0x3F) for char in piece))
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece's byte fallback
            out.append(bytes([int(piece[3:5], 16)]))
        else:  # SentencePiece: "▁" stands for a space
            out.append(piece.replace("\u2581", " ").encode())
    return out


def _special(token) -> bool:
    content = token.content
    return token.special or (content.startswith("<") and content.endswith(">"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-character table: printable bytes stand for themselves, the rest move past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
