"""Plain-text files: read, detect the encoding, refuse binary data.

The decoding here is shared with the code parser (``parsers.code``).
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from .units import format_bytes

from .base import Document, ParseError, ParseLimits

EXTENSIONS = (
    ".txt", ".text", ".md", ".markdown", ".rst", ".adoc", ".org",
    ".csv", ".tsv", ".json", ".jsonl", ".ndjson", ".log", ".xml",
    ".yaml", ".yml", ".ini", ".cfg", ".conf", ".properties", ".env",
    ".srt", ".vtt", ".tex", ".bib",
)
FILENAMES = (
    "README", "LICENSE", "LICENCE", "COPYING", "CHANGELOG", "AUTHORS",
    "NOTICE", "CONTRIBUTORS", ".gitignore", ".gitattributes",
    ".dockerignore", ".editorconfig",
)

# Longest BOMs first: the UTF-32-LE BOM starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# Unicode control characters (category Cc) except those ordinary text
# contains: tab, newlines, form feed, vertical tab and ESC (coloured logs).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")
_MAX_CONTROL_RATIO = 0.05
_MAX_REPLACEMENT_RATIO = 0.10


def parse(path: Path, limits: ParseLimits, name: str) -> Document:
    """Parse a plain-text file into a Document with ``format`` "text"."""
    text, encoding = read_text(path, limits, name)
    return Document(text, {"format": "text", "name": name, "encoding": encoding})


def read_text(path: Path, limits: ParseLimits, name: str) -> tuple[str, str]:
    """Read and decode a text file; return (text with "\\n" newlines, encoding).

    Raises ParseError for an empty file, a binary file, or one over the size limit.
    """
    data = read_bytes(path, limits, name)
    text, encoding = decode(data, name)
    check_not_binary(text, name)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise ParseError(f"'{name}' is empty: it contains only whitespace.")
    return text, encoding


def read_bytes(path: Path, limits: ParseLimits, name: str) -> bytes:
    """Read a whole file, but never more than ``limits.max_bytes``."""
    with open(path, "rb") as f:
        data = f.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise ParseError(
            f"'{name}' is too large: the limit is {format_bytes(limits.max_bytes)}.")
    if not data:
        raise ParseError(f"'{name}' is empty.")
    return data


def decode(data: bytes, name: str) -> tuple[str, str]:
    """Decode bytes to text; never raises UnicodeDecodeError.

    Order: a byte-order mark, strict UTF-8, charset-normalizer's best guess,
    then UTF-8 with replacement characters. NUL bytes without a BOM mean
    binary data (or BOM-less UTF-16, which is recognised).
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace"), encoding
    if b"\x00" in data:
        encoding = guess_bomless_utf16(data)
        if encoding is None:
            raise ParseError(_binary_message(name))
        return data.decode(encoding, errors="replace"), encoding
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    guessed = _detect_encoding(data)
    if guessed is not None:
        return guessed
    return data.decode("utf-8", errors="replace"), "utf-8 (with replacements)"


def guess_bomless_utf16(data: bytes) -> str | None:
    """Recognise UTF-16 without a BOM: mostly-ASCII text has a NUL in every other byte."""
    sample = data[:4096]
    if len(sample) < 4:
        return None
    even_nuls = sample[0::2].count(0) / len(sample[0::2])
    odd_nuls = sample[1::2].count(0) / len(sample[1::2])
    if odd_nuls > 0.7 and even_nuls < 0.05:
        return "utf-16-le"
    if even_nuls > 0.7 and odd_nuls < 0.05:
        return "utf-16-be"
    return None


def _detect_encoding(data: bytes) -> tuple[str, str] | None:
    """Ask charset-normalizer (imported here: it is only needed for non-UTF-8 files)."""
    import charset_normalizer

    best = charset_normalizer.from_bytes(data).best()
    if best is None:
        return None
    return str(best), best.encoding


def check_not_binary(text: str, name: str) -> None:
    """Refuse text that is mostly control or replacement characters."""
    sample = text[:1_000_000]
    if not sample:
        return
    controls = len(_CONTROL.findall(sample))
    replacements = sample.count("\ufffd")
    if (controls / len(sample) > _MAX_CONTROL_RATIO
            or replacements / len(sample) > _MAX_REPLACEMENT_RATIO):
        raise ParseError(_binary_message(name))


def _binary_message(name: str) -> str:
    return f"'{name}' looks like a binary file, not text, so it cannot be read as text."
