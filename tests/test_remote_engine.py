"""Remote engines end to end: a second instance of the app, on another loopback port, is the remote.

`far` serves tiny-llama behind an API key; `near` lists it as `--remote far=URL,model=tiny-llama,key=KEY`
(plus two misconfigured entries) and is driven through gradio_client and the openai client.
The last test shuts `far` down.
"""

from __future__ import annotations

import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from gradio_client import Client
from openai import OpenAI

from app_harness import app_config, counted_forwards, free_port, running_app, start_app, wait_until
from sessions import LOCAL_USER

FAR_KEY = "far-secret-0d9e1f"
GREEDY = '{"temperature": 0, "max_tokens": 12}'


@pytest.fixture(scope="module")
def far(tmp_path_factory, tiny_models, model_cache):
    config = app_config(tmp_path_factory.mktemp("far"), {"llama": tiny_models["llama"]}, model_cache,
                        api_key=FAR_KEY)
    app = start_app(config)
    yield app
    app.stop()  # idempotent: the last test stops it early


class _BrokenRemote(BaseHTTPRequestHandler):
    """An "OpenAI-compatible" server that answers with broken event streams, chosen by the model name."""

    EVENTS = {"not-json": b"data: {this is not json\n\n", "error-string": b'data: {"error": "the GPU caught fire"}\n\n',
              "html": b"<html>oops</html>",
              # a plain server that answers well but knows nothing of logprobs, and reports usage last
              "recorded-ok": b'data: {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}\n\n'
                             b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                             b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}\n\n'
                             b"data: [DONE]\n\n"}
    bodies: list[dict] = []  # every request body received, for the tests to read

    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.bodies.append(json.loads(body))
        model = next((name for name in self.EVENTS if name.encode() in body), "not-json")
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(self.EVENTS[model])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def broken_remote():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenRemote)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def near(tmp_path_factory, tiny_models, model_cache, far, broken_remote):
    base = f"http://127.0.0.1:{far.config.port}/v1"
    remotes = [f"far={base},model=tiny-llama,key={FAR_KEY}", f"far-nokey={base},model=tiny-llama",
               f"far-nomodel={base},model=no-such-model,key={FAR_KEY}",
               f"nowhere=http://127.0.0.1:{free_port()}/v1,model=x",
               f"garbled={broken_remote},model=not-json", f"failing={broken_remote},model=error-string",
               f"html={broken_remote},model=html", f"recorded={broken_remote},model=recorded-ok"]
    config = app_config(tmp_path_factory.mktemp("near"), {"llama": tiny_models["llama"]}, model_cache,
                        remotes=remotes)
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(near):
    return Client(near.url, verbose=False, download_files=False)


@pytest.fixture
def session(client):
    return client.predict("", api_name="/new_session")


def far_client(far) -> OpenAI:
    return OpenAI(base_url=far.v1, api_key=FAR_KEY, max_retries=0, timeout=60)


def assert_clear_error(error: Exception, *fragments: str) -> str:
    message = str(error)
    assert message.strip()
    assert not re.search(r'Traceback|File "|line \d+, in', message), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


def test_remote_is_listed_with_the_local_models(client):
    records = {r["id"]: r for r in client.predict(api_name="/list_models")}
    assert {"far", "far-nokey", "far-nomodel", "nowhere", "tiny-llama"} <= set(records)
    far_record = records["far"]
    assert far_record["state"] == "loaded" and far_record["architecture"] == "remote"
    assert far_record["error"] is None and far_record["memory_bytes"] == 0


def test_chat_with_the_remote_streams_and_stores_the_reply(far, client, session):
    question = "Hello there, how are you?"
    job = client.submit(session["id"], question, "far", GREEDY, api_name="/chat")
    job.result(timeout=120)
    outputs = [o for o in dict.fromkeys(job.outputs()) if o]
    assert len(outputs) >= 3, f"expected a streamed reply, got {job.outputs()!r}"
    final = job.outputs()[-1]
    assert client.predict(session["id"], api_name="/history") == [
        {"role": "user", "content": question}, {"role": "assistant", "content": final}]
    assert next(s for s in client.predict(api_name="/list_sessions") if s["id"] == session["id"])["model_id"] == "far"
    with far_client(far) as direct:  # the same greedy reply as asking far itself
        expected = direct.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": question}],
                                                  max_tokens=12, temperature=0)
    assert final == expected.choices[0].message.content


def test_remote_reply_records_tokens(near, client, session):
    client.predict(session["id"], "Hello", "far", GREEDY, api_name="/chat")
    stored = [m for m in near.service.messages(LOCAL_USER, session["id"]) if m["role"] == "assistant"][-1]
    assert stored["model_id"] == "far"
    assert 0 < stored["stats"]["completion_tokens"] <= 12 and stored["stats"]["prompt_tokens"] > 0
    assert stored["stats"]["finish_reason"] in ("stop", "length")


def test_v1_serves_the_remote_model(near):
    with OpenAI(base_url=near.v1, api_key="unused", max_retries=0, timeout=60) as client:
        assert "far" in {m.id for m in client.models.list().data}
        reply = client.chat.completions.create(model="far", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0)
        assert reply.choices[0].message.content and reply.model == "far"
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
        chunks = list(client.chat.completions.create(model="far", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=6, temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == reply.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_logprobs_pass_through_to_the_remote(near, far):
    question = [{"role": "user", "content": "Hi"}]
    with OpenAI(base_url=near.v1, api_key="unused", max_retries=0, timeout=60) as client, far_client(far) as direct:
        through = client.chat.completions.create(model="far", messages=question, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=2)
        expected = direct.chat.completions.create(model="tiny-llama", messages=question, max_tokens=5,
                                                  temperature=0, logprobs=True, top_logprobs=2)
        got, want = through.choices[0].logprobs.content, expected.choices[0].logprobs.content
        assert [t.token for t in got] == [t.token for t in want] and len(got) > 0
        assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-4) and len(a.top_logprobs) == 2
                   for a, b in zip(got, want))
        streamed = list(client.chat.completions.create(model="far", messages=question, max_tokens=5, temperature=0,
                                                       logprobs=True, stream=True))
        tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
                  for t in c.choices[0].logprobs.content]
        assert tokens == [t.token for t in want]


def test_text_completions_are_refused_for_a_remote(near):
    with OpenAI(base_url=near.v1, api_key="unused", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="far", prompt="Once upon a time", max_tokens=4)
        assert "remote engine" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:  # fill-in-the-middle: refused by name
            client.completions.create(model="far", prompt="def f(", suffix="    return x", max_tokens=4)
    assert "remote engine" in caught.value.message and caught.value.body["param"] == "suffix"


def test_remote_gets_top_k_repetition_penalty_and_usage(near, client, session):
    _BrokenRemote.bodies.clear()
    settings = '{"temperature": 0.5, "top_k": 7, "repetition_penalty": 1.3, "max_tokens": 5}'
    assert client.predict(session["id"], "Hello", "recorded", settings, api_name="/chat") == "Hi"
    body = _BrokenRemote.bodies[-1]
    assert body["top_k"] == 7 and body["repetition_penalty"] == body["repeat_penalty"] == 1.3
    assert body["stream_options"] == {"include_usage": True} and "logprobs" not in body
    stored = [m for m in near.service.messages(LOCAL_USER, session["id"]) if m["role"] == "assistant"][-1]
    assert stored["stats"]["prompt_tokens"] == 7  # the remote's own count, from the usage it was asked for


def test_remote_that_ignores_logprobs_is_an_error_not_a_silent_answer(near):
    with OpenAI(base_url=near.v1, api_key="unused", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="recorded", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=5, logprobs=True)
    assert "does not return logprobs" in caught.value.message
    assert _BrokenRemote.bodies[-1]["logprobs"] is True and _BrokenRemote.bodies[-1]["top_logprobs"] == 0


def test_stop_reaches_the_remote(far, client, session):
    with counted_forwards(far.service, "tiny-llama", delay_s=0.05) as forwards:
        job = client.submit(session["id"], "Tell me a long story.", "far", '{"temperature": 0, "max_tokens": 4000}',
                            api_name="/chat")
        wait_until(lambda: forwards.calls >= 5, what="the remote generation to start")
        assert client.predict(session["id"], api_name="/stop") == {"stopped": True}
        reply = job.result(timeout=60)
        wait_until(lambda: far.service.engine.gate.running == 0, timeout=5, what="far to stop generating")
        assert forwards.calls < 100
    assert client.predict(session["id"], api_name="/history")[-1] == {"role": "assistant", "content": reply}


@pytest.mark.parametrize("model_id, fragments", [
    ("far-nokey", ["far-nokey", "401", "api key"]),
    ("far-nomodel", ["far-nomodel", "404", "no-such-model"]),
    ("nowhere", ["nowhere", "unreachable"]),
    ("garbled", ["garbled", "not json"]),
    ("failing", ["failing", "the GPU caught fire"]),
    ("html", ["html", "did not answer with an openai event stream"]),
])
def test_misconfigured_remotes_fail_clearly(client, session, model_id, fragments):
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], "Hello", model_id, GREEDY, api_name="/chat")
    assert_clear_error(caught.value, *fragments)
    assert model_id in {r["id"] for r in client.predict(api_name="/list_models")}


def test_remote_down_fails_clearly_and_the_app_carries_on(far, near, client, session):
    far.stop()
    with pytest.raises(Exception) as caught:
        client.predict(session["id"], "Are you there?", "far", GREEDY, api_name="/chat")
    assert_clear_error(caught.value, "far", "unreachable")

    response = httpx.post(f"{near.v1}/chat/completions", timeout=30,
                          json={"model": "far", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert response.status_code == 503
    assert "far" in response.json()["error"]["message"]
    with OpenAI(base_url=near.v1, api_key="unused", max_retries=0, timeout=60) as v1:
        with pytest.raises(openai.InternalServerError):
            v1.chat.completions.create(model="far", messages=[{"role": "user", "content": "Hi"}], stream=True)

    # the near app carries on: local chat, listing, the failed session itself
    assert client.predict(session["id"], "Hello", "tiny-llama", GREEDY, api_name="/chat")
    assert "far" in {r["id"] for r in client.predict(api_name="/list_models")}
    assert httpx.get(f"{near.url}/health", timeout=10).status_code == 200


def test_remote_option_is_checked_on_the_command_line(capsys):
    from inference.config import config_from_args

    good = "far=http://gpu-box:8000/v1,model=meta-llama/Llama-3.1-8B-Instruct,key=abc"
    assert config_from_args(["--remote", good, "--remote", "other=https://x/v1"]).remotes == [
        good, "other=https://x/v1"]
    with pytest.raises(SystemExit):
        config_from_args(["--remote", "far=gpu-box:8000"])
    error = capsys.readouterr().err
    assert "--remote wants ID=http(s)://" in error and "Traceback" not in error


def test_openai_penalties_reach_the_remote_only_when_set():
    from inference.params import GenerationParams
    from inference.remote import _request_body
    from models.catalog import RemoteEngine

    engine = RemoteEngine("http://x/v1", "m")
    plain = _request_body(engine, [], GenerationParams())
    assert "presence_penalty" not in plain and "frequency_penalty" not in plain
    penalised = _request_body(engine, [], GenerationParams(presence_penalty=0.5, frequency_penalty=-0.5))
    assert penalised["presence_penalty"] == 0.5 and penalised["frequency_penalty"] == -0.5


def test_sampling_extras_reach_the_remote_only_when_set():
    from inference.params import GenerationParams
    from inference.remote import _request_body
    from models.catalog import RemoteEngine

    engine = RemoteEngine("http://x/v1", "m")
    plain = _request_body(engine, [], GenerationParams(top_k=0))
    assert not {"top_k", "repetition_penalty", "repeat_penalty", "logprobs", "top_logprobs"} & set(plain)
    assert plain["stream_options"] == {"include_usage": True}
    asked = _request_body(engine, [], GenerationParams(top_k=20, repetition_penalty=1.1, logprobs=3))
    assert asked["top_k"] == 20 and asked["repetition_penalty"] == asked["repeat_penalty"] == 1.1
    assert asked["logprobs"] is True and asked["top_logprobs"] == 3
