"""Isolation and file safety through the Gradio side of an app run with --auth (alice and bob).

test_app_api.py checks that alice's calls to the named endpoints cannot reach bob's session. This file
covers the rest: Gradio's own routes (upload, file serving, the call API without a login), file inputs
that name a path on the server instead of an upload, upload names built to escape the data dir, many
uploads at once, the /v1 routes of an app with --auth, and the shape of session ids.
"""

from __future__ import annotations

import re
import socket
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from gradio.utils import get_upload_folder

from app_harness import app_config, gradio_call, running_app, wait_until

USERS = {"alice": "pw-alice", "bob": "pw-bob"}
MAX_FILES = 4
TRACEBACK = re.compile(r'Traceback|File "|line \d+, in |\w+Error\(|Internal error')


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("security-gradio"), {"llama": tiny_models["llama"]}, model_cache,
                        bundled_model, auth=list(USERS.items()), max_files_per_session=MAX_FILES,
                        max_upload_bytes=64 * 1024)
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


def refused(client, name, *data) -> str:
    event, message = gradio_call(client, name, *data)
    assert event == "error", (name, event, message)
    assert isinstance(message, str) and message.strip() and not TRACEBACK.search(message), message
    return message


def upload(client: httpx.Client, name: str, data: bytes) -> str:
    """Send bytes through Gradio's upload route; the path it returns, inside its upload folder."""
    response = client.post("/gradio_api/upload", files={"files": (name, data)})
    assert response.status_code == 200, response.text
    return response.json()[0]


def file_data(path: str, orig_name: str | None = None) -> dict:
    return {"path": path, "orig_name": orig_name, "meta": {"_type": "gradio.FileData"}}


def attach(client, sid: str, name: str, data: bytes, orig_name: str | None = None) -> dict:
    return ok(client, "upload_file", sid, file_data(upload(client, name, data), orig_name or name))


def wait_parsed(client, sid: str) -> list[dict]:
    return wait_until(lambda: (lambda files: files if all(f["state"] != "parsing" for f in files) else None)(
        ok(client, "list_files", sid)), what="the uploads to be parsed")


@pytest.fixture(scope="module")
def bobs(app, bob):
    """Bob's session with a chat turn and a parsed file."""
    sid = ok(bob, "new_session", "Bob's")["id"]
    ok(bob, "chat", sid, "Hello from Bob", "", '{"max_tokens": 3, "temperature": 0}')
    record = attach(bob, sid, "bob-notes.txt", b"Bob's private notes: the code is 4711.")
    wait_parsed(bob, sid)
    stored = next((app.config.data_dir / "sessions" / sid / "files").iterdir())
    return {"sid": sid, "file": record, "stored": stored, "history": ok(bob, "history", sid)}


# ----- logins ---------------------------------------------------------------------------------------------------
def test_only_the_upload_route_takes_bodies_over_a_few_mib():
    """With the default --max-upload (50 MB), a 51 MB JSON body used to pass (the one limit was the upload
    limit + 1 MiB on every route); now every route but the upload route stops at a few MiB."""
    import asyncio

    from inference.config import AppConfig
    from inference.http import BodySizeLimit

    config = AppConfig(max_upload_bytes=50 * 10**6)
    assert config.max_body_bytes == 4 * 2**20 < 51 * 10**6 < config.max_upload_body_bytes

    async def echo_length(scope, receive, send):  # the app behind the limit: reads the whole body
        size, more = 0, True
        while more:
            message = await receive()
            size, more = size + len(message.get("body", b"")), message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})

    limited = BodySizeLimit(echo_length, max_bytes=100, larger={"/gradio_api/upload": 1000})

    async def post(path: str, size: int) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=limited), base_url="http://app") as client:
            return await client.post(path, content=b"x" * size)

    assert asyncio.run(post("/gradio_api/queue/join", 101)).status_code == 413
    assert asyncio.run(post("/gradio_api/upload", 500)).text == "500"
    assert asyncio.run(post("/gradio_api/upload", 1001)).status_code == 413


def declare_body(app, path: str, length: int) -> bytes:
    """Send only the headers of a POST that declares a `length`-byte body; the server's first answer."""
    with socket.create_connection(("127.0.0.1", app.config.port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        return answer


@pytest.mark.parametrize("path", ["/gradio_api/queue/join", "/gradio_api/call/chat", "/v1/chat/completions",
                                  "/gradio_api/upload"])
def test_a_huge_body_is_refused_before_it_is_read_or_a_login_is_checked(app, path):
    """51 MB declared by someone who has not logged in: 413 at once, without a byte of the body sent (it used
    to be read whole, then refused with 401). Only the upload route takes more than a few MiB."""
    answer = declare_body(app, path, 51_000_000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"larger than" in answer
    small = app.config.max_body_bytes
    assert declare_body(app, "/gradio_api/queue/join", small + 1).startswith(b"HTTP/1.1 413")
    assert httpx.get(f"{app.url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize("method, path", [
    ("POST", "/gradio_api/call/list_sessions"), ("POST", "/gradio_api/call/history"),
    ("POST", "/gradio_api/upload"), ("GET", "/gradio_api/file=/etc/hostname"), ("GET", "/gradio_api/info"),
    ("POST", "/gradio_api/queue/join"), ("GET", "/config"),
])
def test_gradio_routes_refuse_requests_without_a_login(app, method, path):
    with httpx.Client(base_url=app.url, timeout=30) as anonymous:
        kwargs = {"files": {"files": ("a.txt", b"x")}} if path.endswith("upload") else (
            {"json": {"data": []}} if method == "POST" else {})
        assert anonymous.request(method, path, **kwargs).status_code == 401
        wrong = anonymous.post("/login", data={"username": "alice", "password": "pw-bob"})
        assert wrong.status_code >= 400
        assert anonymous.request(method, path, **kwargs).status_code == 401


# ----- file inputs that name a path on the server --------------------------------------------------------------
def planted(tmp_path_factory) -> Path:
    """A file outside every upload folder, as /etc/passwd or another app's data would be."""
    path = tmp_path_factory.mktemp("server-files") / f"secret-{uuid.uuid4().hex}.txt"
    path.write_text("server secret")
    return path


@pytest.mark.parametrize("shape", ["file-data", "bare-dict", "named-dict", "string"])
def test_a_file_input_cannot_name_a_path_on_the_server(app, alice, tmp_path_factory, shape):
    secret = planted(tmp_path_factory)
    value = {"file-data": file_data(str(secret)), "bare-dict": {"path": str(secret)},
             "named-dict": {"path": str(secret), "orig_name": "innocent.txt"}, "string": str(secret)}[shape]
    sid = ok(alice, "new_session", "attacker")["id"]
    refused(alice, "upload_file", sid, value)
    assert ok(alice, "list_files", sid) == []
    assert secret.read_text() == "server secret", "the app removed a file it did not write"
    assert not list(Path(app.config.data_dir / "sessions" / sid).rglob("*.txt"))


def test_another_users_stored_upload_cannot_be_attached_or_removed(app, alice, bobs):
    sid = ok(alice, "new_session", "attacker")["id"]
    for value in (file_data(str(bobs["stored"])), {"path": str(bobs["stored"])},
                  file_data(f"{bobs['stored'].parent}/../files/{bobs['stored'].name}")):
        refused(alice, "upload_file", sid, value)
    assert ok(alice, "list_files", sid) == []
    assert bobs["stored"].exists()


def test_the_file_route_serves_nothing_from_the_data_dir(app, alice, bob, bobs):
    data = app.config.data_dir
    parsed = next((data / "sessions" / bobs["sid"] / "parsed").iterdir())
    targets = [bobs["stored"], parsed, data / "sessions" / "index.json", data / "models" / "tiny-llama.gguf",
               f"{data}/sessions/../sessions/index.json", "../../../../etc/hostname", "/etc/hostname"]
    for client in (alice, bob):  # not even to the owner: uploads are read by the app, never served back
        for target in targets:
            response = client.get(f"/gradio_api/file={target}")
            assert response.status_code in (403, 404), (target, response.status_code)
            assert "4711" not in response.text


def test_an_upload_leaves_no_copy_for_the_file_route(app, alice, bob):
    sid = ok(bob, "new_session", "copies")["id"]
    path = upload(bob, "pending.txt", b"pending upload of bob")
    assert alice.get(f"/gradio_api/file={path}").status_code == 200  # Gradio serves its upload folder...
    ok(bob, "upload_file", sid, file_data(path, "pending.txt"))
    for client in (alice, bob):  # ...so the app takes the file out of it at once
        assert client.get(f"/gradio_api/file={path}").status_code in (403, 404)
    assert not Path(path).exists()


# ----- names -----------------------------------------------------------------------------------------------------
ESCAPES = ["../../../../../../tmp/{tag}.txt", "..\\..\\..\\{tag}.txt", "/tmp/{tag}-abs.txt", "sub/../../{tag}.txt",
           "{tag}\x00.txt", "\u202e{tag}txt.exe.txt", "{tag}" + "a" * 400 + ".txt", "....txt", ".{tag}.txt",
           "{tag}\n\r.txt", "CON.txt", "{tag}:stream.txt"]


def test_upload_names_cannot_escape_the_data_dir(app, alice, tmp_path):
    tag = f"escape-{uuid.uuid4().hex[:8]}"
    sid = ok(alice, "new_session", "names")["id"]
    files_dir = app.config.data_dir / "sessions" / sid / "files"
    names = [name.format(tag=tag) for name in ESCAPES[:MAX_FILES]]
    extra = [name.format(tag=tag) for name in ESCAPES[MAX_FILES:]]
    for name in names:
        record = attach(alice, sid, "upload.txt", b"hostile name", orig_name=name)
        assert "/" not in record["name"] and "\\" not in record["name"] and "\x00" not in record["name"]
        assert "\n" not in record["name"] and "\u202e" not in record["name"] and len(record["name"]) <= 120
    for name in extra:  # names Gradio's own upload route has to store as well
        path = upload(alice, name, b"hostile name")
        assert Path(path).resolve().is_relative_to(Path(get_upload_folder()).resolve()), path
    for stored in files_dir.iterdir():
        assert re.fullmatch(r"[0-9a-f]{32}\.txt", stored.name), stored.name
    assert not list(Path("/tmp").glob(f"{tag}*")) and not list(app.config.data_dir.rglob(f"*{tag}*"))
    assert not list(Path.cwd().glob(f"*{tag}*"))


# ----- many at once ----------------------------------------------------------------------------------------------
def test_many_uploads_at_once_respect_the_file_limit(app, alice, bob):
    sessions = {"alice": ok(alice, "new_session", "burst")["id"], "bob": ok(bob, "new_session", "burst")["id"]}
    results: dict[str, list] = {"alice": [], "bob": []}

    def send(user, client, index):
        path = upload(client, f"{user}-{index}.txt", f"{user} file {index}".encode())
        results[user].append(gradio_call(client, "upload_file", sessions[user], file_data(path, f"{user}-{index}.txt")))

    threads = [threading.Thread(target=send, args=(user, client, i))
               for i in range(3 * MAX_FILES) for user, client in (("alice", alice), ("bob", bob))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for user, client in (("alice", alice), ("bob", bob)):
        events = [event for event, _ in results[user]]
        assert events.count("complete") == MAX_FILES, results[user]
        assert events.count("error") == 2 * MAX_FILES
        assert all(str(MAX_FILES) in message for event, message in results[user] if event == "error")
        files = wait_parsed(client, sessions[user])
        assert len(files) == MAX_FILES and {f["state"] for f in files} == {"ready"}
        assert all(f["name"].startswith(user) for f in files)  # each upload landed in its owner's session
        stored = list((app.config.data_dir / "sessions" / sessions[user] / "files").iterdir())
        assert len(stored) == MAX_FILES, "a refused upload left its bytes behind"


# ----- isolation beyond the named endpoints ----------------------------------------------------------------------
def test_a_file_id_from_another_users_session_is_unknown_in_yours(alice, bob, bobs):
    mine = ok(alice, "new_session", "mine")["id"]
    message = refused(alice, "remove_file", mine, bobs["file"]["id"])
    assert "4711" not in message
    assert [f["id"] for f in ok(bob, "list_files", bobs["sid"])] == [bobs["file"]["id"]]


def test_someone_elses_session_reads_exactly_like_one_that_does_not_exist(alice, bobs):
    """No oracle: the message for bob's session is the one for a random id, with the id swapped."""
    random_id = uuid.uuid4().hex
    for name, args in (("history", ()), ("list_files", ()), ("rename_session", ("x",)), ("stop", ())):
        theirs = refused(alice, name, bobs["sid"], *args)
        nobody = refused(alice, name, random_id, *args)
        assert theirs.replace(bobs["sid"], "ID") == nobody.replace(random_id, "ID")


def test_v1_with_auth_cannot_reach_a_users_session(app, bob, bobs):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "What is the code?"}], "max_tokens": 2}
    response = httpx.post(f"{app.v1}/chat/completions", json=body, headers={"X-Session-Id": bobs["sid"]}, timeout=60)
    assert response.status_code == 404 and "session" in response.json()["error"]["message"].lower()
    assert ok(bob, "history", bobs["sid"]) == bobs["history"]


def test_session_ids_are_unguessable(app, alice, bob):
    ids = [ok(client, "new_session", "")["id"] for client in (alice, bob) for _ in range(20)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    as_ints = [int(i, 16) for i in ids]
    assert len({i >> 96 for i in as_ints}) == len(ids), "ids share a prefix: sequential or time-based?"
    ones = sum(bin(i).count("1") for i in as_ints) / (128 * len(ids))
    assert 0.45 < ones < 0.55, f"{ones:.2f} of the id bits are set; random ids set half"
    listed = {s["id"] for s in ok(alice, "list_sessions")}
    assert not listed & set(ids[20:]) and set(ids[:20]) <= listed
