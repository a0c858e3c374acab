"""parsers.pool: parsing off the caller's thread, in parallel, with timeouts and crashes contained."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from parsers import Document, ParseError, ParseLimits
from parsers.pool import ParsePool
from parsers_fixtures import FAKE_WORKER, make_docx, make_pdf

WAIT_S = 30  # upper bound on any single future in these tests


@pytest.fixture
def fake_worker(tmp_path) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script)]


def touch(tmp_path: Path, name: str, text: str = "hello") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def worker_children(script_dir: Path) -> list[int]:
    """Child processes of this test process (zombies included) running a fake worker from script_dir."""
    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("needs /proc to list child processes")
    found = []
    for entry in proc.iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and (str(script_dir).encode() in cmdline or not cmdline):
            found.append(int(entry.name))
    return found


def wait_for(path: Path, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_real_workers_parse_every_format_in_parallel(tmp_path):
    files = {
        "report.pdf": make_pdf(tmp_path / "report.pdf", ["Page one.", "Page two."]),
        "memo.docx": make_docx(tmp_path / "memo.docx", ["Memo body."], header="Memo header"),
        "notes.md": touch(tmp_path, "notes.md", "# Notes\n"),
        "stored-name.bin": touch(tmp_path, "stored-name.bin", "print('hi')\n"),
        "empty.txt": touch(tmp_path, "empty.txt", ""),
    }
    with ParsePool(max_workers=2) as pool:
        started = time.monotonic()
        futures = {name: pool.submit(path, name="main.py" if name == "stored-name.bin" else None)
                   for name, path in files.items()}
        assert time.monotonic() - started < 1.0  # submit returns at once
        results = {}
        for name, future in futures.items():
            try:
                results[name] = future.result(timeout=WAIT_S)
            except ParseError as exc:
                results[name] = exc
    pdf = results["report.pdf"]
    assert isinstance(pdf, Document) and pdf.metadata["page_count"] == 2
    assert pdf.text[pdf.metadata["pages"][1]["start"]:pdf.metadata["pages"][1]["end"]] == "Page two."
    assert "Memo header" in results["memo.docx"].text
    assert results["notes.md"].metadata["format"] == "text"
    assert results["stored-name.bin"].metadata == {
        "format": "code", "name": "main.py", "language": "python", "encoding": "utf-8"}
    assert isinstance(results["empty.txt"], ParseError) and "is empty" in str(results["empty.txt"])


def test_worker_children_sees_a_running_worker(tmp_path, fake_worker):
    """The leak check below would be worthless if it could not see a live worker."""
    with ParsePool(max_workers=1, limits=ParseLimits(timeout_s=WAIT_S), worker_command=fake_worker) as pool:
        pool.submit(touch(tmp_path, "hang.txt"))
        wait_for(tmp_path / "hang.pid")
        assert worker_children(tmp_path) == [int((tmp_path / "hang.pid").read_text())]


def test_jobs_run_at_the_same_time(tmp_path, fake_worker):
    with ParsePool(max_workers=2, limits=ParseLimits(timeout_s=WAIT_S), worker_command=fake_worker) as pool:
        futures = [pool.submit(touch(tmp_path, f"meet{i}.txt")) for i in range(2)]
        assert [f.result(timeout=WAIT_S).text for f in futures] == ["meet0.txt", "meet1.txt"]


def test_a_hung_parse_times_out_its_worker_is_killed_and_the_pool_goes_on(tmp_path, fake_worker):
    with ParsePool(max_workers=1, limits=ParseLimits(timeout_s=1.5), worker_command=fake_worker) as pool:
        hung = pool.submit(touch(tmp_path, "hang.txt"))
        with pytest.raises(ParseError, match=r"'hang.txt' took too long to parse \(over 1.5 s\)"):
            hung.result(timeout=WAIT_S)
        assert worker_children(tmp_path) == []  # killed and reaped: no zombie either
        assert pool.submit(touch(tmp_path, "next.txt", "still works")).result(timeout=WAIT_S).text == "still works"


@pytest.mark.parametrize("name, detail", [
    ("crash.txt", r"exit status 3: Segmentation fault \(pretend\)"),
    ("garble.txt", "exit status 0"),
])
def test_a_crashed_worker_becomes_a_parse_error_and_the_pool_goes_on(tmp_path, fake_worker, name, detail):
    with ParsePool(max_workers=1, worker_command=fake_worker) as pool:
        with pytest.raises(ParseError, match=rf"The parser crashed while reading '{name}' \({detail}"):
            pool.submit(touch(tmp_path, name)).result(timeout=WAIT_S)
        assert pool.submit(touch(tmp_path, "after.txt", "fine")).result(timeout=WAIT_S).text == "fine"


def test_shutdown_kills_running_work_and_cancels_queued_work(tmp_path, fake_worker):
    pool = ParsePool(max_workers=1, limits=ParseLimits(timeout_s=WAIT_S), worker_command=fake_worker)
    running = pool.submit(touch(tmp_path, "hang.txt"))
    queued = pool.submit(touch(tmp_path, "queued.txt"))
    wait_for(tmp_path / "hang.pid")
    pool.shutdown()
    with pytest.raises(ParseError, match="cancelled: the parser pool has shut down"):
        running.result(timeout=WAIT_S)
    assert queued.cancelled()
    assert worker_children(tmp_path) == []
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(tmp_path / "late.txt")
    pool.shutdown()  # idempotent


def test_max_workers_must_be_positive():
    with pytest.raises(ValueError, match="max_workers"):
        ParsePool(max_workers=0)
