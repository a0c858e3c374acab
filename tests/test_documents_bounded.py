"""Documents are bounded (issue 14: a 1.27 MB .docx became 177 M characters and one turn took 177 s).

The text of one file is at most min(5,000,000, 4 x --max-upload) characters, and a session's ready files
together at most twice that; past either, the file ends in a clear error state. What assembling a prompt
computes per document (chunks, BM25 index, token counts) is done once, when the file is parsed, so a turn
with a maximal document attached costs about what a turn without one does, and allocates megabytes.
"""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from app_harness import app_config, wait_until
from inference.service import ChatService
from parsers import ParseLimits
from parsers_fixtures import make_docx
from sessions import LOCAL_USER

SETTINGS = '{"max_tokens": 8, "temperature": 0}'
WORDS = "alpha beta gamma delta epsilon notes report budget river mountain zebra harbour".split()


@pytest.fixture
def make_service(tmp_path, tiny_models, model_cache):
    services = []

    def make(**overrides) -> ChatService:
        config = app_config(tmp_path / f"data{len(services)}", {"llama": tiny_models["llama"]}, model_cache,
                            **overrides)
        service = ChatService(config)
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


def prose(n_chars: int, seed: int = 14) -> str:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(12))
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars]


def attach(service: ChatService, session_id: str, path, name: str) -> dict:
    record = service.upload_file(LOCAL_USER, session_id, path, name)
    return wait_until(lambda: next((f for f in service.list_files(LOCAL_USER, session_id)
                                    if f["id"] == record["id"] and f["state"] != "parsing"), None),
                      timeout=120, what=f"{name} to be parsed")


def turn_seconds(service: ChatService, session_id: str) -> float:
    started = time.monotonic()
    for _ in service.chat(LOCAL_USER, session_id, "What about the zebra by the river?", "", SETTINGS):
        pass
    return time.monotonic() - started


def test_the_text_limits_follow_the_upload_limit():
    mib = 2**20
    assert ParseLimits.for_uploads(64 * 1024).max_chars == 262_144  # 4 characters per byte
    assert ParseLimits.for_uploads(1 * mib).max_chars == 4 * mib
    assert ParseLimits.for_uploads(50 * mib).max_chars == 5_000_000  # never more than 5 M
    assert ParseLimits.for_uploads(1 * mib, max_chars=10).max_chars == 10


def test_a_file_over_the_text_limit_ends_in_a_clear_error(make_service, tmp_path):
    service = make_service(max_upload_bytes=64 * 1024)
    session = service.new_session(LOCAL_USER)
    path = make_docx(tmp_path / "wordy.docx", prose(300_000).split("\n"))
    assert path.stat().st_size < 64 * 1024
    record = attach(service, session["id"], path, "wordy.docx")
    assert record["state"] == "error" and "the limit is 262,144" in record["error"], record


def test_a_session_holds_at_most_twice_the_text_of_one_file(make_service, tmp_path):
    service = make_service(max_upload_bytes=64 * 1024)  # 262,144 characters a file, 524,288 a session
    assert service.max_session_chars == 524_288
    session = service.new_session(LOCAL_USER)
    records = [attach(service, session["id"], make_docx(tmp_path / f"part{i}.docx", prose(200_000, i).split("\n")),
                      f"part{i}.docx") for i in range(3)]
    assert [r["state"] for r in records] == ["ready", "ready", "error"], records
    assert "limit of 524,288 characters per chat" in records[2]["error"] and "part2.docx" in records[2]["error"]
    service.remove_file(LOCAL_USER, session["id"], records[0]["id"])  # room again: the same file now fits
    again = attach(service, session["id"], make_docx(tmp_path / "part2.docx", prose(200_000, 2).split("\n")),
                   "part2.docx")
    assert again["state"] == "ready"


def test_a_turn_with_a_maximal_document_costs_about_a_turn_without(make_service, tmp_path):
    service = make_service()  # the default --max-upload: 5,000,000 characters a file
    service.start()
    plain = service.new_session(LOCAL_USER)
    turn_seconds(service, plain["id"])  # loads the model
    without = min(turn_seconds(service, plain["id"]) for _ in range(3))

    limit = service.parse_pool.limits.max_chars
    path = tmp_path / "maximal.txt"
    path.write_text(prose(limit - 1000), encoding="utf-8")
    with_doc = service.new_session(LOCAL_USER)
    record = attach(service, with_doc["id"], path, "maximal.txt")
    assert record["state"] == "ready" and record["chars"] > 0.99 * limit, record

    times = [turn_seconds(service, with_doc["id"]) for _ in range(3)]
    assert max(times) < 5 * without + 1.0, (times, without)
    tracemalloc.start()  # what a turn allocates in Python (reading the text back, ranking): megabytes, not GiB
    try:
        turn_seconds(service, with_doc["id"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * limit, f"{peak / 2**20:.0f} MiB for a turn"
    report = service.last_reply(LOCAL_USER, with_doc["id"])["context_report"]
    # ranked every turn (the tiny model's 256-token context may leave no room for a chunk of it)
    assert "maximal.txt" in report["files_left_out"] + [p["name"] for p in report["files_partial"]], report
