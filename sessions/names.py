"""Ids, titles and file names: small pure helpers with no I/O."""

from __future__ import annotations

import re
import secrets
import unicodedata

LOCAL_USER = "local"
"""The owner of every session when the app runs without ``--auth``."""

DEFAULT_TITLE = "New chat"
MAX_TITLE_CHARS = 200
AUTO_TITLE_CHARS = 40
MAX_FILE_NAME_CHARS = 120
MAX_EXTENSION_CHARS = 10

_ID = re.compile(r"[0-9a-f]{32}")
# Bidirectional overrides can make "evil\u202egnp.exe" display as "evilexe.png".
_BIDI = dict.fromkeys(map(ord, "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))


def new_id() -> str:
    """A 128-bit random id as 32 hex digits (unguessable, safe in a path)."""
    return secrets.token_hex(16)


def is_valid_id(value: object) -> bool:
    """True for strings shaped like :func:`new_id` output; guards every path join."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _printable(text: str) -> str:
    """Control characters (NUL, newlines, ...) become spaces; bidi overrides go."""
    text = text.translate(_BIDI)
    return "".join(" " if unicodedata.category(ch) in ("Cc", "Cs") else ch for ch in text)


def clean_title(title: str) -> str:
    """One line, trimmed, at most 200 characters ("" stays "")."""
    if not isinstance(title, str):
        raise ValueError(f"A session title must be text, not {type(title).__name__}.")
    return " ".join(_printable(title).split())[:MAX_TITLE_CHARS].rstrip()


def title_from_message(content: str) -> str:
    """A title from the first user message: its first ~40 characters, cut at a word."""
    text = clean_title(content[:MAX_TITLE_CHARS * 5])
    if len(text) <= AUTO_TITLE_CHARS:
        return text or DEFAULT_TITLE
    cut = text[:AUTO_TITLE_CHARS]
    if " " in cut[AUTO_TITLE_CHARS // 2:]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" .,;:-") + "…"


def display_file_name(name: str) -> str:
    """A label for an uploaded file: base name only, printable, capped in length.

    The name is never used as a path (uploads get random names), but it is
    shown in the UI and in prompts, so directory parts, control characters and
    bidi tricks are removed and a long name keeps its extension.
    """
    name = _printable(str(name or "")).replace("\\", "/").rsplit("/", 1)[-1]
    name = " ".join(name.split()).strip(" .") or "file"
    if len(name) > MAX_FILE_NAME_CHARS:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:MAX_EXTENSION_CHARS] if dot and stem else ""
        keep = MAX_FILE_NAME_CHARS - len(ext) - 2 if ext else MAX_FILE_NAME_CHARS - 1
        name = (stem if ext else name)[:keep].rstrip() + "…" + (f".{ext}" if ext else "")
    return name


def safe_extension(name: str) -> str:
    """``".pdf"`` for ``"Report.PDF"``; ``""`` unless the extension is short ASCII alphanumerics."""
    base = display_file_name(name)
    stem, dot, ext = base.rpartition(".")
    ext = ext.lower()
    if dot and stem and 0 < len(ext) <= MAX_EXTENSION_CHARS and ext.isascii() and ext.isalnum():
        return "." + ext
    return ""
