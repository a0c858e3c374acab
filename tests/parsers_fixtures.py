"""Builders for the parsers tests: real PDFs (pymupdf), DOCX zips, a fake pool worker."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

W_NS = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"

CONTENT_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" ContentType="application/'
    'vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/>'
    "</Types>"
)


def make_pdf(path: Path, pages: list[str], **save_options) -> Path:
    """A PDF with one page per string (empty string: a blank page)."""
    import pymupdf

    doc = pymupdf.open()
    for text in pages:
        page = doc.new_page()
        if text:
            page.insert_textbox(pymupdf.Rect(72, 72, 540, 770), text)
    doc.save(path, **save_options)
    doc.close()
    return path


def make_scanned_pdf(path: Path, n_pages: int = 2) -> Path:
    """A PDF whose pages hold only an image, as a scanner makes them."""
    import pymupdf

    doc = pymupdf.open()
    pixmap = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 40, 40), False)
    pixmap.clear_with(180)
    for _ in range(n_pages):
        doc.new_page().insert_image(pymupdf.Rect(72, 72, 300, 300), pixmap=pixmap)
    doc.save(path)
    doc.close()
    return path


def paragraph(text: str) -> str:
    return f"<w:p><w:r><w:t xml:space=\"preserve\">{text}</w:t></w:r></w:p>"


def table(rows: list[list[str]]) -> str:
    def cells(row):
        return "".join(f"<w:tc>{paragraph(cell)}</w:tc>" for cell in row)
    return "<w:tbl>" + "".join(f"<w:tr>{cells(row)}</w:tr>" for row in rows) + "</w:tbl>"


def word_part(root: str, inner: str) -> str:
    return f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:{root} xmlns:w="{W_NS}">{inner}</w:{root}>'


def make_docx(path: Path, body: list[str] = (), *, rows: list[list[str]] = (),
              header: str | None = None, footer: str | None = None,
              extra: dict[str, bytes] | None = None) -> Path:
    """A minimal .docx written with zipfile: paragraphs, a table, a header and a footer."""
    inner = "".join(paragraph(text) for text in body) + (table(rows) if rows else "")
    parts = {
        "[Content_Types].xml": CONTENT_TYPES.encode(),
        "word/document.xml": word_part("document", f"<w:body>{inner}</w:body>").encode(),
    }
    if header is not None:
        parts["word/header1.xml"] = word_part("hdr", paragraph(header)).encode()
    if footer is not None:
        parts["word/footer1.xml"] = word_part("ftr", paragraph(footer)).encode()
    parts.update(extra or {})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for part_name, data in parts.items():
            archive.writestr(part_name, data)
    return path


def add_zeros_member(path: Path, member: str, n_bytes: int) -> Path:
    """Append a member of ``n_bytes`` zeros (a zip bomb's payload), streamed."""
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open(member, "w", force_zip64=True) as f:
            for start in range(0, n_bytes, len(chunk)):
                f.write(chunk[: n_bytes - start])
    return path


def forge_declared_size(path: Path, member: str, declared: int) -> Path:
    """Rewrite a member's uncompressed size in the central directory (a lying zip)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        target = archive.getinfo(member)
    entry = data.find(b"PK\x01\x02")  # central directory entries
    while entry != -1:
        name_len = struct.unpack_from("<H", data, entry + 28)[0]
        if data[entry + 46: entry + 46 + name_len].decode() == target.filename:
            struct.pack_into("<I", data, entry + 24, declared)
            path.write_bytes(bytes(data))
            return path
        entry = data.find(b"PK\x01\x02", entry + 4)
    raise AssertionError(f"{member} not found in the central directory")


# A stand-in for `python -m parsers.worker` that speaks its protocol and
# behaves according to the file name: hang, crash, garble, meet (a barrier
# that only passes when two workers run at the same time), else echo.
FAKE_WORKER = r'''
import json, os, sys, time, pathlib
request = json.loads(sys.stdin.buffer.read())
name, path = request["name"], pathlib.Path(request["path"])
def reply(obj):
    sys.stdout.write(json.dumps(obj)); sys.stdout.flush()
if name.startswith("hang"):
    path.with_suffix(".pid").write_text(str(os.getpid()))
    time.sleep(120)
elif name.startswith("crash"):
    sys.stderr.write("Segmentation fault (pretend)\n"); sys.stderr.flush()
    os._exit(3)
elif name.startswith("garble"):
    sys.stdout.write("this is not json")
elif name.startswith("meet"):
    (path.parent / (name + ".started")).touch()
    deadline = time.time() + 15
    while len(list(path.parent.glob("meet*.started"))) < 2 and time.time() < deadline:
        time.sleep(0.02)
    met = len(list(path.parent.glob("meet*.started"))) >= 2
    reply({"ok": met, "text": name, "metadata": {"format": "text", "name": name},
           "error": "the other job never ran at the same time"})
else:
    reply({"ok": True, "text": path.read_text(), "metadata": {"format": "text", "name": name}})
'''
