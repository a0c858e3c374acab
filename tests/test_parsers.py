"""parsers: registry, plain text and code (in this process, on tiny files)."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path

import pytest

import parsers
from parsers import Document, ParseError, ParseLimits, UnsupportedFileType

REQUIRED_CODE = {
    ".py": "python", ".c": "c", ".h": "c", ".cpp": "cpp", ".hpp": "cpp", ".cc": "cpp",
    ".rs": "rust", ".go": "go", ".java": "java", ".kt": "kotlin", ".js": "javascript",
    ".jsx": "jsx", ".ts": "typescript", ".tsx": "tsx", ".rb": "ruby", ".php": "php",
    ".cs": "csharp", ".swift": "swift", ".scala": "scala", ".sh": "bash", ".bash": "bash",
    ".ps1": "powershell", ".sql": "sql", ".html": "html", ".css": "css", ".scss": "scss",
    ".lua": "lua", ".r": "r", ".m": "objectivec", ".pl": "perl", ".hs": "haskell",
    ".toml": "toml",
}
REQUIRED_TEXT = [".txt", ".md", ".csv", ".tsv", ".json", ".log", ".xml", ".yaml", ".ini"]


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# --- registry ---------------------------------------------------------------

def test_supported_types_cover_the_required_formats():
    types = parsers.supported_types()
    for required in [".pdf", ".docx", *REQUIRED_TEXT, *REQUIRED_CODE, "Dockerfile", "Makefile"]:
        assert required in types
    assert len({t for t in types if t in parsers.registry.PARSERS
                and parsers.registry.PARSERS[t] is parsers.code.parse}) >= 30


@pytest.mark.parametrize("name, expected", [
    ("report.PDF", True), ("notes.Md", True), ("Dockerfile", True), ("Dockerfile.dev", True),
    ("makefile", True), ("CMakeLists.txt", True), ("src/main.rs", True),
    ("setup.exe", False), ("photo.png", False), ("old.doc", False), ("noextension", False),
])
def test_is_supported(name, expected):
    assert parsers.is_supported(name) is expected


@pytest.mark.parametrize("name", ["setup.exe", "slides.pptx", "archive"])
def test_unsupported_type_is_a_clear_error_listing_what_is_supported(tmp_path, name):
    path = write(tmp_path, name, b"whatever")
    with pytest.raises(UnsupportedFileType) as caught:
        parsers.parse(path)
    message = str(caught.value)
    assert message.startswith("Unsupported file type")
    assert name in message
    for listed in (".pdf", ".docx", ".txt", ".py", "Dockerfile"):
        assert listed in message
    assert isinstance(caught.value, ParseError)


def test_name_chooses_the_parser_when_the_stored_file_has_a_safe_name(tmp_path):
    path = write(tmp_path, "upload-3f2a.bin", "fn main() {}\n")
    doc = parsers.parse(path, name="main.rs")
    assert doc.metadata == {"format": "code", "name": "main.rs", "language": "rust",
                            "encoding": "utf-8"}


def test_missing_file(tmp_path):
    with pytest.raises(ParseError, match="was not found"):
        parsers.parse(tmp_path / "gone.txt")


def test_directory_is_refused(tmp_path):
    (tmp_path / "folder.txt").mkdir()
    with pytest.raises(ParseError, match="not a regular file"):
        parsers.parse(tmp_path / "folder.txt")


@pytest.mark.parametrize("name", ["empty.txt", "empty.py", "empty.pdf", "empty.docx"])
def test_empty_file(tmp_path, name):
    with pytest.raises(ParseError, match=r"'.+' is empty"):
        parsers.parse(write(tmp_path, name, b""))


def test_whitespace_only_file_is_empty(tmp_path):
    with pytest.raises(ParseError, match="is empty"):
        parsers.parse(write(tmp_path, "blank.txt", " \n\t\r\n"))


@pytest.mark.parametrize("name", ["big.txt", "big.pdf", "big.docx", "big.py"])
def test_file_over_the_size_limit(tmp_path, name):
    path = write(tmp_path, name, b"x" * 2048)
    with pytest.raises(ParseError, match=r"too large \(2.0 KiB\); the limit is 1.0 KiB"):
        parsers.parse(path, ParseLimits(max_bytes=1024))


def test_default_limits():
    limits = ParseLimits()
    assert (limits.max_bytes, limits.max_pages) == (50 * 1024 * 1024, 2000)
    assert limits.max_docx_uncompressed == 200 * 1024 * 1024 and limits.timeout_s == 60.0
    with pytest.raises(ValueError, match="max_pages"):
        ParseLimits(max_pages=0)
    with pytest.raises(ValueError, match="unknown ParseLimits keys: max_lines"):
        ParseLimits.from_dict({"max_lines": 3})


def test_an_unexpected_parser_failure_still_becomes_a_parse_error(tmp_path, monkeypatch):
    def broken(path, limits, name):
        raise KeyError("boom")
    monkeypatch.setitem(parsers.registry.PARSERS, ".txt", broken)
    with pytest.raises(ParseError, match=r"'a.txt' could not be read \(KeyError"):
        parsers.parse(write(tmp_path, "a.txt", "hi"))


def test_importing_parsers_imports_no_heavy_library():
    code = ("import sys, parsers; "
            "print(sorted(m for m in ('fitz', 'pymupdf', 'docx2txt', 'charset_normalizer', 'zipfile')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         cwd=Path(parsers.__file__).parent.parent, check=True).stdout
    assert out.strip() == "[]"


# --- plain text -------------------------------------------------------------

@pytest.mark.parametrize("extension", REQUIRED_TEXT + [".yml", ".cfg", ".rst"])
def test_plain_text_formats(tmp_path, extension):
    doc = parsers.parse(write(tmp_path, "data" + extension, "key = value\nünïcode ✓\n"))
    assert isinstance(doc, Document)
    assert doc.text == "key = value\nünïcode ✓\n"
    assert doc.metadata == {"format": "text", "name": "data" + extension, "encoding": "utf-8"}


@pytest.mark.parametrize("bom, codec, label", [
    (codecs.BOM_UTF8, "utf-8", "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16"),
    (codecs.BOM_UTF32_LE, "utf-32-le", "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "utf-32"),
])
def test_byte_order_marks(tmp_path, bom, codec, label):
    text = "Ünïcödé text, 日本語, emoji 🙂\nsecond line\n"
    doc = parsers.parse(write(tmp_path, "bom.txt", bom + text.encode(codec)))
    assert doc.text == text  # BOM removed
    assert doc.metadata["encoding"] == label


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom(tmp_path, codec):
    text = "name,value\nalpha,1\nbeta,2\n"
    doc = parsers.parse(write(tmp_path, "export.csv", text.encode(codec)))
    assert doc.text == text and doc.metadata["encoding"] == codec


@pytest.mark.parametrize("codec, text", [
    ("cp1251", "Привет, мир! Это пример текста на русском языке для проверки определения кодировки."),
    ("shift_jis", "これは日本語のテキストです。文字コードの自動判定を確認します。今日はいい天気ですね。"),
    ("cp1252", "El niño comió una manzana en el jardín. ¿Dónde está la estación? ¡Qué año tan difícil!"),
])
def test_legacy_encodings_are_detected(tmp_path, codec, text):
    doc = parsers.parse(write(tmp_path, "legacy.txt", text.encode(codec)))
    assert doc.text == text
    assert codecs.lookup(doc.metadata["encoding"]).name != "utf-8"


def test_undecodable_bytes_never_crash(tmp_path):
    data = b"plain ascii log line with a stray \xff\xfe\x80 byte\n" * 5
    doc = parsers.parse(write(tmp_path, "server.log", data))
    assert doc.text.count("plain ascii log line with a stray") == 5


def test_windows_and_old_mac_newlines_become_newlines(tmp_path):
    doc = parsers.parse(write(tmp_path, "crlf.txt", b"one\r\ntwo\rthree\n"))
    assert doc.text == "one\ntwo\nthree\n"


def test_coloured_log_is_text(tmp_path):
    line = "\x1b[32mINFO\x1b[0m request served in 3 ms\n"
    assert parsers.parse(write(tmp_path, "app.log", line * 20)).text == line * 20


BINARIES = {
    "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
    "elf": b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8 + bytes(range(256)) * 4,
    "no-nul": bytes(range(1, 32)) * 40 + bytes(range(128, 256)) * 10,
}


@pytest.mark.parametrize("name", ["notes.txt", "script.py"])
@pytest.mark.parametrize("kind", BINARIES)
def test_binary_file_named_as_text_or_code(tmp_path, name, kind):
    with pytest.raises(ParseError, match="looks like a binary file, not text"):
        parsers.parse(write(tmp_path, name, BINARIES[kind]))


def test_random_bytes_are_binary(tmp_path):
    with pytest.raises(ParseError, match="binary"):
        parsers.parse(write(tmp_path, "random.txt", os.urandom(4096)))


# --- code -------------------------------------------------------------------

@pytest.mark.parametrize("extension, language", sorted(REQUIRED_CODE.items()))
def test_code_language_by_extension(tmp_path, extension, language):
    source = "// sample\nx = 1\n"
    doc = parsers.parse(write(tmp_path, "sample" + extension, source))
    assert doc.text == source
    assert doc.metadata["format"] == "code" and doc.metadata["language"] == language


@pytest.mark.parametrize("name, language", [
    ("Dockerfile", "dockerfile"), ("Dockerfile.prod", "dockerfile"), ("Makefile", "makefile"),
    ("GNUmakefile", "makefile"), ("CMakeLists.txt", "cmake"), ("Gemfile", "ruby"),
    ("Jenkinsfile", "groovy"), (".bashrc", "bash"), ("MAIN.PY", "python"),
])
def test_code_language_by_file_name(tmp_path, name, language):
    doc = parsers.parse(write(tmp_path, name, "all:\n\techo hi\n"))
    assert doc.metadata["language"] == language


def test_known_text_file_names(tmp_path):
    doc = parsers.parse(write(tmp_path, "LICENSE", "MIT License\n"))
    assert doc.metadata["format"] == "text"


def test_code_in_a_legacy_encoding(tmp_path):
    source = "# коментар українською мовою, щоб перевірити кодування файлу\nprint('привіт, світ')\n"
    doc = parsers.parse(write(tmp_path, "hello.py", source.encode("cp1251")))
    assert doc.text == source and doc.metadata["language"] == "python"


def test_text_beyond_the_character_limit_is_refused_clearly(tmp_path):
    """A small file whose text expands past the limit (a zip-compressed DOCX, a PDF repeating one
    content stream) is refused with the figures, instead of costing every chat turn that much text."""
    path = tmp_path / "long.txt"
    path.write_text("word " * 2_000)  # 10,000 characters
    with pytest.raises(ParseError, match=r"10,000 characters of text; the limit is 9,999"):
        parsers.parse(path, ParseLimits(max_chars=9_999))
    assert len(parsers.parse(path, ParseLimits(max_chars=10_000)).text) == 10_000
    with pytest.raises(ValueError):
        ParseLimits(max_chars=0)
    assert ParseLimits.from_dict(ParseLimits(max_chars=123).to_dict()).max_chars == 123
