"""Which parser reads which file: a registry keyed by extension and by known file name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .units import format_bytes

from . import code, docx, pdf, text
from .base import Document, ParseError, ParseLimits, UnsupportedFileType

Parser = Callable[[Path, ParseLimits, str], Document]

# Extension (lower case, with the dot) -> parser.
PARSERS: dict[str, Parser] = {
    ".pdf": pdf.parse,
    ".docx": docx.parse,
    **{extension: text.parse for extension in text.EXTENSIONS},
    **{extension: code.parse for extension in code.LANGUAGES},
}
# Exact file name -> parser, for files whose name says more than their extension.
FILENAME_PARSERS: dict[str, Parser] = {
    **{filename: text.parse for filename in text.FILENAMES},
    **{filename: code.parse for filename in code.FILENAMES},
}
_FILENAMES_LOWER = {filename.lower(): filename for filename in FILENAME_PARSERS}


def parse(path, limits: ParseLimits | None = None, *, name: str | None = None) -> Document:
    """Parse the file at ``path`` into a Document, in this thread.

    ``name`` is the user's original file name; it chooses the parser (stored
    uploads may have safe names) and appears in messages. There is no timeout
    here: ``parsers.pool.ParsePool`` adds one. Raises ParseError, with a
    message a person understands, for anything it refuses.
    """
    limits = limits or ParseLimits()
    path = Path(path)
    name = name or path.name
    parser = parser_for(name)
    check_file(path, limits, name)
    try:
        document = parser(path, limits, name)
    except ParseError:
        raise
    except MemoryError as exc:
        raise ParseError(f"'{name}' is too large to parse in memory.") from exc
    except Exception as exc:  # a parser bug or a library surprise: still a clear error
        raise ParseError(f"'{name}' could not be read ({type(exc).__name__}: {exc}).") from exc
    if len(document.text) > limits.max_chars:  # refused here, in the worker: the text never travels back
        raise limits.too_much_text(name, len(document.text))
    return document


def parser_for(name: str) -> Parser:
    """The parser for a file name; UnsupportedFileType if there is none."""
    base = Path(name).name
    known = _FILENAMES_LOWER.get(base.lower()) or code.known_filename(base)
    if known is not None:
        return FILENAME_PARSERS[known]
    extension = Path(base).suffix.lower()
    if extension in PARSERS:
        return PARSERS[extension]
    kind = f"'{extension}'" if extension else "without an extension"
    raise UnsupportedFileType(
        f"Unsupported file type {kind} ('{base}'). {describe_supported()}")


def check_file(path: Path, limits: ParseLimits, name: str) -> None:
    """Refuse missing, non-regular, empty and over-size files before parsing."""
    try:
        stat = path.stat()
    except FileNotFoundError as exc:
        raise ParseError(f"'{name}' was not found.") from exc
    except OSError as exc:
        raise ParseError(f"'{name}' could not be opened: {exc.strerror}.") from exc
    if not path.is_file():
        raise ParseError(f"'{name}' is not a regular file.")
    if stat.st_size == 0:
        raise ParseError(f"'{name}' is empty.")
    if stat.st_size > limits.max_bytes:
        raise ParseError(
            f"'{name}' is too large ({format_bytes(stat.st_size)}); "
            f"the limit is {format_bytes(limits.max_bytes)}.")
    if not os.access(path, os.R_OK):
        raise ParseError(f"'{name}' could not be opened: permission denied.")


def supported_types() -> list[str]:
    """Supported extensions (sorted), then supported file names (sorted)."""
    return sorted(PARSERS) + sorted(FILENAME_PARSERS)


COMMON_TYPES = (".pdf", ".docx", ".txt", ".md", ".csv", ".json", ".py", ".js", ".ts", ".java", ".c", ".cpp", ".rs",
                ".go", ".html", "Dockerfile")


def describe_supported() -> str:
    """One sentence for error messages: the common file types we read, and how many more."""
    types = supported_types()
    common = [t for t in COMMON_TYPES if t in types]
    return f"Supported: {', '.join(common)} and {len(types) - len(common)} more text and code types."


def is_supported(name: str) -> bool:
    """Whether ``parse`` has a parser for this file name."""
    try:
        parser_for(name)
    except UnsupportedFileType:
        return False
    return True
