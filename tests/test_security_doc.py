"""Every test SECURITY.md names exists: each promise there is backed by a test that can be run.

SECURITY.md names tests as `file.py::test_name`, `file.py` (the whole file), and `::test_name` for another
test of the file named just before in the same table row or paragraph.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
REFERENCE = re.compile(r"`((?:tests/)?(test_\w+\.py))?(?:::(\w+))?`")


def named_tests(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, test file, test function or None) for each reference in `text`."""
    found, current = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("|"):
            current = None  # `::name` continues a file named in the same table row or paragraph
        for match in REFERENCE.finditer(line):
            file, function = match.group(2), match.group(3)
            if file is None and function is None:
                continue
            if file is not None:
                current = file
            elif current is None:
                raise AssertionError(f"SECURITY.md line {number}: `::{function}` names no file before it")
            found.append((number, current, function))
    return found


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_test_security_md_names_exists():
    references = named_tests((ROOT / "SECURITY.md").read_text(encoding="utf-8"))
    assert len(references) > 40  # the parser found the references, not nothing
    missing = []
    for number, file, function in references:
        path = TESTS / file
        if not path.is_file():
            missing.append(f"line {number}: {file}")
        elif function is not None and function not in functions_in(path):
            missing.append(f"line {number}: {file}::{function}")
    assert missing == [], "SECURITY.md names tests that do not exist:\n" + "\n".join(missing)


def test_every_promise_row_names_a_test():
    """Each row of SECURITY.md's promise tables names at least one test."""
    rows = [line for line in (ROOT / "SECURITY.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith(("| Promise", "| Fault", "|---"))]
    assert rows
    bare = [row[:80] for row in rows if not named_tests(row)]
    assert bare == [], bare


def test_the_reference_parser():
    line = "x | `a_test.py` `test_a.py::test_one`, `::test_two`; `tests/test_b.py` `--auth` `::test_three`"
    assert named_tests(line) == [(1, "test_a.py", "test_one"), (1, "test_a.py", "test_two"),
                                 (1, "test_b.py", None), (1, "test_b.py", "test_three")]
