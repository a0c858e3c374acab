"""Gemma's tokenizer as a SentencePiece model built from the GGUF's own vocabulary.

A Gemma GGUF lists its 262,144 tokens in merge order but no merges. transformers' builder derives
514,906 BPE merges from the vocabulary for `tokenizers`: ~4.6 s to load and ~290 MiB resident. The same
tokens, in the same order, as a SentencePiece BPE model give the same token ids (sentencepiece merges the
adjacent pair whose result ranks best, the rule the derived merges encode) in ~0.15 s and ~50 MiB.

What transformers adds on top is kept: the file's CONTROL tokens (`<bos>`, `<start_of_turn>`,
`<unused12>`) are special and USER_DEFINED ones (`\\n\\n`, `<b>`) plain added tokens, both matched whole
in the text before the rest is encoded, leftmost-longest; decoding drops special tokens on request,
turns "▁" into a space and byte tokens back into bytes (a run that is not valid UTF-8 becomes one
U+FFFD per byte). `SentencePieceTokenizer` answers the part of transformers' tokenizer interface the
engine uses (README, "Tokenizers"); tests/test_spm_tokenizer.py checks it against `tokenizers`' build.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat_template import render_chat

MODEL_FILE = "tokenizer.model"  # the SentencePiece ModelProto
CONFIG_FILE = "tokenizer_config.json"
SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # sentencepiece's (and GGUF's) token types
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def applies_to(header) -> bool:
    """Whether `header`'s tokenizer is built here: Gemma's SentencePiece vocabularies (other SentencePiece
    families differ in prefix-space handling and keep transformers' build)."""
    meta = header.metadata
    return (meta.get("tokenizer.ggml.model") == "llama" and header.architecture.startswith("gemma")
            and "tokenizer.ggml.tokens" in meta and "tokenizer.ggml.token_type" in meta  # (not read: large)
            and meta.get("tokenizer.ggml.unknown_token_id") is not None)


# ----- building the model from the GGUF ------------------------------------------------------------
def write_tokenizer(header, folder: Path) -> None:
    """Write `tokenizer_config.json` and `tokenizer.model` for `header` (see `applies_to`) into `folder`;
    the model last and renamed into place, so a folder with one has both whole."""
    proto, config = build_model(header)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    partial = folder / (MODEL_FILE + ".partial")
    partial.write_bytes(proto)
    os.replace(partial, folder / MODEL_FILE)


def model_problem(folder: Path) -> str | None:
    """Why `folder`'s `tokenizer.model` cannot be used (cut short), or None; cheap: its last bytes."""
    path = folder / MODEL_FILE
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - len(_NORMALIZER)))
        return None if handle.read() == _NORMALIZER else f"{MODEL_FILE} is cut short"


def build_model(header) -> tuple[bytes, dict]:
    """(SentencePiece ModelProto bytes, tokenizer config) from a Gemma GGUF's tokenizer metadata.

    Whitespace tokens the file spells with spaces are respelled with "▁" and ranked by their place in
    the file, as transformers' `gemma_tokenizer` does; control tokens are special, user-defined ones
    that are not whitespace are plain added tokens (`add_gguf_special_tokens`)."""
    meta = header.metadata
    raw = list(meta["tokenizer.ggml.tokens"])
    types = list(meta["tokenizer.ggml.token_type"])
    tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in raw]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    if unk is None or not 0 <= unk < len(tokens):
        raise ValueError("the file names no unknown token, which a SentencePiece model needs")
    special = [i for i, kind in enumerate(types) if kind == CONTROL]
    plain = [i for i, kind in enumerate(types) if kind == USER_DEFINED and tokens[i] == raw[i]]
    piece_types = [NORMAL if kind not in (CONTROL, BYTE) else kind for kind in types]
    for i in plain:
        piece_types[i] = USER_DEFINED
    piece_types[unk] = UNKNOWN
    pieces = _pieces(tokens, piece_types)
    ids = {name: meta.get(f"tokenizer.ggml.{key}") for name, key in
           (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"), ("pad", "padding_token_id"))}
    trainer = (_varint_field(3, 2) + _varint_field(4, len(tokens)) + _varint_field(35, 1)  # BPE, byte fallback
               + b"".join(_varint_field(number, -1 if ids[name] is None else ids[name])
                          for number, name in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad"))))
    proto = pieces + _bytes_field(2, trainer) + _NORMALIZER
    config = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        **{f"{name}_token": tokens[i] if i is not None and i < len(tokens) else None for name, i in ids.items()},
        "special_ids": special, "plain_ids": plain,
    }
    return proto, config


def _normalizer() -> bytes:
    """No NFKC, no dummy prefix, spaces kept as they are and written as "▁". The model's last field."""
    spec = _bytes_field(1, b"identity") + _varint_field(3, 0) + _varint_field(4, 0) + _varint_field(5, 1)
    return _bytes_field(3, spec)


def _pieces(tokens: list[str], kinds: list[int]) -> bytes:
    """ModelProto's repeated `pieces` field: (piece, score = minus the rank, type) for every token."""
    scores = (-np.arange(len(tokens), dtype="<f4")).tobytes()
    out = []
    for rank, (token, kind) in enumerate(zip(tokens, kinds)):
        text = token.encode("utf-8")
        body = b"\x0a" + _varint(len(text)) + text + b"\x15" + scores[4 * rank:4 * rank + 4] + b"\x18" + bytes((kind,))
        out.append(b"\x0a" + _varint(len(body)) + body)
    return b"".join(out)


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return bytes((value,))
    value &= (1 << 64) - 1  # protobuf writes a negative int32 as its 64-bit two's complement
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


_NORMALIZER = _normalizer()


# ----- the tokenizer -------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddedToken:
    """What the engine reads of transformers' `AddedToken`."""

    content: str
    special: bool


class SentencePieceTokenizer:
    """Encode, decode and render chats with a SentencePiece model and the file's added tokens."""

    chat_template = None  # the chat format (models/templates.py) always passes its template

    def __init__(self, proto: bytes, config: dict):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        self._size = self._sp.get_piece_size()
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.special_ids = frozenset(config.get("special_ids", ()))
        self.added_tokens_decoder = {
            i: AddedToken(self._sp.id_to_piece(i), i in self.special_ids)
            for i in sorted({*self.special_ids, *config.get("plain_ids", ())})
        }
        self._added = {token.content: i for i, token in self.added_tokens_decoder.items()}
        self._matcher = AddedTokens(self._added)
        self.special_tokens_map = {f"{name}_token": config[f"{name}_token"]
                                   for name in ("bos", "eos", "unk", "pad") if config.get(f"{name}_token")}
        for name in ("bos", "eos", "unk", "pad"):
            token = config.get(f"{name}_token")
            setattr(self, f"{name}_token", token)
            setattr(self, f"{name}_token_id", self.token_to_id(token) if token else None)
        self.all_special_tokens = list(self.special_tokens_map.values())

    @classmethod
    def from_folder(cls, folder: Path) -> SentencePieceTokenizer:
        return cls((folder / MODEL_FILE).read_bytes(), json.loads((folder / CONFIG_FILE).read_text()))

    def __len__(self) -> int:
        return self._size

    # encoding
    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        start = 0
        for begin, end, token_id in self._matcher.find(text):
            if begin > start:
                ids += self._sp.encode(text[start:begin])
            ids.append(token_id)
            start = end
        if start < len(text):
            ids += self._sp.encode(text[start:])
        if add_special_tokens and self.add_eos_token and self.eos_token_id is not None:
            ids.append(self.eos_token_id)
        return ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one token as the vocabulary spells it, or None."""
        if token in self._added:
            return self._added[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if token_id != self._sp.unk_id() or token == self._sp.id_to_piece(token_id) else None

    # decoding
    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._sp.id_to_piece(ids) if 0 <= ids < self._size else None
        return [self.convert_ids_to_tokens(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        parts: list[str] = []
        run = bytearray()  # consecutive byte tokens, decoded together
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self._size or (skip_special_tokens and token_id in self.special_ids):
                continue
            piece = self._sp.id_to_piece(token_id)
            byte = _BYTE_PIECE.fullmatch(piece) if self._sp.is_byte(token_id) else None
            if byte:
                run.append(int(byte.group(1), 16))
                continue
            if run:
                parts.append(_decode_run(run))
                run.clear()
            parts.append(piece.replace(SPACE, " "))
        if run:
            parts.append(_decode_run(run))
        return "".join(parts)

    # chats
    def apply_chat_template(self, conversation: list[dict], chat_template: str | None = None, tools=None,
                            add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        """The chat rendered as transformers' tokenizers render it (models/chat_template.py), with the
        same variables they pass."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template")
        messages = [{key: value for key, value in message.items() if value is not None} for message in conversation]
        rendered = render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               **{**self.special_tokens_map, **kwargs})
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered


def _decode_run(run: bytearray) -> str:
    """Byte tokens back into text; a run that is not UTF-8 becomes one U+FFFD per byte, as `tokenizers`'
    ByteFallback decoder writes it (the incremental detokenizer holds such text back)."""
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class AddedTokens:
    """Finds added tokens in a text: the leftmost first, the longest where several start at one place,
    as `tokenizers` matches them.

    One regex shaped as a trie (Python's `re` tries an alternation branch by branch, and 6,000 flat
    branches at every '<' and newline are slow); numbered families of tokens (Gemma's `<unused0>` ..
    `<unused6241>`) are matched by one `<unused[0-9]+>` and checked against the set, since their trie alone
    takes ~0.1 s to compile."""

    FAMILY = 64  # members a numbered family needs to be matched by its shape

    def __init__(self, tokens: dict[str, int]):
        self.ids = tokens
        shapes: dict[str, list[str]] = {}
        for token in tokens:
            shapes.setdefault(_NUMBER.sub("\0", token), []).append(token)
        families = {shape for shape, members in shapes.items() if len(members) >= self.FAMILY and shape.count("\0") == 1}
        rest = [token for shape, members in shapes.items() if shape not in families for token in members]
        family = "|".join("[0-9]+".join(map(re.escape, shape.split("\0"))) for shape in sorted(families))
        trie = _trie_pattern(rest) if rest else ""
        self.rest = re.compile(trie) if trie else None
        pattern = "|".join(part for part in (f"(?P<family>{family})" if family else "", trie) if part)
        self.pattern = re.compile(pattern) if pattern else None

    def find(self, text: str):
        """(start, end, id) of each added token in `text`, in order."""
        pos = 0
        while self.pattern is not None and (match := self.pattern.search(text, pos)) is not None:
            start, found = match.start(), match.group()
            if match.lastgroup == "family":  # a number outside the family, or a longer token of the rest
                other = self.rest.match(text, start) if self.rest else None
                if other and (found not in self.ids or other.end() > match.end()):
                    found = other.group()
            if found not in self.ids:
                pos = start + 1
                continue
            yield start, start + len(found), self.ids[found]
            pos = start + len(found)


_NUMBER = re.compile("[0-9]+")


def _trie_pattern(words) -> str:
    """A regex matching any of `words`, the longest first at each position."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = [re.escape(char) + emit(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return emit(trie)
