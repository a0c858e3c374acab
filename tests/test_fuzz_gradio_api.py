"""Every named Gradio endpoint, fuzzed through the raw HTTP API that any script can call.

Each argument of each endpoint gets wrong types, missing and extra fields, huge strings, invalid JSON
settings, unknown and malformed ids and control characters. Every call must end in a result or a
clear error (no traceback, no "Internal error", which is what the app says about a bug), and none
may touch a session it was not given: a canary session is compared before and after, and the store
on disk must still load.
"""

from __future__ import annotations

import re
import shutil
import time

import httpx
import pytest

from app_harness import app_config, gradio_call, running_app, wait_until
from sessions import LOCAL_USER, SessionStore

UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
HUGE = "x" * 300_000
HOSTILE = [
    None, 0, -1, 1.5, True, [], {}, [1, "a"], {"a": 1}, "", " ", "\x00", "\x00\x01\x1b[2J\r\n\x7f",
    "\u202eevil\u202c", "🙂" * 50, HUGE, "../../../../etc/passwd", "..\\..\\windows", "/etc/passwd",
    UNKNOWN_ID, UNKNOWN_ID.upper(), "G" * 32, "0" * 31, "0" * 33, "%2e%2e%2f", "null", "{}", "[]", "NaN",
    '{"temperature": "hot"}', '{"max_tokens": 1e400}', '{"max_tokens": ' + "9" * 500 + "}", '{"a": ' * 2000,
]
# name: (benign arguments, which may be replaced one at a time); "SID" is the scratch session
ENDPOINTS = {
    "list_models": [],
    "load_model": ["no-such-model"],
    "unload_model": ["no-such-model"],
    "new_session": ["fuzz"],
    "list_sessions": [],
    "rename_session": ["SID", "renamed"],
    "delete_session": [UNKNOWN_ID],
    "history": ["SID"],
    "chat": ["SID", "hi", "", '{"max_tokens": 2, "temperature": 0}'],
    "stop": ["SID"],
    "upload_file": ["SID", None],
    "list_files": ["SID"],
    "remove_file": ["SID", UNKNOWN_ID],
}
TRACEBACK = re.compile(r'Traceback|File "|line \d+, in |\w+Error\(|Internal error')


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("fuzz-gradio"), {"llama": tiny_models["llama"]}, model_cache,
                        bundled_model, max_upload_bytes=64 * 1024, max_files_per_session=3,
                        max_prompt_chars=10_000, max_tokens_limit=64)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(app):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        yield client


def value(http, name, *data):
    event, result = gradio_call(http, name, *data)
    assert event == "complete", (name, event, result)
    return result


def snapshot(app, http, sid) -> dict:
    record = next(s for s in value(http, "list_sessions") if s["id"] == sid)
    return {"record": record, "history": value(http, "history", sid), "files": value(http, "list_files", sid),
            "messages": app.service.messages(LOCAL_USER, sid)}


@pytest.fixture(scope="module")
def canary(app, http, tmp_path_factory):
    """A session with history and a parsed file that no fuzzed call names."""
    sid = value(http, "new_session", "canary")["id"]
    value(http, "chat", sid, "Hello canary", "", '{"max_tokens": 4, "temperature": 0}')
    path = tmp_path_factory.mktemp("canary") / "canary.txt"
    path.write_text("canary notes")
    upload = http.post("/gradio_api/upload", files={"files": ("canary.txt", path.read_bytes())}).json()[0]
    value(http, "upload_file", sid, {"path": upload, "orig_name": "canary.txt", "meta": {"_type": "gradio.FileData"}})
    wait_until(lambda: value(http, "list_files", sid)[0]["state"] == "ready", what="the canary file to be parsed")
    return sid, snapshot(app, http, sid)


def assert_clear(name, event, result) -> None:
    assert event in ("complete", "error"), (name, event, str(result)[:300])
    if event == "error":
        assert isinstance(result, str) and result.strip(), (name, result)
        assert not TRACEBACK.search(result), (name, result[:300])
        assert len(result) < 2000, (name, len(result))


def fuzzed_calls(scratch: str):
    for name, benign in ENDPOINTS.items():
        benign = [scratch if arg == "SID" else arg for arg in benign]
        for slot in range(len(benign)):
            for hostile in HOSTILE:
                yield name, [*benign[:slot], hostile, *benign[slot + 1:]]
        yield name, benign[:-1] if benign else ["unexpected"]  # a missing (or an extra) field
        yield name, [*benign, "extra"]


def test_every_endpoint_answers_hostile_arguments_clearly(app, http, canary):
    canary_id, before = canary
    scratch = value(http, "new_session", "scratch")["id"]
    started, counts = time.monotonic(), {"complete": 0, "error": 0}
    for name, data in fuzzed_calls(scratch):
        event, result = gradio_call(http, name, *data)
        assert_clear(name, event, result)
        counts[event] += 1
        if name == "delete_session" and event == "complete":  # only ever the scratch session, by its own id
            assert result == {"deleted": scratch}, (data, result)
            scratch = value(http, "new_session", "scratch")["id"]
    assert counts["error"] > 300 and time.monotonic() - started < 120
    assert snapshot(app, http, canary_id) == before
    assert httpx.get(f"{app.url}/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("name", ["history", "chat", "upload_file"])
@pytest.mark.parametrize("body", [b"not json", b"{", b'{"data": "not a list"}', b'{"nodata": 1}', b"[]",
                                  b'{"data": [' + b"[" * 5000 + b"]" * 5000 + b"]}", b"\xff\xfe\x00"])
def test_malformed_request_bodies_are_refused_without_a_server_error(app, http, name, body):
    response = http.post(f"/gradio_api/call/{name}", content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text[:300]
    if response.status_code == 200:  # accepted for processing: the event itself must end cleanly
        event_id = response.json()["event_id"]
        text = http.get(f"/gradio_api/call/{name}/{event_id}").text
        assert "event: error" in text or "event: complete" in text
        assert not TRACEBACK.search(text), text[:300]
    else:
        assert "Traceback" not in response.text


def test_unknown_api_names_and_event_ids_are_not_found(http):
    response = http.post("/gradio_api/call/no_such_endpoint", json={"data": []})
    assert response.status_code == 404 and "no_such_endpoint" in response.json()["error"]
    # Gradio answers an unknown event id by cutting its event stream short (it raises its 404 after the
    # stream began): no data, no traceback, and the app carries on.
    try:
        response = http.get("/gradio_api/call/history/not-an-event-id")
        assert response.status_code < 500 and "Traceback" not in response.text
    except httpx.RemoteProtocolError:
        pass
    assert value(http, "list_models")


def test_the_store_on_disk_still_loads_after_the_fuzzing(app, http, canary, tmp_path):
    canary_id, before = canary
    copy = tmp_path / "copy"
    shutil.copytree(app.config.data_dir / "sessions", copy / "sessions")
    store = SessionStore(copy)
    assert store.history(LOCAL_USER, canary_id) == before["history"]
    assert [f["id"] for f in store.list_files(LOCAL_USER, canary_id)] == [f["id"] for f in before["files"]]
    listed = {s["id"] for s in store.list(LOCAL_USER)}
    assert listed == {s["id"] for s in value(http, "list_sessions")}
    store.close()
