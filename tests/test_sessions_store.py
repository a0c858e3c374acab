"""SessionStore on real TinyDB files in a temporary data dir."""

from __future__ import annotations

import json
import threading

import pytest

from sessions import LOCAL_USER, FileNotFound, SessionNotFound, SessionStore
from sessions.errors import MessageNotFound
from sessions.files import INTERRUPTED

PUBLIC_KEYS = {"id", "title", "model_id", "created_at", "updated_at", "message_count"}
FILE_KEYS = {"id", "name", "state", "error", "chars", "tokens"}


@pytest.fixture
def store(tmp_path):
    s = SessionStore(tmp_path)
    yield s
    s.close()


def test_create_returns_public_record_with_default_title(store):
    rec = store.create(LOCAL_USER)
    assert set(rec) == PUBLIC_KEYS
    assert rec["title"] == "New chat"
    assert rec["message_count"] == 0
    assert len(rec["id"]) == 32 and int(rec["id"], 16) >= 0
    assert isinstance(rec["created_at"], float) and rec["created_at"] == rec["updated_at"]


def test_ids_are_random_and_unique(store):
    ids = {store.create(LOCAL_USER)["id"] for _ in range(20)}
    assert len(ids) == 20


def test_get_includes_prompt_settings_owner(store):
    rec = store.create(LOCAL_USER, "T", "model-a", "Be brief.", {"temperature": 0.2})
    got = store.get(LOCAL_USER, rec["id"])
    assert got["title"] == "T" and got["model_id"] == "model-a"
    assert got["system_prompt"] == "Be brief."
    assert got["settings"] == {"temperature": 0.2}
    assert got["owner"] == LOCAL_USER
    got["settings"]["temperature"] = 9  # callers get copies
    assert store.get(LOCAL_USER, rec["id"])["settings"] == {"temperature": 0.2}


def test_list_is_newest_first_by_update(store):
    a = store.create(LOCAL_USER, "a")
    b = store.create(LOCAL_USER, "b")
    c = store.create(LOCAL_USER, "c")
    assert [r["title"] for r in store.list(LOCAL_USER)] == ["c", "b", "a"]
    store.add_message(LOCAL_USER, a["id"], "user", "hi")
    assert [r["id"] for r in store.list(LOCAL_USER)] == [a["id"], c["id"], b["id"]]


def test_rename_strips_caps_and_rejects_empty(store):
    sid = store.create(LOCAL_USER)["id"]
    assert store.rename(LOCAL_USER, sid, "  Trip\nplans  ")["title"] == "Trip plans"
    assert len(store.rename(LOCAL_USER, sid, "x" * 500)["title"]) == 200
    with pytest.raises(ValueError, match="cannot be empty"):
        store.rename(LOCAL_USER, sid, "   ")


def test_update_changes_only_what_is_given(store):
    sid = store.create(LOCAL_USER, "t", "m1", "sp", {"top_k": 5})["id"]
    got = store.update(LOCAL_USER, sid, model_id="m2")
    assert (got["model_id"], got["system_prompt"], got["settings"]) == ("m2", "sp", {"top_k": 5})
    got = store.update(LOCAL_USER, sid, system_prompt="", settings={"seed": 1})
    assert (got["model_id"], got["system_prompt"], got["settings"]) == ("m2", "", {"seed": 1})
    with pytest.raises(ValueError, match="settings"):
        store.update(LOCAL_USER, sid, settings={"x": object()})


def test_messages_roundtrip_with_meta_and_count(store):
    sid = store.create(LOCAL_USER)["id"]
    u = store.add_message(LOCAL_USER, sid, "user", "Hello?")
    a = store.add_message(LOCAL_USER, sid, "assistant", "Hi!", model_id="m", tokens=3,
                          context_report={"prompt_tokens": 12})
    assert set(u) == {"id", "role", "content", "created_at"}
    assert a["model_id"] == "m" and a["tokens"] == 3
    assert store.messages(LOCAL_USER, sid) == [u, a]
    assert store.history(LOCAL_USER, sid) == [
        {"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi!"}]
    assert store.get(LOCAL_USER, sid)["message_count"] == 2


def test_add_message_validates(store):
    sid = store.create(LOCAL_USER)["id"]
    with pytest.raises(ValueError, match="role"):
        store.add_message(LOCAL_USER, sid, "tool", "x")
    with pytest.raises(ValueError, match="JSON"):
        store.add_message(LOCAL_USER, sid, "user", "x", blob=object())
    with pytest.raises(ValueError, match="cannot set"):
        store.add_message(LOCAL_USER, sid, "user", "x", id="mine")
    assert store.messages(LOCAL_USER, sid) == []


def test_first_user_message_sets_title_once(store):
    sid = store.create(LOCAL_USER)["id"]
    store.add_message(LOCAL_USER, sid, "system", "setup")
    store.add_message(LOCAL_USER, sid, "user", "Explain the BM25 ranking function used for retrieval in detail")
    title = store.get(LOCAL_USER, sid)["title"]
    assert title.startswith("Explain the BM25") and title.endswith("…") and len(title) <= 41
    store.add_message(LOCAL_USER, sid, "user", "Another question")
    assert store.get(LOCAL_USER, sid)["title"] == title
    named = store.create(LOCAL_USER, "Mine")["id"]
    store.add_message(LOCAL_USER, named, "user", "Hello")
    assert store.get(LOCAL_USER, named)["title"] == "Mine"


def test_delete_messages_from_and_clear(store):
    sid = store.create(LOCAL_USER)["id"]
    ids = [store.add_message(LOCAL_USER, sid, "user" if i % 2 == 0 else "assistant", f"m{i}")["id"]
           for i in range(6)]
    assert store.delete_messages_from(LOCAL_USER, sid, ids[3]) == 3
    assert [m["id"] for m in store.messages(LOCAL_USER, sid)] == ids[:3]
    assert store.get(LOCAL_USER, sid)["message_count"] == 3
    with pytest.raises(MessageNotFound):
        store.delete_messages_from(LOCAL_USER, sid, ids[4])
    store.clear_messages(LOCAL_USER, sid)
    assert store.messages(LOCAL_USER, sid) == []
    assert store.get(LOCAL_USER, sid)["message_count"] == 0


def test_messages_across_segments(tmp_path, monkeypatch):
    monkeypatch.setattr("sessions.messages.SEGMENT_SIZE", 4)
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    ids = [store.add_message(LOCAL_USER, sid, "user", f"m{i}")["id"] for i in range(11)]
    assert len(list((tmp_path / "sessions" / sid).glob("messages-*.json"))) == 3
    assert store.delete_messages_from(LOCAL_USER, sid, ids[5]) == 6
    assert len(list((tmp_path / "sessions" / sid).glob("messages-*.json"))) == 2
    ids = ids[:5] + [store.add_message(LOCAL_USER, sid, "user", f"n{i}")["id"] for i in range(5)]
    store.close()
    reopened = SessionStore(tmp_path)
    assert [m["id"] for m in reopened.messages(LOCAL_USER, sid)] == ids
    assert reopened.get(LOCAL_USER, sid)["message_count"] == 10


def test_unknown_and_malformed_ids(store):
    for bad in ["0" * 32, "../../etc", "", None]:
        with pytest.raises(SessionNotFound) as exc:
            store.get(LOCAL_USER, bad)
        assert str(exc.value) == f"Unknown session id: {bad}"
    assert store.owner_of("0" * 32) is None and store.owner_of("../x") is None


def test_owners_see_and_touch_only_their_sessions(store):
    alice = store.create("alice", "a")["id"]
    bob = store.create("bob", "b")["id"]
    assert [r["id"] for r in store.list("alice")] == [alice]
    assert [r["id"] for r in store.list("bob")] == [bob]
    assert store.owner_of(alice) == "alice"
    attempts = [
        lambda: store.get("bob", alice), lambda: store.rename("bob", alice, "x"),
        lambda: store.update("bob", alice, model_id="m"), lambda: store.delete("bob", alice),
        lambda: store.add_message("bob", alice, "user", "x"), lambda: store.messages("bob", alice),
        lambda: store.history("bob", alice), lambda: store.clear_messages("bob", alice),
        lambda: store.list_files("bob", alice), lambda: store.files_dir("bob", alice),
        lambda: store.safe_upload_path("bob", alice, "a.txt"),
    ]
    for attempt in attempts:
        with pytest.raises(SessionNotFound, match=f"Unknown session id: {alice}"):
            attempt()
    assert store.get("alice", alice)["title"] == "a"
    assert store.messages("alice", alice) == []


def test_restart_keeps_everything(tmp_path):
    store = SessionStore(tmp_path)
    sid = store.create("alice", "Plans", "m", "sp", {"seed": 3})["id"]
    msg = store.add_message("alice", sid, "user", "remember me", tokens=2)
    path = store.safe_upload_path("alice", sid, "notes.txt")
    path.write_text("notes")
    fid = store.add_file("alice", sid, "notes.txt", str(path))["id"]
    store.set_file_ready("alice", sid, fid, "notes", {"language": ""}, 1)
    before = store.get("alice", sid)
    store.close()

    again = SessionStore(tmp_path)
    assert again.get("alice", sid) == before
    assert again.messages("alice", sid) == [msg]
    assert again.list_files("alice", sid)[0]["state"] == "ready"
    assert again.file_text("alice", sid, fid) == ("notes", {"language": ""})


def test_delete_removes_everything_and_calls_hooks(store, tmp_path):
    sid = store.create(LOCAL_USER)["id"]
    other = store.create(LOCAL_USER)["id"]
    store.add_message(LOCAL_USER, sid, "user", "secret")
    path = store.safe_upload_path(LOCAL_USER, sid, "a.pdf")
    path.write_bytes(b"%PDF")
    fid = store.add_file(LOCAL_USER, sid, "a.pdf", str(path))["id"]
    store.set_file_ready(LOCAL_USER, sid, fid, "parsed secret", {}, 2)
    calls = []
    store.on_delete.append(calls.append)
    store.on_delete.append(lambda s: 1 / 0)  # a failing hook does not stop the others
    store.on_delete.append(lambda s: calls.append(("second", s)))

    store.delete(LOCAL_USER, sid)

    assert calls == [sid, ("second", sid)]
    assert not (tmp_path / "sessions" / sid).exists()
    assert [r["id"] for r in store.list(LOCAL_USER)] == [other]
    with pytest.raises(SessionNotFound):
        store.messages(LOCAL_USER, sid)
    leftovers = [p for p in (tmp_path / "sessions").rglob("*") if sid in str(p)]
    assert leftovers == []
    assert "secret" not in (tmp_path / "sessions" / "index.json").read_text()


def test_file_lifecycle(store):
    sid = store.create(LOCAL_USER)["id"]
    path = store.safe_upload_path(LOCAL_USER, sid, "../../Quarterly Report.PDF")
    assert path.parent == store.files_dir(LOCAL_USER, sid) and path.suffix == ".pdf"
    path.write_bytes(b"%PDF-1.7")
    rec = store.add_file(LOCAL_USER, sid, "../../Quarterly Report.PDF", str(path))
    assert set(rec) == FILE_KEYS
    assert rec["name"] == "Quarterly Report.PDF" and rec["state"] == "parsing"
    ready = store.set_file_ready(LOCAL_USER, sid, rec["id"], "page one text", {"pages": []}, 3)
    assert (ready["state"], ready["chars"], ready["tokens"], ready["error"]) == ("ready", 13, 3, None)
    assert store.file_text(LOCAL_USER, sid, rec["id"]) == ("page one text", {"pages": []})
    assert store.list_files(LOCAL_USER, sid) == [ready]

    store.remove_file(LOCAL_USER, sid, rec["id"])
    assert store.list_files(LOCAL_USER, sid) == []
    assert not path.exists()
    assert not any((store.root / sid / "parsed").iterdir())
    with pytest.raises(FileNotFound):
        store.file_text(LOCAL_USER, sid, rec["id"])


def test_file_error_and_not_ready(store):
    sid = store.create(LOCAL_USER)["id"]
    path = store.safe_upload_path(LOCAL_USER, sid, "x.docx")
    path.write_bytes(b"zip")
    fid = store.add_file(LOCAL_USER, sid, "x.docx", str(path))["id"]
    with pytest.raises(FileNotFound, match="no parsed text"):
        store.file_text(LOCAL_USER, sid, fid)
    rec = store.set_file_error(LOCAL_USER, sid, fid, "Not a valid DOCX file.")
    assert rec["state"] == "error" and rec["error"] == "Not a valid DOCX file."
    with pytest.raises(FileNotFound):
        store.set_file_ready(LOCAL_USER, sid, "f" * 32, "t", {}, 1)


def test_file_outside_files_dir_is_copied_in(store, tmp_path):
    sid = store.create(LOCAL_USER)["id"]
    outside = tmp_path / "gradio-tmp" / "upload.txt"
    outside.parent.mkdir()
    outside.write_text("hello")
    rec = store.add_file(LOCAL_USER, sid, "upload.txt", str(outside))
    stored = list(store.files_dir(LOCAL_USER, sid).iterdir())
    assert len(stored) == 1 and stored[0].read_text() == "hello" and stored[0].suffix == ".txt"
    store.remove_file(LOCAL_USER, sid, rec["id"])
    assert outside.exists()  # never deletes what it does not own
    assert list(store.files_dir(LOCAL_USER, sid).iterdir()) == []


@pytest.mark.parametrize("name, label, ext", [
    ("../../etc/passwd", "passwd", ""),
    ("C:\\Users\\me\\evil.exe", "evil.exe", ".exe"),
    ("a\x00b\nc\u202egnp.sh", "a b cgnp.sh", ".sh"),
    ("x" * 300 + ".md", None, ".md"),
    ("", "file", ""),
    ("name.with spaces", "name.with spaces", ""),
])
def test_names_are_labels_and_paths_never_escape(store, name, label, ext):
    sid = store.create(LOCAL_USER)["id"]
    path = store.safe_upload_path(LOCAL_USER, sid, name)
    assert path.parent == store.files_dir(LOCAL_USER, sid)
    assert path.suffix == ext and len(path.stem) == 32
    path.write_bytes(b"x")
    rec = store.add_file(LOCAL_USER, sid, name, str(path))
    if label is not None:
        assert rec["name"] == label
    assert len(rec["name"]) <= 120 and "/" not in rec["name"] and "\x00" not in rec["name"]


def test_mark_interrupted_uploads(tmp_path):
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    done, pending = (store.safe_upload_path(LOCAL_USER, sid, n) for n in ("a.txt", "b.txt"))
    done.write_text("a")
    pending.write_text("b")
    a = store.add_file(LOCAL_USER, sid, "a.txt", str(done))["id"]
    b = store.add_file(LOCAL_USER, sid, "b.txt", str(pending))["id"]
    store.set_file_ready(LOCAL_USER, sid, a, "a", {}, 1)
    store.close()  # "crash" with b still parsing

    again = SessionStore(tmp_path)
    assert again.mark_interrupted_uploads() == 1
    states = {f["id"]: (f["state"], f["error"]) for f in again.list_files(LOCAL_USER, sid)}
    assert states == {a: ("ready", None), b: ("error", INTERRUPTED)}


def test_concurrent_writers_lose_nothing(store):
    sid = store.create(LOCAL_USER)["id"]
    others = [store.create(LOCAL_USER)["id"] for _ in range(2)]
    errors = []

    def worker(n):
        try:
            for i in range(15):
                store.add_message(LOCAL_USER, sid, "user", f"w{n}-{i}")
                store.add_message(LOCAL_USER, others[n % 2], "assistant", f"w{n}-{i}")
                store.list(LOCAL_USER)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    contents = {m["content"] for m in store.messages(LOCAL_USER, sid)}
    assert contents == {f"w{n}-{i}" for n in range(4) for i in range(15)}
    assert store.get(LOCAL_USER, sid)["message_count"] == 60
    json.loads((store.root / "index.json").read_text())


def test_each_owner_keeps_at_most_the_session_cap(tmp_path):
    from sessions import TooManySessions

    store = SessionStore(tmp_path, max_sessions_per_owner=3)
    for _ in range(3):
        store.create("alice")
    with pytest.raises(TooManySessions, match="3 chats"):
        store.create("alice")
    store.create("bob")  # the cap is per owner
    store.delete("alice", store.list("alice")[0]["id"])
    store.create("alice")  # room again after a delete
    assert len(store.list("alice")) == 3
