"""The Gradio API of the README, end to end: a real app on a loopback port, driven by gradio_client.

One app serves the module (tiny random models, a small upload limit); a second one runs with
--auth to check that users only ever see their own sessions.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.utils import Status

from app_harness import app_config, counted_forwards, running_app, wait_until
from inference.service import ServiceError
from sessions import LOCAL_USER

UPLOAD_LIMIT = 4096
SESSION_FIELDS = {"id", "title", "model_id", "created_at", "updated_at", "message_count"}
MODEL_FIELDS = {"id", "name", "state", "architecture", "quantization", "file_size_bytes", "memory_bytes", "pinned",
                "error", "instruct"}
FILE_FIELDS = {"id", "name", "state", "error", "chars", "tokens"}
API_NAMES = ("/list_models", "/load_model", "/unload_model", "/new_session", "/list_sessions", "/rename_session",
             "/delete_session", "/history", "/chat", "/stop", "/upload_file", "/list_files", "/remove_file")
GREEDY = '{"temperature": 0, "max_tokens": 12}'
LONG = '{"temperature": 0, "max_tokens": 4000}'


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("app-api"), tiny_models, model_cache, bundled_model,
                        max_upload_bytes=UPLOAD_LIMIT, max_concurrent_generations=1)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False, download_files=False)  # its heartbeat ends with the app


@pytest.fixture
def session(client):
    return client.predict("", api_name="/new_session")


def assert_person_readable(error: Exception, *fragments: str) -> str:
    """The message says what went wrong in words, with no Python traceback in it."""
    message = str(error)
    assert message.strip(), f"empty error message from {type(error).__name__}"
    assert not re.search(r'Traceback|File "|line \d+, in|\w+Error\(', message), \
        f"error message looks like a traceback: {message!r}"
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def assert_app_still_works(client) -> None:
    assert isinstance(client.predict(api_name="/list_sessions"), list)


def chat_outputs(client, session_id, message, model_id="", settings=GREEDY) -> list[str]:
    job = client.submit(session_id, message, model_id, settings, api_name="/chat")
    job.result(timeout=120)
    return list(job.outputs())


# ----- the contract ---------------------------------------------------------------------------------------------
def test_every_endpoint_of_the_contract_is_published(client):
    published = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(API_NAMES) <= set(published)
    assert [p["parameter_name"] for p in published["/chat"]["parameters"]] == [
        "session_id", "message", "model_id", "settings"]
    assert [p["parameter_name"] for p in published["/upload_file"]["parameters"]] == ["session_id", "file"]


def test_health_answers_ok(app):
    response = httpx.get(f"{app.url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


# ----- models ---------------------------------------------------------------------------------------------------
def test_list_models_gives_full_records(client):
    records = client.predict(api_name="/list_models")
    by_id = {r["id"]: r for r in records}
    assert {"tiny-llama", "tiny-qwen2", "tiny-gemma3", "gemma-3-270m"} <= set(by_id)
    for record in records:
        assert MODEL_FIELDS <= set(record), record
        assert record["state"] in ("unloaded", "loading", "loaded", "error")
    tiny = by_id["tiny-qwen2"]
    assert tiny["architecture"] == "qwen2" and tiny["file_size_bytes"] > 0 and tiny["memory_bytes"] > 0


def test_load_and_unload_change_the_model_state(client):
    loaded = client.predict("tiny-llama", api_name="/load_model")
    assert loaded["id"] == "tiny-llama" and loaded["state"] == "loaded" and loaded["error"] is None
    assert loaded["memory_bytes"] > 0
    assert {r["id"]: r["state"] for r in client.predict(api_name="/list_models")}["tiny-llama"] == "loaded"
    unloaded = client.predict("tiny-llama", api_name="/unload_model")
    assert unloaded["state"] == "unloaded"
    assert {r["id"]: r["state"] for r in client.predict(api_name="/list_models")}["tiny-llama"] == "unloaded"


@pytest.mark.parametrize("api_name", ["/load_model", "/unload_model"])
def test_unknown_model_is_refused_by_name(client, api_name):
    with pytest.raises(Exception) as caught:
        client.predict("no-such-model", api_name=api_name)
    assert_person_readable(caught.value, "unknown model", "no-such-model", "tiny-llama")
    assert_app_still_works(client)


# ----- sessions -------------------------------------------------------------------------------------------------
def test_session_records_have_the_contract_fields(client):
    record = client.predict("", api_name="/new_session")
    assert set(record) == SESSION_FIELDS
    assert re.fullmatch(r"[0-9a-f]{32}", record["id"])
    assert record["title"] and record["model_id"] == "tiny-llama" and record["message_count"] == 0
    assert record["created_at"] <= record["updated_at"]
    titled = client.predict("Trip plans", api_name="/new_session")
    assert titled["title"] == "Trip plans" and titled["id"] != record["id"]


def test_list_sessions_is_newest_first(client):
    made = [client.predict(f"order {i}", api_name="/new_session")["id"] for i in range(3)]
    listed = [s["id"] for s in client.predict(api_name="/list_sessions")]
    assert [i for i in listed if i in made] == made[::-1]
    for record in client.predict(api_name="/list_sessions"):
        assert set(record) == SESSION_FIELDS
    client.predict(made[0], "order 0, renamed", api_name="/rename_session")  # touching one moves it up
    listed = [s["id"] for s in client.predict(api_name="/list_sessions")]
    assert listed[0] == made[0]


def test_rename_and_delete_a_session(client, session):
    renamed = client.predict(session["id"], "  Renamed\nchat ", api_name="/rename_session")
    assert renamed["id"] == session["id"] and renamed["title"] == "Renamed chat"
    assert set(renamed) == SESSION_FIELDS
    assert client.predict(session["id"], api_name="/delete_session") == {"deleted": session["id"]}
    assert session["id"] not in {s["id"] for s in client.predict(api_name="/list_sessions")}
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], api_name="/history")
    assert_person_readable(caught.value, "unknown session")


# ----- bad calls --------------------------------------------------------------------------------------------------
UNKNOWN_SESSION = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("api_name, args", [
    ("/history", (UNKNOWN_SESSION,)),
    ("/rename_session", (UNKNOWN_SESSION, "title")),
    ("/delete_session", (UNKNOWN_SESSION,)),
    ("/chat", (UNKNOWN_SESSION, "hello", "", "")),
    ("/stop", (UNKNOWN_SESSION,)),
    ("/list_files", (UNKNOWN_SESSION,)),
    ("/remove_file", (UNKNOWN_SESSION, UNKNOWN_SESSION)),
    ("/history", ("../../etc/passwd",)),
])
def test_unknown_session_is_refused_clearly(client, api_name, args):
    with pytest.raises(Exception) as caught:
        client.predict(*args, api_name=api_name)
    assert_person_readable(caught.value, "unknown session", args[0])
    assert_app_still_works(client)


def test_upload_to_unknown_session_is_refused_clearly(client, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(Exception) as caught:
        client.predict(UNKNOWN_SESSION, handle_file(str(path)), api_name="/upload_file")
    assert_person_readable(caught.value, "unknown session")
    assert_app_still_works(client)


@pytest.mark.parametrize("message, model_id, settings, expected", [
    ("hello", "no-such-model", "", ["unknown model", "no-such-model"]),
    ("hello", "", "{temperature: 1", ["settings must be a json object"]),
    ("hello", "", "[0.5]", ["settings must be a json object"]),
    ("hello", "", '{"temprature": 0.5}', ["unknown setting", "temprature"]),
    ("hello", "", '{"temperature": -1}', ["temperature"]),
    ("hello", "", '{"max_tokens": 0}', ["max_tokens"]),
    ("hello", "", '{"max_tokens": 999999}', ["max_tokens", "4096"]),
    ("hello", "", '{"system_prompt": 3}', ["system_prompt"]),
    ("", "", "", ["empty"]),
    ("   \n ", "", "", ["empty"]),
], ids=["unknown-model", "bad-json", "not-an-object", "unknown-key", "bad-temperature", "zero-max-tokens",
        "max-tokens-over-limit", "bad-system-prompt", "empty", "blank"])
def test_bad_chat_requests_are_refused_clearly(client, session, message, model_id, settings, expected):
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], message, model_id, settings, api_name="/chat")
    assert_person_readable(caught.value, *expected)
    assert client.predict(session["id"], api_name="/history") == []  # nothing half-stored
    assert_app_still_works(client)


def test_unsupported_file_type_is_refused_clearly(client, session, tmp_path):
    path = tmp_path / "program.exe"
    path.write_bytes(b"MZ\x90\x00" * 8)
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], handle_file(str(path)), api_name="/upload_file")
    assert_person_readable(caught.value, "program.exe", "unsupported file type")
    assert client.predict(session["id"], api_name="/list_files") == []
    assert_app_still_works(client)


def test_file_over_the_size_limit_is_refused_clearly(app, client, session, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("word " * UPLOAD_LIMIT)
    with pytest.raises(Exception) as caught:  # gradio_client checks the app's limit before sending
        client.predict(session["id"], handle_file(str(path)), api_name="/upload_file")
    assert_person_readable(caught.value, "exceeds", str(UPLOAD_LIMIT))
    with path.open("rb") as stream:  # and the server refuses it too, for clients that do not check
        response = httpx.post(f"{app.url}/gradio_api/upload", files={"files": ("big.txt", stream)}, timeout=30)
    assert response.status_code == 413
    assert client.predict(session["id"], api_name="/list_files") == []
    assert_app_still_works(client)


def test_size_limit_message_names_the_file_and_the_limit(app, session, tmp_path):
    """What a client that does not check the limit itself is told (gradio_client checks it first)."""
    path = tmp_path / "big.txt"
    path.write_text("x" * (UPLOAD_LIMIT + 1))
    with pytest.raises(ServiceError) as caught:
        app.service.upload_file(LOCAL_USER, session["id"], path, "big.txt")
    assert_person_readable(caught.value, "big.txt", "4.0 KiB")


@pytest.mark.parametrize("file_id", [UNKNOWN_SESSION, "not-an-id", ""])
def test_removing_an_unknown_file_is_refused_clearly(client, session, file_id):
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], file_id, api_name="/remove_file")
    assert_person_readable(caught.value, "file")
    assert_app_still_works(client)


def test_empty_title_is_refused_on_rename(client, session):
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], "   ", api_name="/rename_session")
    assert_person_readable(caught.value, "title")


# ----- chat -------------------------------------------------------------------------------------------------------
def test_chat_streams_and_stores_the_whole_reply(client, session):
    outputs = chat_outputs(client, session["id"], "Hello there, how are you?", settings=GREEDY)
    final = outputs[-1]
    assert final, "the tiny model produced no text"
    growing = [o for o in dict.fromkeys(outputs) if o]
    assert len(growing) >= 3, f"expected several intermediate values, got {outputs!r}"
    for before, after in zip(growing, growing[1:]):
        assert after.startswith(before), "each value is the reply so far"
    history = client.predict(session["id"], api_name="/history")
    assert history == [{"role": "user", "content": "Hello there, how are you?"},
                       {"role": "assistant", "content": final}]
    record = next(s for s in client.predict(api_name="/list_sessions") if s["id"] == session["id"])
    assert record["message_count"] == 2
    assert record["title"] != "New chat"  # named after the first message


def test_chat_is_deterministic_at_temperature_zero(client, session):
    first = chat_outputs(client, session["id"], "Say something.")[-1]
    other = client.predict("", api_name="/new_session")
    second = chat_outputs(client, other["id"], "Say something.", model_id="tiny-llama")[-1]  # named explicitly
    assert first == second
    assert client.predict(other["id"], api_name="/history")[-1] == {"role": "assistant", "content": second}


def test_regenerate_with_an_unknown_model_keeps_the_last_reply(app, client, session):
    chat_outputs(client, session["id"], "Hello")
    before = client.predict(session["id"], api_name="/history")
    with pytest.raises(KeyError):
        list(app.service.chat(LOCAL_USER, session["id"], "", "no-such-model", "", regenerate=True))
    assert client.predict(session["id"], api_name="/history") == before


def test_stop_ends_a_long_generation_and_keeps_the_partial_reply(app, client, session):
    assert client.predict(session["id"], api_name="/stop") == {"stopped": False}  # nothing running
    with counted_forwards(app.service, "tiny-llama", delay_s=0.05) as forwards:
        job = client.submit(session["id"], "Tell me a very long story.", "", LONG, api_name="/chat")
        wait_until(lambda: forwards.calls >= 5, what="the generation to start")
        assert client.predict(session["id"], api_name="/stop") == {"stopped": True}
        reply = job.result(timeout=60)
    stored = [m for m in app.service.messages(LOCAL_USER, session["id"]) if m["role"] == "assistant"][-1]
    assert stored["content"] == reply
    assert stored["stats"]["finish_reason"] == "cancelled"
    assert stored["stats"]["completion_tokens"] < 100, "the stop did not end the generation early"
    assert client.predict(session["id"], api_name="/history")[-1] == {"role": "assistant", "content": reply}
    assert client.predict(session["id"], api_name="/stop") == {"stopped": False}


def test_a_stop_in_one_session_leaves_others_running(app, client):
    first, second = (client.predict("", api_name="/new_session")["id"] for _ in range(2))
    with counted_forwards(app.service, "tiny-llama", delay_s=0.02) as forwards:
        job = client.submit(second, "Hello", "", '{"temperature": 0, "max_tokens": 20}', api_name="/chat")
        wait_until(lambda: forwards.calls >= 2, what="the generation to start")
        assert client.predict(first, api_name="/stop") == {"stopped": False}
        job.result(timeout=60)
    stored = [m for m in app.service.messages(LOCAL_USER, second) if m["role"] == "assistant"][-1]
    assert stored["stats"]["finish_reason"] != "cancelled"


def test_a_client_that_goes_away_stops_its_generation(app, client, session):
    with counted_forwards(app.service, "tiny-llama", delay_s=0.05) as forwards:
        job = client.submit(session["id"], "Tell me a very long story.", "", LONG, api_name="/chat")
        wait_until(lambda: forwards.calls >= 5, what="the generation to start")
        job.cancel()
        left_at = time.monotonic()
        wait_until(lambda: app.service.engine.gate.running == 0, timeout=5, what="the generation to end")
        assert forwards.calls_after(left_at) <= 3
    replies = wait_until(lambda: [m for m in app.service.messages(LOCAL_USER, session["id"])
                                  if m["role"] == "assistant"], timeout=5, what="the partial reply")
    assert replies[-1]["stats"]["finish_reason"] == "cancelled"
    assert [m["role"] for m in client.predict(session["id"], api_name="/history")] == ["user", "assistant"]


def test_calls_get_through_while_chats_wait(app, client):
    """This app runs one generation at a time: while one runs and another waits, /stop and the rest still work."""
    running, waiting = (client.predict("", api_name="/new_session")["id"] for _ in range(2))
    with counted_forwards(app.service, "tiny-llama", delay_s=0.05) as forwards:
        long_job = client.submit(running, "Tell me a very long story.", "", LONG, api_name="/chat")
        wait_until(lambda: forwards.calls >= 3, what="the first generation to start")
        queued_job = client.submit(waiting, "Hello", "", GREEDY, api_name="/chat")
        wait_until(lambda: queued_job.status().code == Status.IN_QUEUE, what="the second chat to wait")
        assert running in {s["id"] for s in client.predict(api_name="/list_sessions")}
        assert client.predict(waiting, api_name="/history") == []
        assert client.predict(running, api_name="/stop") == {"stopped": True}
        long_job.result(timeout=60)
        reply = queued_job.result(timeout=60)
    assert client.predict(waiting, api_name="/history")[-1] == {"role": "assistant", "content": reply}
    assert client.predict(running, api_name="/history")[-1]["role"] == "assistant"


# ----- files ------------------------------------------------------------------------------------------------------
def test_uploaded_file_is_parsed_reaches_the_prompt_and_can_be_removed(app, client, session, tmp_path, monkeypatch):
    text = "The secret word is mango."
    path = tmp_path / "secret notes.txt"
    path.write_text(text)
    started = time.monotonic()
    record = client.predict(session["id"], handle_file(str(path)), api_name="/upload_file")
    assert time.monotonic() - started < 10
    assert set(record) == FILE_FIELDS
    assert record["state"] in ("parsing", "ready") and record["name"] == "secret notes.txt"
    assert re.fullmatch(r"[0-9a-f]{32}", record["id"])

    def ready():
        files = client.predict(session["id"], api_name="/list_files")
        return files if files and files[0]["state"] != "parsing" else None

    files = wait_until(ready, what="the file to be parsed")
    assert files == [{**record, "state": "ready", "error": None, "chars": len(text), "tokens": files[0]["tokens"]}]
    assert files[0]["tokens"] > 0

    prompts = []
    real_stream_chat = app.service.engine.stream_chat

    def recording_stream_chat(model, messages, *args, **kwargs):
        prompts.append(messages)
        return real_stream_chat(model, messages, *args, **kwargs)

    monkeypatch.setattr(app.service.engine, "stream_chat", recording_stream_chat)
    chat_outputs(client, session["id"], "What is the secret word?")
    assert text in "\n".join(m["content"] for m in prompts[-1])
    stored = [m for m in app.service.messages(LOCAL_USER, session["id"]) if m["role"] == "assistant"][-1]
    assert stored["context_report"]["files_included"] == ["secret notes.txt"]

    assert client.predict(session["id"], record["id"], api_name="/remove_file") == {"removed": record["id"]}
    assert client.predict(session["id"], api_name="/list_files") == []
    chat_outputs(client, session["id"], "And now?")
    assert text not in "\n".join(m["content"] for m in prompts[-1])


def test_unreadable_file_ends_in_error_state(client, session, tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4 this is not really a pdf")
    record = client.predict(session["id"], handle_file(str(path)), api_name="/upload_file")
    files = wait_until(lambda: [f for f in client.predict(session["id"], api_name="/list_files")
                                if f["id"] == record["id"] and f["state"] != "parsing"], what="the parse to end")
    assert files[0]["state"] == "error"
    assert_person_readable(Exception(files[0]["error"] or ""))
    assert_app_still_works(client)


# ----- the real model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_model_answers_in_english(client, session):
    outputs = chat_outputs(client, session["id"], "What is the capital of France? Answer in one sentence.",
                           model_id="gemma-3-270m", settings='{"temperature": 0, "max_tokens": 16}')
    reply = outputs[-1]
    assert reply.strip()
    words = re.findall(r"[A-Za-z]{2,}", reply)
    assert len(words) >= 2, reply
    assert sum(ch.isascii() for ch in reply) >= 0.9 * len(reply), reply
    assert client.predict(session["id"], api_name="/history")[-1]["content"] == reply


# ----- users ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("app-auth"), tiny_models, model_cache, bundled_model,
                        auth=[("alice", "pw1"), ("bob", "pw2")])
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def alice(auth_app):
    return Client(auth_app.url, auth=("alice", "pw1"), verbose=False, download_files=False)


@pytest.fixture(scope="module")
def bob(auth_app):
    return Client(auth_app.url, auth=("bob", "pw2"), verbose=False, download_files=False)


def test_login_is_required(auth_app):
    with pytest.raises(Exception):
        Client(auth_app.url, verbose=False)
    with pytest.raises(Exception):
        Client(auth_app.url, auth=("alice", "wrong"), verbose=False)


def test_each_user_sees_only_their_own_sessions(auth_app, alice, bob, tmp_path):
    path = tmp_path / "bob.txt"
    path.write_text("Bob's private notes.")
    theirs = bob.predict("Bob's chat", api_name="/new_session")
    bob_file = bob.predict(theirs["id"], handle_file(str(path)), api_name="/upload_file")
    chat_outputs(bob, theirs["id"], "Hello from Bob")
    bob_history = bob.predict(theirs["id"], api_name="/history")
    mine = alice.predict("Alice's chat", api_name="/new_session")

    assert [s["id"] for s in alice.predict(api_name="/list_sessions")] == [mine["id"]]
    assert theirs["id"] in {s["id"] for s in bob.predict(api_name="/list_sessions")}
    assert mine["id"] not in {s["id"] for s in bob.predict(api_name="/list_sessions")}

    calls = [("/history", (theirs["id"],)), ("/chat", (theirs["id"], "hi", "", "")),
             ("/upload_file", (theirs["id"], handle_file(str(path)))), ("/list_files", (theirs["id"],)),
             ("/remove_file", (theirs["id"], bob_file["id"])), ("/rename_session", (theirs["id"], "mine now")),
             ("/stop", (theirs["id"],)), ("/delete_session", (theirs["id"],))]
    for api_name, args in calls:
        with pytest.raises(Exception) as caught:
            alice.predict(*args, api_name=api_name)
        assert_person_readable(caught.value, "unknown session")

    # Bob's session is untouched
    assert bob.predict(theirs["id"], api_name="/history") == bob_history
    assert [f["id"] for f in bob.predict(theirs["id"], api_name="/list_files")] == [bob_file["id"]]
    assert next(s for s in bob.predict(api_name="/list_sessions") if s["id"] == theirs["id"])["title"] == "Bob's chat"
    assert auth_app.service.session_owner(theirs["id"]) == "bob"
    assert auth_app.service.session_owner(mine["id"]) == "alice"


def test_last_reply_carries_the_context_report(client, session):
    sid = session["id"]
    assert client.predict(sid, api_name="/last_reply")["context_report"] is None
    chat_outputs(client, sid, "Tell me something.")
    last = client.predict(sid, api_name="/last_reply")
    report = last["context_report"]
    assert report["prompt_tokens"] > 0 and report["context_limit"] >= report["prompt_tokens"]
    assert {"dropped_turns", "files_included", "files_partial", "files_left_out"} <= set(report)
    assert last["stats"]["completion_tokens"] >= 1 and last["model_id"]
