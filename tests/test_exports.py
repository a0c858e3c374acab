"""Chat exports (the UI's Download Markdown / Download JSON) in an app run with --auth (alice and bob).

An export is a file in Gradio's cache, which Gradio's file route serves to any logged-in user who has the
path and which its upload route's files share. So: it is served only to its owner, nobody else can attach
it (or so delete it) through /upload_file, and it is removed with its session and once it is old.
Exports are made the way the page makes them: the button's event, through Gradio's queue.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app_harness import app_config, gradio_call, running_app

USERS = {"alice": "pw-alice", "bob": "pw-bob"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("exports"), {"llama": tiny_models["llama"]}, model_cache,
                        auth=list(USERS.items()))
    with running_app(config) as running:
        yield running


def login(app, user: str) -> httpx.Client:
    client = httpx.Client(base_url=app.url, timeout=60)
    assert client.post("/login", data={"username": user, "password": USERS[user]}).status_code == 200
    return client


@pytest.fixture(scope="module")
def alice(app):
    client = login(app, "alice")
    yield client
    client.close()


@pytest.fixture(scope="module")
def bob(app):
    client = login(app, "bob")
    yield client
    client.close()


def ok(client, name, *data):
    event, value = gradio_call(client, name, *data)
    assert event == "complete", (name, event, value)
    return value


def run_event(client: httpx.Client, session_hash: str, handler: str, *data):
    """Run the page's event whose handler is `handler` as the page does, through queue/join and its stream,
    in the page session `session_hash`; its output data."""
    config = client.get("/config").json()
    dependency = next(d for d in config["dependencies"] if d.get("api_name") == handler)
    component = dependency["targets"][0][0]
    joined = client.post("/gradio_api/queue/join", json={
        "data": list(data), "fn_index": dependency["id"], "session_hash": session_hash, "event_data": None,
        "trigger_id": component})
    assert joined.status_code == 200, joined.text
    with client.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                message = json.loads(line[len("data: "):])
                if message.get("msg") == "process_completed":
                    assert message.get("success"), message
                    return message["output"]["data"]
    raise AssertionError("the event stream ended without a result")


def export(client, session_id: str, kind: str = "md") -> str:
    """Open the page on `session_id` (its load event), then click the export button."""
    page = uuid.uuid4().hex[:11]
    run_event(client, page, "on_load", session_id)
    (file,) = run_event(client, page, "on_export_md" if kind == "md" else "on_export_json", None)  # the State: held by the server
    return file["path"]


def file_data(path: str, orig_name: str | None = None) -> dict:
    return {"path": path, "orig_name": orig_name, "meta": {"_type": "gradio.FileData"}}


def test_an_export_is_served_only_to_its_owner(app, alice, bob):
    sid = ok(alice, "new_session", "alice's secret plans")["id"]
    path = export(alice, sid)
    assert alice.get(f"/gradio_api/file={path}").text.startswith("# alice's secret plans")
    json_path = export(alice, sid, "json")
    assert json.loads(alice.get(f"/gradio_api/file={json_path}").text)["session"]["title"] == "alice's secret plans"
    for target in (path, json_path, f"{Path(path).parent}/../{Path(path).parent.name}/chat.md"):
        for route in ("/gradio_api/file=", "/gradio_api/file/"):
            response = bob.get(f"{route}{target}")
            assert response.status_code == 404, (route, target, response.status_code)
            assert "secret" not in response.text
    assert httpx.get(f"{app.url}/gradio_api/file={path}").status_code in (401, 403, 404)  # no login at all


def test_another_user_cannot_attach_or_delete_an_export(app, alice, bob):
    sid = ok(alice, "new_session", "notes")["id"]
    path = export(alice, sid)
    bobs = ok(bob, "new_session", "attacker")["id"]
    for value in (file_data(path, "chat.md"), {"path": path}, path):
        event, message = gradio_call(bob, "upload_file", bobs, value)
        assert event == "error" and "upload" in message, (event, message)
    event, _ = gradio_call(alice, "upload_file", sid, file_data(path, "chat.md"))  # nor its owner: not an upload
    assert event == "error"
    assert ok(bob, "list_files", bobs) == [] and ok(alice, "list_files", sid) == []
    assert Path(path).is_file() and alice.get(f"/gradio_api/file={path}").status_code == 200


def test_exports_go_with_their_session(app, alice):
    sid = ok(alice, "new_session", "short-lived")["id"]
    paths = [export(alice, sid), export(alice, sid, "json")]
    assert all(Path(p).is_file() for p in paths)
    ok(alice, "delete_session", sid)
    for path in paths:
        assert not Path(path).exists()
        assert alice.get(f"/gradio_api/file={path}").status_code == 404


def test_old_exports_are_removed(app, alice):
    sid = ok(alice, "new_session", "old")["id"]
    path = export(alice, sid)
    exports = app.service.exports
    assert exports.remove_expired(now=time.time() + exports.max_age_s / 2) == 0 and Path(path).is_file()
    assert exports.remove_expired(now=time.time() + exports.max_age_s + 1) >= 1
    assert not Path(path).exists() and alice.get(f"/gradio_api/file={path}").status_code == 404
    stale = exports.root / "0123456789abcdef0123456789abcdef"  # a previous run's export: nobody owns it
    stale.mkdir(parents=True)
    (stale / "chat.md").write_text("old")
    assert exports.remove_expired(now=time.time() + exports.max_age_s + 1) == 1 and not stale.exists()


def test_the_sweeper_runs_on_a_timer(app, alice):
    exports = app.service.exports
    assert exports._timer is not None and exports._timer.is_alive()
