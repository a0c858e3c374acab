"""PDF files, with pymupdf: text per page, page offsets kept for citations.

pymupdf is imported inside ``parse`` only, so importing ``parsers`` stays
instant. pymupdf is not thread-safe: the app runs this parser in worker
processes (``parsers.pool``), one parse per process.
"""

from __future__ import annotations

from pathlib import Path

from .base import Document, ParseError, ParseLimits

PAGE_SEPARATOR = "\n\n"
# A complete PDF ends with "%%EOF" (some writers append a little padding).
_EOF_MARKER = b"%%EOF"
_TAIL_BYTES = 4096


def parse(path: Path, limits: ParseLimits, name: str) -> Document:
    """Parse a PDF into a Document with ``format`` "pdf", ``pages`` and ``page_count``."""
    check_complete(path, name)
    import pymupdf

    pymupdf.TOOLS.mupdf_display_errors(False)
    pymupdf.TOOLS.mupdf_display_warnings(False)
    try:
        doc = pymupdf.open(path, filetype="pdf")
    except Exception as exc:  # pymupdf raises FileDataError, RuntimeError, ...
        raise ParseError(f"'{name}' is not a valid PDF: it is corrupt or truncated.") from exc
    with doc:
        check_openable(doc, limits, name)
        page_texts = extract_pages(doc, name, limits)
    return build_document(page_texts, name)


def check_complete(path: Path, name: str) -> None:
    """Refuse files without a PDF header or without the closing %%EOF.

    MuPDF silently repairs a truncated PDF and returns only its first pages;
    a user would get a partial answer without knowing it, so refuse instead.
    """
    with open(path, "rb") as f:
        head = f.read(1024)
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
    if b"%PDF-" not in head:
        raise ParseError(f"'{name}' is not a valid PDF: it has no PDF header.")
    if _EOF_MARKER not in tail:
        raise ParseError(f"'{name}' looks truncated or corrupt: the end of the PDF is missing.")


def check_openable(doc, limits: ParseLimits, name: str) -> None:
    """Refuse password-protected, empty and over-long documents before reading pages."""
    if doc.needs_pass:
        raise ParseError(f"'{name}' is password-protected; remove the password and upload it again.")
    if doc.page_count == 0:
        raise ParseError(f"'{name}' is not a valid PDF: it has no pages.")
    if doc.page_count > limits.max_pages:
        raise ParseError(
            f"'{name}' has {doc.page_count} pages; the limit is {limits.max_pages} pages.")


def extract_pages(doc, name: str, limits: ParseLimits) -> list[str]:
    """The text of every page, in order; refused as soon as it passes `limits.max_chars` (a small PDF can
    draw one huge content stream on each of its pages: reading them all first would take minutes)."""
    texts, total = [], 0
    for number, page in enumerate(doc, start=1):
        try:
            texts.append(page.get_text("text").strip())
        except Exception as exc:
            raise ParseError(f"'{name}' is corrupt: page {number} could not be read.") from exc
        total += len(texts[-1]) + len(PAGE_SEPARATOR)
        if total > limits.max_chars + len(PAGE_SEPARATOR):
            raise limits.too_much_text(name, total - len(PAGE_SEPARATOR), complete=number == doc.page_count)
    if not any(texts):
        raise ParseError(
            f"'{name}' has no extractable text: it may be a scanned document "
            "(images only). Run OCR on it and upload the result.")
    return texts


def build_document(page_texts: list[str], name: str) -> Document:
    """Join page texts and record where each page starts and ends in the result."""
    parts, pages, offset = [], [], 0
    for number, page_text in enumerate(page_texts, start=1):
        if parts:
            parts.append(PAGE_SEPARATOR)
            offset += len(PAGE_SEPARATOR)
        parts.append(page_text)
        pages.append({"page": number, "start": offset, "end": offset + len(page_text)})
        offset += len(page_text)
    metadata = {"format": "pdf", "name": name, "pages": pages, "page_count": len(page_texts)}
    return Document("".join(parts), metadata)
