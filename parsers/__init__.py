"""File -> Document: the text of uploaded documents and source files.

    >>> import parsers
    >>> doc = parsers.parse("report.pdf")          # raises parsers.ParseError
    >>> doc.text, doc.metadata["pages"]

Parsing off the caller's thread, with a timeout: ``parsers.pool.ParsePool``.
Importing this package is instant: pymupdf, docx2txt and charset-normalizer
are imported by the parser that needs them, when it runs.
"""

from .base import Document, ParseError, ParseLimits, UnsupportedFileType
from .registry import describe_supported, is_supported, parse, supported_types

__all__ = [
    "Document",
    "ParseError",
    "ParseLimits",
    "UnsupportedFileType",
    "describe_supported",
    "is_supported",
    "parse",
    "supported_types",
]
