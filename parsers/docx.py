"""Word .docx files, with docx2txt: body, headers, footers and table cells.

The archive is checked before docx2txt sees it: it must be a zip with a
``word/document.xml``; its declared uncompressed size must stay under the
limit (zip bombs are refused from the central directory, before anything is
inflated); then the parts docx2txt reads are inflated once in small chunks,
so a member that lies about its size or is damaged is refused without ever
being inflated in one piece.
"""

from __future__ import annotations

import re
from pathlib import Path

from .units import format_bytes

from .base import Document, ParseError, ParseLimits

_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_MAIN_PART = "word/document.xml"
# Compression ratio above which a large member is treated as a bomb: Word's
# XML compresses about 10:1, deflate cannot exceed about 1032:1.
_MAX_RATIO = 200
_RATIO_MIN_BYTES = 1024 * 1024
# The parts docx2txt reads.
_TEXT_PARTS = re.compile(r"word/(document|header[0-9]*|footer[0-9]*)\.xml")
# XML bytes a text part may take per character of the text limit: Word's markup around a run of text
# is rarely above 10 bytes a character; a part far larger holds (or pretends to hold) more text than
# the limit lets through, and is refused before docx2txt builds it in memory.
_XML_BYTES_PER_CHAR = 16
_CHUNK = 1024 * 1024


def parse(path: Path, limits: ParseLimits, name: str) -> Document:
    """Parse a .docx into a Document with ``format`` "docx"."""
    check_archive(path, limits, name)
    text = extract_text(path, name)
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip()
    if not text:
        raise ParseError(f"'{name}' contains no text.")
    return Document(text, {"format": "docx", "name": name})


def check_archive(path: Path, limits: ParseLimits, name: str) -> None:
    """Refuse anything that is not a sane .docx zip, before extracting it."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(len(_OLE_MAGIC))
    if head == _OLE_MAGIC:
        raise ParseError(
            f"'{name}' is not a valid .docx: it is an old Word .doc (or other OLE) file. "
            "Open it in Word or LibreOffice, save it as .docx and upload that.")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ParseError(
            f"'{name}' is not a valid .docx: it is corrupt, truncated or not a Word file. "
            "Old .doc files must be saved as .docx first.") from exc
    with archive:
        members = archive.infolist()
        if not any(member.filename == _MAIN_PART for member in members):
            raise ParseError(f"'{name}' is not a valid .docx: the zip holds no Word document.")
        check_sizes(members, limits, name)
        check_text_parts(archive, name)


def check_sizes(members, limits: ParseLimits, name: str) -> None:
    """Refuse archives that would expand past the limit or compress suspiciously well."""
    total = sum(member.file_size for member in members)
    if total > limits.max_docx_uncompressed:
        raise ParseError(
            f"'{name}' was refused: it would expand to {format_bytes(total)}, over the "
            f"{format_bytes(limits.max_docx_uncompressed)} limit (possibly a zip bomb).")
    text_xml = sum(member.file_size for member in members if _TEXT_PARTS.fullmatch(member.filename))
    if text_xml > _XML_BYTES_PER_CHAR * limits.max_chars:
        raise ParseError(
            f"'{name}' was refused: its text expands to {format_bytes(text_xml)} of XML, far more than a document "
            f"within the {limits.max_chars:,}-character limit takes (possibly a zip bomb).")
    for member in members:
        if (member.file_size > _RATIO_MIN_BYTES
                and member.file_size > _MAX_RATIO * max(member.compress_size, 1)):
            raise ParseError(
                f"'{name}' was refused: '{member.filename}' compresses "
                f"{member.file_size // max(member.compress_size, 1)}:1, which only a zip bomb does.")


def check_text_parts(archive, name: str) -> None:
    """Inflate the text parts chunk by chunk; zipfile stops at the declared size
    and verifies the CRC, so a lying or damaged member fails here, cheaply."""
    import zipfile
    import zlib

    for member in archive.infolist():
        if not _TEXT_PARTS.fullmatch(member.filename):
            continue
        try:
            with archive.open(member) as part:
                while part.read(_CHUNK):
                    pass
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
            raise ParseError(
                f"'{name}' is corrupt: its part '{member.filename}' is damaged.") from exc


def extract_text(path: Path, name: str) -> str:
    """Run docx2txt (headers, body with table cells, footers) over a checked archive."""
    import xml.etree.ElementTree as ElementTree
    import zipfile
    import zlib

    import docx2txt

    try:
        return docx2txt.process(str(path))
    except (zipfile.BadZipFile, zlib.error, ElementTree.ParseError, KeyError,
            EOFError, OSError, ValueError) as exc:
        raise ParseError(f"'{name}' is corrupt: its contents could not be read.") from exc
