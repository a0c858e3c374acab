"""parsers: PDF (pymupdf) and DOCX (docx2txt), good files and every kind of bad one."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import parsers
from parsers import ParseError, ParseLimits
from parsers_fixtures import (
    add_zeros_member, forge_declared_size, make_docx, make_pdf, make_scanned_pdf,
)

PAGES = ["First page about apples.", "Second page about bananas.", "Third page about cherries."]


# --- PDF --------------------------------------------------------------------

def test_pdf_text_per_page_with_offsets(tmp_path):
    doc = parsers.parse(make_pdf(tmp_path / "fruit.pdf", PAGES))
    assert doc.metadata["format"] == "pdf" and doc.metadata["name"] == "fruit.pdf"
    assert doc.metadata["page_count"] == 3
    pages = doc.metadata["pages"]
    assert [page["page"] for page in pages] == [1, 2, 3]
    for page, expected in zip(pages, PAGES):
        assert doc.text[page["start"]:page["end"]] == expected
    assert pages[0]["start"] == 0 and pages[-1]["end"] == len(doc.text)


def test_pdf_blank_pages_keep_their_numbers(tmp_path):
    doc = parsers.parse(make_pdf(tmp_path / "gaps.pdf", ["one", "", "three"]))
    pages = doc.metadata["pages"]
    assert pages[1]["start"] == pages[1]["end"]
    assert doc.text[pages[2]["start"]:pages[2]["end"]] == "three"


def test_pdf_with_an_empty_owner_password_is_readable(tmp_path):
    import pymupdf

    path = make_pdf(tmp_path / "locked-printing.pdf", PAGES,
                    encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="")
    assert "bananas" in parsers.parse(path).text


def test_password_protected_pdf(tmp_path):
    import pymupdf

    path = make_pdf(tmp_path / "secret.pdf", PAGES,
                    encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="user")
    with pytest.raises(ParseError, match="'secret.pdf' is password-protected"):
        parsers.parse(path)


def test_scanned_pdf_has_no_extractable_text(tmp_path):
    with pytest.raises(ParseError, match="no extractable text.*scanned"):
        parsers.parse(make_scanned_pdf(tmp_path / "scan.pdf"))


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_pdf(tmp_path, fraction):
    data = make_pdf(tmp_path / "full.pdf", PAGES * 3).read_bytes()
    path = tmp_path / "cut.pdf"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ParseError, match="truncated or corrupt"):
        parsers.parse(path)


@pytest.mark.parametrize("data, message", [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "not a valid PDF: it has no PDF header"),
    (b"just some text pretending to be a pdf\n", "not a valid PDF"),
    (b"%PDF-1.7\n1 0 obj garbage garbage\n%%EOF\n", "not a valid PDF"),
])
def test_corrupt_pdf(tmp_path, data, message):
    path = tmp_path / "broken.pdf"
    path.write_bytes(data)
    with pytest.raises(ParseError, match=message):
        parsers.parse(path)


def test_pdf_over_the_page_limit(tmp_path):
    path = make_pdf(tmp_path / "long.pdf", PAGES)
    with pytest.raises(ParseError, match="'long.pdf' has 3 pages; the limit is 2 pages"):
        parsers.parse(path, ParseLimits(max_pages=2))
    assert parsers.parse(path, ParseLimits(max_pages=3)).metadata["page_count"] == 3


# --- DOCX -------------------------------------------------------------------

def test_docx_body_headers_footers_and_table_cells(tmp_path):
    path = make_docx(tmp_path / "memo.docx", ["Body paragraph one.", "Body paragraph two."],
                     rows=[["Cell A1", "Cell B1"], ["Cell A2", "Cell B2"]],
                     header="Header text", footer="Footer text")
    doc = parsers.parse(path)
    assert doc.metadata == {"format": "docx", "name": "memo.docx"}
    for expected in ["Body paragraph one.", "Body paragraph two.", "Cell A1", "Cell B2",
                     "Header text", "Footer text"]:
        assert expected in doc.text
    assert "\n\n\n" not in doc.text


def test_docx_without_text(tmp_path):
    with pytest.raises(ParseError, match="contains no text"):
        parsers.parse(make_docx(tmp_path / "blank.docx", []))


def test_old_doc_named_docx(tmp_path):
    path = tmp_path / "legacy.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 1024)
    with pytest.raises(ParseError, match="not a valid .docx.*old Word .doc.*save it as .docx"):
        parsers.parse(path)


@pytest.mark.parametrize("data", [b"plain text, not a zip", b"%PDF-1.4 something else"])
def test_other_file_named_docx(tmp_path, data):
    path = tmp_path / "fake.docx"
    path.write_bytes(data)
    with pytest.raises(ParseError, match=r"not a valid \.docx.*saved as \.docx"):
        parsers.parse(path)


def test_zip_without_a_word_document(tmp_path):
    path = tmp_path / "photos.docx"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("photo.txt", "not word")
    with pytest.raises(ParseError, match="holds no Word document"):
        parsers.parse(path)


def test_truncated_docx(tmp_path):
    data = make_docx(tmp_path / "full.docx", ["Some body text."] * 50).read_bytes()
    path = tmp_path / "cut.docx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ParseError, match="not a valid .docx: it is corrupt, truncated"):
        parsers.parse(path)


def test_docx_with_damaged_compressed_data(tmp_path):
    path = make_docx(tmp_path / "damaged.docx", [f"Paragraph number {i}." for i in range(400)])
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("word/document.xml")
    data = bytearray(path.read_bytes())
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle:middle + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(ParseError, match="is corrupt"):
        parsers.parse(path)


def test_docx_zip_bomb_is_refused_before_extraction(tmp_path):
    path = make_docx(tmp_path / "bomb.docx", ["Innocent text."])
    add_zeros_member(path, "word/media/image1.bin", 210 * 1024 * 1024)  # ~1 MB on disk
    assert path.stat().st_size < 2 * 1024 * 1024
    with pytest.raises(ParseError, match="would expand to 210.0 MiB, over the 200.0 MiB limit.*zip bomb"):
        parsers.parse(path)


def test_docx_member_with_a_bomb_ratio_is_refused(tmp_path):
    path = add_zeros_member(make_docx(tmp_path / "ratio.docx", ["Text."]), "word/media/x.bin",
                            8 * 1024 * 1024)
    with pytest.raises(ParseError, match="compresses .*:1, which only a zip bomb does"):
        parsers.parse(path)


def test_docx_uncompressed_limit_is_configurable(tmp_path):
    path = make_docx(tmp_path / "memo.docx", ["Body text " * 200])
    with pytest.raises(ParseError, match="over the 1.0 KiB limit"):
        parsers.parse(path, ParseLimits(max_docx_uncompressed=1024))


def test_docx_member_lying_about_its_size(tmp_path):
    path = make_docx(tmp_path / "liar.docx", ["Body text that is much longer than declared."] * 100)
    forge_declared_size(path, "word/document.xml", 100)
    with pytest.raises(ParseError, match="is corrupt: its part 'word/document.xml' is damaged"):
        parsers.parse(path)


# --- documents that expand far past their size (issue 14) -------------------

def test_docx_whose_text_expands_past_the_character_limit_is_refused_before_extraction(tmp_path):
    """Like the 1.27 MB .docx that became 177 M characters: under the 200:1 ratio and the expansion cap,
    but its text parts hold far more XML than a document within the text limit needs."""
    import random

    words = random.Random(14).choices(["apple", "river", "stone", "cloud", "ember", "quartz"], k=400_000)
    path = make_docx(tmp_path / "wordy.docx", [" ".join(words[i:i + 200]) for i in range(0, len(words), 200)])
    with zipfile.ZipFile(path) as archive:
        xml = archive.getinfo("word/document.xml").file_size
    assert 16 * 100_000 < xml < 200 * path.stat().st_size  # passes the ratio check, not the text check
    with pytest.raises(ParseError, match=r"its text expands to .* of XML.*100,000-character limit"):
        parsers.parse(path, ParseLimits(max_chars=100_000))
    assert len(parsers.parse(path).text) > 2_000_000  # within the default limits it is an ordinary document


def test_pdf_whose_text_passes_the_character_limit_is_refused_without_reading_every_page(tmp_path):
    """Like the 307 KB PDF of 2,000 pages giving 200 M characters: refused once the pages read so far
    pass the limit, not after all of them."""
    path = make_pdf(tmp_path / "many.pdf", [f"Page {i}: " + "lorem ipsum dolor " * 100 for i in range(200)])
    with pytest.raises(ParseError, match=r"holds more than [\d,]+ characters of text; the limit is 10,000"):
        parsers.parse(path, ParseLimits(max_chars=10_000))


def test_docx_expansion_cap_follows_the_upload_limit():
    mib = 2**20
    assert ParseLimits.for_uploads(64 * 1024).max_docx_uncompressed == 16 * mib
    assert ParseLimits.for_uploads(5 * mib).max_docx_uncompressed == 100 * mib
    assert ParseLimits.for_uploads(50 * mib).max_docx_uncompressed == 200 * mib
    assert ParseLimits.for_uploads(5 * mib, timeout_s=9).timeout_s == 9
