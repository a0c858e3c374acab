"""Crash safety, corrupt files and schema migrations of the session store."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sessions import LOCAL_USER, SessionStore, StoreError
from sessions.migrations import index_migrations, message_migrations, session_migrations
from sessions.storage import AtomicJSONStorage, atomic_write_bytes

REPO = Path(__file__).resolve().parent.parent

WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from sessions import SessionStore
    store = SessionStore(Path(sys.argv[1]))
    sid = store.create("local", "burst")["id"]
    print("SID", sid, flush=True)
    filler = "x" * 2000  # big enough that a kill often lands mid-write
    i = 0
    while True:
        msg = store.add_message("local", sid, "user", f"{i} {filler}")
        print("ACK", msg["id"], flush=True)  # printed only after the write returned
        i += 1
""")


def run_writer_and_kill(data_dir: Path, script: Path, min_acks: int, delay: float) -> tuple[str, list[str]]:
    """Start the writer, SIGKILL it mid-burst, return (session id, acknowledged ids)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(data_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    watchdog = threading.Timer(20, proc.kill)  # bounds a hung writer: readline then sees EOF
    watchdog.start()
    try:
        while sum(line.startswith("ACK") for line in lines) < min_acks:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer stopped early: {proc.stderr.read()[-2000:]}")
            lines.append(line)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    lines += out.splitlines()
    assert proc.returncode == -signal.SIGKILL
    sid = next(line.split()[1] for line in lines if line.startswith("SID"))
    acks = [line.split()[1] for line in lines if line.startswith("ACK") and len(line.split()) == 2]
    return sid, acks


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.013, 0.029, 0.047])
def test_kill_9_mid_burst_loses_no_acknowledged_message(tmp_path, delay):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    data_dir = tmp_path / "data"
    sid, acks = run_writer_and_kill(data_dir, script, min_acks=30, delay=delay)

    for path in (data_dir / "sessions").rglob("*.json"):
        json.loads(path.read_text())  # every file is complete JSON
    store = SessionStore(data_dir)
    stored = [m["id"] for m in store.messages(LOCAL_USER, sid)]
    assert not list((data_dir / "sessions").rglob("*.corrupt-*"))  # nothing was unreadable
    assert stored[:len(acks)] == acks  # all acknowledged, in order; at most one more
    assert len(stored) - len(acks) <= 1
    assert not list((data_dir / "sessions").glob("**/.*.tmp"))  # stale temp files cleaned
    store.add_message(LOCAL_USER, sid, "user", "after the crash")
    assert store.get(LOCAL_USER, sid)["message_count"] == len(stored) + 1


def test_failed_write_keeps_old_file_and_store_usable(tmp_path, monkeypatch):
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    first = store.add_message(LOCAL_USER, sid, "user", "kept")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("sessions.storage.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        store.add_message(LOCAL_USER, sid, "user", "lost")
    monkeypatch.undo()

    assert [m["content"] for m in store.messages(LOCAL_USER, sid)] == ["kept"]
    assert not list((tmp_path / "sessions").rglob(".*.tmp"))
    store.add_message(LOCAL_USER, sid, "user", "next")
    store.close()
    again = SessionStore(tmp_path)
    assert [m["content"] for m in again.messages(LOCAL_USER, sid)] == ["kept", "next"]
    assert again.messages(LOCAL_USER, sid)[0] == first


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_bytes(target, b'{"x": 1}')
    atomic_write_bytes(target, b'{"y": 2}')
    assert json.loads(target.read_text()) == {"y": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_storage_removes_stale_temp_files(tmp_path):
    stale = tmp_path / ".db.json.abcd1234.tmp"
    stale.write_text('{"half')
    AtomicJSONStorage(tmp_path / "db.json")
    assert not stale.exists()


def test_corrupt_index_is_moved_aside(tmp_path, caplog):
    root = tmp_path / "sessions"
    root.mkdir()
    (root / "index.json").write_bytes(b'{"sessions": {"1": {"id": "abc", "tit')
    with caplog.at_level(logging.WARNING, logger="sessions.storage"):
        store = SessionStore(tmp_path)
    assert store.list(LOCAL_USER) == []
    moved = list(root.glob("index.json.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes().startswith(b'{"sessions"')
    assert any("could not be read" in r.message and "index.json.corrupt-" in r.message
               for r in caplog.records)
    store.create(LOCAL_USER, "fresh start")  # usable at once
    assert [r["title"] for r in SessionStore(tmp_path).list(LOCAL_USER)] == ["fresh start"]


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'{"sessions": 5}'])
def test_unreadable_shapes_are_moved_aside(tmp_path, garbage, caplog):
    root = tmp_path / "sessions"
    root.mkdir()
    (root / "index.json").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        SessionStore(tmp_path)
    assert len(list(root.glob("index.json.corrupt-*"))) == 1
    assert "moved it to" in caplog.text


def test_corrupt_message_segment_is_moved_aside(tmp_path, caplog):
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    store.add_message(LOCAL_USER, sid, "user", "hello")
    store.close()
    segment = tmp_path / "sessions" / sid / "messages-000000.json"
    segment.write_bytes(segment.read_bytes()[:20])
    with caplog.at_level(logging.WARNING):
        again = SessionStore(tmp_path)
        assert again.messages(LOCAL_USER, sid) == []
    assert list(segment.parent.glob("messages-000000.json.corrupt-*"))
    assert "could not be read" in caplog.text
    again.add_message(LOCAL_USER, sid, "user", "still works")


OLD_SID = "0123456789abcdef0123456789abcdef"


def write_pre_migration_files(data_dir: Path) -> None:
    """Files as a version without owners, counts or migration records wrote them."""
    root = data_dir / "sessions"
    (root / OLD_SID).mkdir(parents=True)
    (root / "index.json").write_text(json.dumps({"sessions": {"1": {
        "id": OLD_SID, "title": "Old chat", "model_id": "gemma",
        "created_at": 100.0, "updated_at": 200.0}}}))
    (root / OLD_SID / "messages-000000.json").write_text(json.dumps({"messages": {
        "1": {"id": "m1", "role": "user", "content": "old question"},
        "2": {"id": "m2", "role": "assistant", "content": "old answer"}}}))
    (root / OLD_SID / "session.json").write_text(json.dumps({"files": {"1": {
        "id": "f" * 32, "name": "old.txt", "state": "ready", "stored_name": "x.txt"}}}))


def test_old_schema_files_are_migrated(tmp_path, caplog):
    write_pre_migration_files(tmp_path)
    with caplog.at_level(logging.INFO, logger="sessions.migrations"):
        store = SessionStore(tmp_path)
        rec = store.get(LOCAL_USER, OLD_SID)
        messages = store.messages(LOCAL_USER, OLD_SID)
        files = store.list_files(LOCAL_USER, OLD_SID)
    assert rec == {"id": OLD_SID, "title": "Old chat", "model_id": "gemma", "created_at": 100.0,
                   "updated_at": 200.0, "message_count": 2, "system_prompt": "", "settings": {},
                   "owner": LOCAL_USER}
    assert [(m["id"], m["content"], m["created_at"]) for m in messages] == [
        ("m1", "old question", 0.0), ("m2", "old answer", 0.0)]
    assert files == [{"id": "f" * 32, "name": "old.txt", "state": "ready", "error": None,
                      "chars": 0, "tokens": 0}]
    assert "m002_owners_settings_counts" in caplog.text

    index = json.loads((tmp_path / "sessions" / "index.json").read_text())
    assert [d["name"] for d in index["_migrations"].values()] == [
        s.__name__ for s in index_migrations.steps]
    assert list(index["_meta"].values()) == [{"schema_version": index_migrations.schema_version}]
    seg = json.loads((tmp_path / "sessions" / OLD_SID / "messages-000000.json").read_text())
    assert len(seg["_migrations"]) == message_migrations.schema_version
    sess = json.loads((tmp_path / "sessions" / OLD_SID / "session.json").read_text())
    assert len(sess["_migrations"]) == session_migrations.schema_version

    store.add_message(LOCAL_USER, OLD_SID, "user", "new question")
    assert store.get(LOCAL_USER, OLD_SID)["message_count"] == 3


def test_partially_migrated_file_runs_only_missing_steps(tmp_path):
    root = tmp_path / "sessions"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({
        "_migrations": {"1": {"name": "m001_sessions_table", "applied_at": 1.0}},
        "_meta": {"1": {"schema_version": 1}},
        "sessions": {"1": {"id": OLD_SID, "title": "v1", "model_id": "",
                           "created_at": 1.0, "updated_at": 2.0}}}))
    store = SessionStore(tmp_path)
    assert store.owner_of(OLD_SID) == LOCAL_USER
    index = json.loads((root / "index.json").read_text())
    assert [d["name"] for d in index["_migrations"].values()] == [
        "m001_sessions_table", "m002_owners_settings_counts"]


def test_file_from_newer_version_is_refused_not_rewritten(tmp_path):
    root = tmp_path / "sessions"
    root.mkdir()
    newer = json.dumps({"_meta": {"1": {"schema_version": 99}}, "sessions": {}})
    (root / "index.json").write_text(newer)
    with pytest.raises(StoreError, match="newer version"):
        SessionStore(tmp_path)
    assert (root / "index.json").read_text() == newer


def test_interrupted_delete_is_finished_at_start(tmp_path):
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    store.add_message(LOCAL_USER, sid, "user", "x")
    store.close()
    trash = tmp_path / "sessions" / f".trash-{sid}"
    os.replace(tmp_path / "sessions" / sid, trash)  # as if killed inside delete()
    SessionStore(tmp_path)
    assert not trash.exists()
