"""Split a document into labelled passages (chunks) that a model can cite.

Chunks follow line boundaries (a line longer than a chunk is cut at spaces),
never cross a PDF page, and carry a label such as ``[report.pdf, page 3]``
or ``[main.py, lines 40-82]``. Code is fenced with its language.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Passage:
    """One citable piece of a document, rendered with its label."""

    doc_index: int
    index: int
    text: str  # label + body, ready for the prompt
    body: str  # the document text alone (what retrieval scores)


def fence(body: str, language: str) -> str:
    """Wrap code in a Markdown fence longer than any backtick run inside it."""
    longest, run = 0, 0
    for ch in body:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{language}\n{body}\n{ticks}"


def render(label: str, body: str, language: str = "") -> str:
    """``[label]`` on its own line, then the body (fenced when it is code)."""
    return f"[{label}]\n{fence(body, language) if language else body}"


def page_spans(text: str, metadata: dict) -> list[tuple[object, int, int]]:
    """``(page, start, end)`` from ``metadata["pages"]``; [] if absent or malformed."""
    spans = []
    for entry in metadata.get("pages") or []:
        try:
            start, end = int(entry["start"]), int(entry["end"])
            page = entry["page"]
        except (KeyError, TypeError, ValueError):
            return []
        if 0 <= start <= end <= len(text):
            spans.append((page, start, end))
    return spans


def whole_pieces(name: str, text: str, metadata: dict) -> list[str]:
    """A document rendered whole: one piece per page for PDFs, else one piece."""
    language = str(metadata.get("language") or "")
    spans = page_spans(text, metadata)
    if spans:
        return [render(f"{name}, page {p}", text[s:e].strip("\n"), language)
                for p, s, e in spans if text[s:e].strip()]
    return [render(name, text.strip("\n"), language)] if text.strip() else []


def _split_long_line(line: str, max_chars: int) -> list[str]:
    pieces = []
    while len(line) > max_chars:
        cut = line.rfind(" ", max_chars // 2, max_chars)
        cut = cut if cut > 0 else max_chars
        pieces.append(line[:cut])
        line = line[cut:]
    return pieces + [line]


def _line_groups(lines: list[str], max_chars: int) -> list[tuple[int, int, str]]:
    """Group lines (0-based) into ``(first, last, body)`` of at most ~max_chars."""
    groups: list[tuple[int, int, str]] = []
    first, buf, size = 0, [], 0
    for i, line in enumerate(lines):
        if buf and size + len(line) + 1 > max_chars:
            groups.append((first, i - 1, "\n".join(buf)))
            buf, size = [], 0
        if len(line) > max_chars:
            groups.extend((i, i, piece) for piece in _split_long_line(line, max_chars))
            continue
        if not buf:
            first = i
        buf.append(line)
        size += len(line) + 1
    if buf:
        groups.append((first, len(lines) - 1, "\n".join(buf)))
    return groups


def _lines_label(name: str, first: int, last: int) -> str:
    return f"{name}, line {first + 1}" if first == last else f"{name}, lines {first + 1}-{last + 1}"


def chunk_document(doc_index: int, name: str, text: str, metadata: dict,
                   max_chars: int) -> list[Passage]:
    """Cut a document into chunks of at most ~``max_chars`` characters."""
    language = str(metadata.get("language") or "")
    chunks: list[Passage] = []

    def add(label: str, body: str) -> None:
        if body.strip():
            chunks.append(Passage(doc_index, len(chunks), render(label, body, language), body))

    spans = page_spans(text, metadata)
    if spans:
        for page, start, end in spans:
            for _, _, body in _line_groups(text[start:end].split("\n"), max_chars):
                add(f"{name}, page {page}", body)
    else:
        for first, last, body in _line_groups(text.split("\n"), max_chars):
            add(_lines_label(name, first, last), body)
    return chunks
