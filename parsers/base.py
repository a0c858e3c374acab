"""Shared types of the parsers package: the parsed Document, the error, the limits."""

from __future__ import annotations

from dataclasses import dataclass, field


class ParseError(Exception):
    """A file could not be parsed; ``str(error)`` is a message a person understands."""


class UnsupportedFileType(ParseError):
    """The file's name matches no registered parser."""


@dataclass(frozen=True)
class Document:
    """The text of one parsed file and what is known about it.

    ``metadata`` always holds ``format`` ("pdf", "docx", "text" or "code") and
    ``name``; pdf adds ``pages`` (``{"page", "start", "end"}`` character offsets
    into ``text``) and ``page_count``; text and code add ``encoding``; code adds
    ``language`` (a Markdown fence label such as "python").
    """

    text: str
    metadata: dict = field(default_factory=dict)


TEXT_CHARS_PER_UPLOAD_BYTE = 4  # a file's text is at most this many characters per byte of --max-upload


@dataclass(frozen=True)
class ParseLimits:
    """What a parse may cost before it is refused."""

    max_bytes: int = 50 * 1024 * 1024
    max_pages: int = 2000
    max_docx_uncompressed: int = 200 * 1024 * 1024
    # Text a document may hold once extracted: a few hundred KB of PDF or DOCX can expand to hundreds of
    # millions of characters (one content stream drawn on every page, repeated runs), which every chat
    # turn would then tokenize. 5 M characters is about 2,500 pages of prose.
    max_chars: int = 5_000_000
    timeout_s: float = 60.0

    def too_much_text(self, name: str, chars: int, complete: bool = True) -> "ParseError":
        """The error for a document over `max_chars` (`complete`: `chars` is its whole text, not a part)."""
        holds = f"holds {chars:,}" if complete else f"holds more than {chars:,}"
        return ParseError(f"'{name}' {holds} characters of text; the limit is {self.max_chars:,}. "
                          "Split it, or upload the part you need.")

    def __post_init__(self):
        for key in ("max_bytes", "max_pages", "max_docx_uncompressed", "max_chars", "timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"ParseLimits.{key} must be positive, got {getattr(self, key)!r}")

    @classmethod
    def for_uploads(cls, max_bytes: int, **others) -> "ParseLimits":
        """The limits for uploads of at most `max_bytes` (--max-upload), which two of them follow:

        - the text of one file: at most 4 characters per byte of the largest upload, and never more than
          5,000,000 (`min(5,000,000, 4 x --max-upload)`): text and code give at most one character per byte,
          a .docx or a PDF compresses its text 3-4:1, so only expansion beyond that is refused;
        - the .docx expansion cap: Word's XML deflates about 10:1, so 20x the largest upload, between
          16 MiB and 200 MiB.
        """
        expansion = min(cls.max_docx_uncompressed, max(16 * 2**20, 20 * max_bytes))
        chars = min(cls.max_chars, TEXT_CHARS_PER_UPLOAD_BYTE * max_bytes)
        return cls(max_bytes=max_bytes, max_docx_uncompressed=expansion, **{"max_chars": chars, **others})

    def to_dict(self) -> dict:
        """The limits as a plain dict (what travels to a worker process)."""
        return {
            "max_bytes": self.max_bytes,
            "max_pages": self.max_pages,
            "max_docx_uncompressed": self.max_docx_uncompressed,
            "max_chars": self.max_chars,
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ParseLimits":
        """Build limits from a dict; unknown keys are an error, not silently dropped."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ParseLimits keys: {', '.join(sorted(unknown))}")
        return cls(**data)
