"""/v1 and /api (Ollama's routes) behind --api-key, secrets kept out of logs and answers, and the loopback default.

test_openai_api.py and test_ollama_api.py check 401 on the documented routes and a clean log for ordinary
requests; here every /v1 and /api route the app registers is checked (so a new one cannot slip in unguarded), the key
is looked for after the error paths too, a remote engine's key must not leak either, and the
command line binds to 127.0.0.1 unless told otherwise, warning when exposed without protection.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

import app as app_module
from app_harness import app_config, captured_log, free_port, running_app
from inference.config import AppConfig, config_from_args

API_KEY = "sk-sec-9c81f0e2d7b4a6"
REMOTE_KEY = "rk-remote-3e5a7c9b1d"
MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "Hello"}]


def server_log(log) -> str:
    """What the app logged (this test's own HTTP client logs the URLs it requests)."""
    return "\n".join(line for line in log.lines if not line.startswith(("httpx", "httpcore")))


@pytest.fixture(scope="module")
def locked(tmp_path_factory, tiny_models, model_cache, bundled_model):
    closed_port = free_port()  # nothing listens there: the remote engine is unreachable
    config = app_config(tmp_path_factory.mktemp("security-v1"), {"llama": tiny_models["llama"]}, model_cache,
                        bundled_model, api_key=API_KEY,
                        remotes=[f"peer=http://127.0.0.1:{closed_port}/v1,model=m,key={REMOTE_KEY}"])
    with running_app(config) as running:
        yield running


def v1_routes(running) -> list[tuple[str, str]]:
    """Every /v1 and /api route of the running app, as FastAPI's own schema lists them."""
    paths = running.server.config.app.openapi()["paths"]
    routes = [(method.upper(), path.replace("{model_id}", MODEL)) for path, methods in paths.items()
              if path.startswith(("/v1/", "/api/")) for method in methods]
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/models") in routes
    assert ("POST", "/api/chat") in routes and ("GET", "/api/tags") in routes
    assert not any("{" in path for _, path in routes), routes  # every path parameter filled in
    return routes


def request_body(path: str) -> dict:
    """A valid body for each POST route (a GET gets none)."""
    if path.startswith("/v1/"):  # chat reads messages, /v1/completions the prompt; each ignores the other
        return {"model": MODEL, "messages": HELLO, "prompt": "Hello", "max_tokens": 2}
    return {"model": MODEL, "messages": HELLO, "prompt": "Hello", "stream": False, "options": {"num_predict": 2}}


def refused_for_the_key(path: str, response: httpx.Response) -> bool:
    """401 in the route's own error shape: OpenAI's code, or Ollama's message."""
    error = response.json()["error"]
    if path.startswith("/v1/"):
        return error["code"] == "invalid_api_key"
    return "api key" in error.lower()


BAD_CREDENTIALS = [{}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": "Bearer  x"},
                   {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"},
                   {"Authorization": f"Bearer {API_KEY[:-1]}"}, {"Authorization": f"Bearer {API_KEY}0"},
                   {"Authorization": f"Bearer {API_KEY.upper()}"}, {"X-Api-Key": API_KEY}, {"Api-Key": API_KEY}]


def test_every_v1_route_refuses_a_missing_or_wrong_key(locked):
    with captured_log() as log:
        for method, path in v1_routes(locked):
            for headers in BAD_CREDENTIALS:
                for url in (locked.url + path, f"{locked.url}{path}?api_key={API_KEY}"):
                    response = httpx.request(method, url, headers=headers, timeout=30,
                                             json=request_body(path) if method == "POST" else None)
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    assert refused_for_the_key(path, response), (path, response.text)
                    assert API_KEY not in response.text
    assert API_KEY not in server_log(log)


@pytest.mark.parametrize("header", [f"Bearer {API_KEY}", f"bearer {API_KEY}", f"Bearer  {API_KEY}"])
def test_the_right_key_opens_every_v1_route(locked, header):
    for method, path in v1_routes(locked):
        body = request_body(path) if method == "POST" else None
        response = httpx.request(method, locked.url + path, headers={"Authorization": header}, json=body, timeout=60)
        assert response.status_code == 200, (path, response.text[:200])


def test_keys_never_reach_logs_or_answers_even_on_error_paths(locked):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    requests = [
        ("POST", "/v1/chat/completions", {"content": b'{"model": "' + API_KEY.encode() + b'", '}),  # bad JSON
        ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": HELLO, "temperature": -1}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "peer", "messages": HELLO, "max_tokens": 2}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "peer", "messages": HELLO, "stream": True}}),
        ("POST", "/v1/chat/completions", {"json": {"model": MODEL, "messages": HELLO, "max_tokens": 2,
                                                   "stream": True}, "headers": {"X-Session-Id": "bad"}}),
        ("POST", "/api/chat", {"content": b'{"model": "' + API_KEY.encode() + b'", '}),
        ("POST", "/api/chat", {"json": {"model": "peer", "messages": HELLO}}),
        ("POST", "/api/generate", {"json": {"model": "peer", "prompt": "Hi", "raw": True}}),
        ("POST", "/api/show", {"json": {"model": "peer"}}), ("POST", "/api/pull", {"json": {"model": "peer"}}),
        ("GET", "/api/tags", {}), ("GET", "/api/ps", {}),
        ("GET", "/v1/models", {}), ("GET", "/health", {}), ("GET", "/gradio_api/info", {}), ("GET", "/config", {}),
    ]
    with captured_log() as log:
        answers = []
        for method, path, options in requests:
            headers = {**auth, **options.pop("headers", {})}
            response = httpx.request(method, locked.url + path, headers=headers, timeout=60, **options)
            assert response.status_code < 500 or path in ("/v1/chat/completions", "/api/chat"), \
                (path, response.status_code)
            answers.append(response.text)
        try:  # the same failure through the service, as the Gradio side meets it
            list(locked.service.complete("peer", HELLO, _params()))
        except Exception as error:
            answers.append(str(error))
    everything = "\n".join(answers) + server_log(log)
    for secret in (API_KEY, REMOTE_KEY):
        assert secret not in everything, f"{secret[:6]}… leaked"
    assert "peer" in " ".join(answers)  # the remote engine is listed, without its key


def _params():
    from inference.params import GenerationParams

    return GenerationParams(max_tokens=2)


def test_remote_engine_records_hold_no_key(locked):
    records = locked.service.list_models()
    assert any(r["id"] == "peer" for r in records)
    assert REMOTE_KEY not in repr(records)


# ----- binding ---------------------------------------------------------------------------------------------------
def test_the_default_bind_is_loopback(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("LLM_API_KEY", raising=False)
    assert AppConfig().host == "127.0.0.1"
    config = config_from_args([])
    assert config.host == "127.0.0.1" and config.auth == [] and config.api_key is None


def test_the_no_login_user_name_cannot_be_taken_by_a_login(capsys):
    """Without a key, /v1 acts for "local", the owner of sessions made without --auth: no login may be it."""
    with pytest.raises(SystemExit):
        config_from_args(["--auth", "local:secret"])
    assert "reserved" in capsys.readouterr().err


def test_readme_says_what_to_set_before_exposing_the_app():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("Before exposing"):][:600]
    for needed in ("--auth", "--api-key", "HTTPS", "SECURITY.md"):
        assert needed in section, needed
    assert (Path(__file__).resolve().parent.parent / "SECURITY.md").is_file()


@pytest.mark.parametrize("extra, warned", [
    ([], "without --auth or --api-key"), (["--auth", "a:b"], "without --api-key"),
    (["--auth", "a:b", "--api-key", API_KEY], None), (["--host", "127.0.0.1"], None),
])
def test_exposing_the_app_without_protection_is_warned_about(tmp_path, monkeypatch, tiny_models, bundled_model,
                                                             extra, warned):
    """main() as `python app.py --host 0.0.0.0 ...` runs it, up to serving (the server is a stand-in)."""
    models = tmp_path / "models"
    models.mkdir()
    os.symlink(bundled_model, models / bundled_model.name)
    served = []

    class StandIn:
        def __init__(self, app, host, port, **options):
            served.append(host)

        def run(self):
            pass

    monkeypatch.setattr(app_module, "make_server", StandIn)
    argv = ["--host", "0.0.0.0", "--port", str(free_port()), "--data-dir", str(tmp_path), "--no-preload",
            "--idle-unload", "off", *extra]
    with captured_log() as log:
        app_module.main(argv)
    assert served == [extra[extra.index("--host") + 1] if "--host" in extra else "0.0.0.0"]
    warnings = [line for line in log.lines if " WARNING " in line and "listening on" in line]
    if warned:
        assert warnings and warned in warnings[0], log.text[-2000:]
    else:
        assert not warnings
    assert API_KEY not in log.text and "Traceback" not in log.text


def test_the_app_makes_no_calls_home(locked):
    """No telemetry or version check to gradio.app: nothing leaves the machine unless a remote engine is set."""
    gradio_apps = app_module.mounted_gradio_apps(locked.server.config.app)
    assert gradio_apps and not any(a.get_blocks().analytics_enabled for a in gradio_apps)
