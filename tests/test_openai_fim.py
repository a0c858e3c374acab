"""`suffix` on `/v1/completions`: fill-in-the-middle for models whose vocabulary has FIM tokens (found by
name, or by the GGUF's `tokenizer.ggml.fim_*` ids), a 400 naming `suffix` for the others; through the
real app and the official `openai` client, with the batch scheduler on."""

from __future__ import annotations

import contextlib

import openai
import pytest
from openai import OpenAI

from app_harness import app_config, running_app
from gguf_factory import FIM_SPECIALS, write_tiny_gguf
from inference.peers import FillIn, FillInUnsupported, RemotePeer
from models.catalog import ModelSpec, RemoteEngine
from models.templates import FimTokens, fim_tokens

PREFIX, SUFFIX = "def add(a, b):\n    ", "\n    return the sum\n"
# a CodeLlama-like vocabulary: its own FIM tokens, named by the GGUF's metadata, besides Qwen-style names
META_SPECIALS = ("<PRE>", "<SUF>", "<MID>", "<EOT>")
FIM_METADATA = {"tokenizer.ggml.fim_pre_token_id": "<PRE>", "tokenizer.ggml.fim_suf_token_id": "<SUF>",
                "tokenizer.ggml.fim_mid_token_id": "<MID>", "tokenizer.ggml.eot_token_id": "<EOT>"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache):
    folder = tmp_path_factory.mktemp("fim-models")
    models = {"llama": tiny_models["llama"],
              "fim": write_tiny_gguf(folder / "fim.gguf", "qwen2", extra_specials=FIM_SPECIALS),
              "fimmeta": write_tiny_gguf(folder / "fimmeta.gguf", "llama", extra_specials=FIM_SPECIALS + META_SPECIALS,
                                         token_metadata=FIM_METADATA)}
    config = app_config(tmp_path_factory.mktemp("v1-fim"), models, model_cache, kernels="torch")
    with running_app(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(app):
    with OpenAI(base_url=app.v1, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def fill(client, model="tiny-fim", **fields):
    return client.completions.create(**{"model": model, "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 6,
                                        "temperature": 0, **fields})


@contextlib.contextmanager
def prefills(app, model_id: str):
    """The prompt rows each forward pass of `model_id` was given (prefills have more than one token)."""
    app.service.load_model(model_id)
    with app.service.manager.use(model_id) as lm:
        model = lm.model
    seen: list[list[int]] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            seen.extend(row.tolist() for row in ids)

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def expected_layout(app, model_id: str, prefix: str, suffix: str, names: tuple[str, str, str]) -> list[int]:
    with app.service.manager.use(model_id) as lm:
        tok = lm.tokenizer
        start = [tok.bos_token_id] if model_id == "tiny-fimmeta" else []  # llama starts every text with BOS
        pre, suf, mid = tok.convert_tokens_to_ids(list(names))
        return [*start, pre, *tok(prefix, add_special_tokens=False)["input_ids"], suf,
                *tok(suffix, add_special_tokens=False)["input_ids"], mid]


def test_a_fim_model_fills_the_hole_in_psm_order(app, client):
    with prefills(app, "tiny-fim") as seen:
        reply = fill(client)
    expected = expected_layout(app, "tiny-fim", PREFIX, SUFFIX, ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
    assert seen == [expected]
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length") and reply.usage.prompt_tokens == len(expected)
    assert not choice.text.startswith(PREFIX) and SUFFIX not in choice.text  # the middle alone
    streamed = "".join(c.choices[0].text for c in fill(client, stream=True) if c.choices)
    assert streamed == choice.text


def test_the_gguf_fim_metadata_is_preferred_to_token_names(app, client):
    with prefills(app, "tiny-fimmeta") as seen:
        reply = fill(client, model="tiny-fimmeta")
    assert seen == [expected_layout(app, "tiny-fimmeta", PREFIX, SUFFIX, ("<PRE>", "<SUF>", "<MID>"))]
    assert reply.choices[0].finish_reason in ("stop", "length")
    with app.service.manager.use("tiny-fimmeta") as lm:
        assert lm.tokenizer.convert_tokens_to_ids("<EOT>") in lm.stop_token_ids  # the file's eot ends a middle


def test_a_fim_model_stops_at_a_file_separator(app):
    app.service.load_model("tiny-fim")
    with app.service.manager.use("tiny-fim") as lm:
        separators = set(lm.tokenizer.convert_tokens_to_ids(["<|file_sep|>", "<|fim_pad|>", "<|endoftext|>"]))
        assert separators <= lm.stop_token_ids
        assert lm.fim == FimTokens(*lm.tokenizer.convert_tokens_to_ids(["<|fim_prefix|>", "<|fim_suffix|>",
                                                                         "<|fim_middle|>"]),
                                   stops=lm.fim.stops)


def test_an_empty_prompt_is_a_hole_at_the_start(app, client):
    with prefills(app, "tiny-fim") as seen:
        reply = fill(client, prompt="")
    names = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    assert seen == [expected_layout(app, "tiny-fim", "", SUFFIX, names)]
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_several_prompts_share_the_suffix(app, client):
    prompts = [PREFIX, "x = "]
    with prefills(app, "tiny-fim") as seen:
        reply = fill(client, prompt=prompts)
    names = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
    expected = [expected_layout(app, "tiny-fim", prompt, SUFFIX, names) for prompt in prompts]
    unpadded = [row[row.index(expected[0][0]):] for row in seen]  # rows prefilled together are left-padded
    assert sorted(unpadded) == sorted(expected) and len(reply.choices) == 2


def test_a_model_without_fim_tokens_refuses_suffix(client):
    with pytest.raises(openai.BadRequestError) as caught:
        fill(client, model="tiny-llama")
    assert caught.value.body["param"] == "suffix" and "fill-in-the-middle" in caught.value.message
    assert fill(client, model="tiny-llama", suffix="").choices[0].text is not None  # an empty suffix: no hole
    with pytest.raises(openai.BadRequestError) as caught:  # nor an empty prompt
        fill(client, model="tiny-llama", prompt="", suffix="")
    assert caught.value.body["param"] == "prompt"


@pytest.mark.parametrize("fields, param", [
    ({"suffix": 5}, "suffix"),
    ({"suffix": ["end"]}, "suffix"),
    ({"echo": True}, "echo"),
])
def test_bad_suffix_requests_name_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        fill(client, **fields)
    assert caught.value.body["param"] == param


def test_a_remote_engine_refuses_a_hole():
    peer = RemotePeer(ModelSpec("far", "Far away", remote=RemoteEngine(base_url="http://127.0.0.1:9/v1", model="m")))
    with pytest.raises(FillInUnsupported, match="suffix: far is a remote engine") as caught:
        peer.prepare(FillIn("a", "b"))
    assert caught.value.param == "suffix"


def test_fim_tokens_from_metadata_then_names():
    names = {"<|fim_prefix|>": 10, "<|fim_suffix|>": 11, "<|fim_middle|>": 12, "<|file_sep|>": 13}
    lookup = names.get
    assert fim_tokens({}, lookup, 20) == FimTokens(10, 11, 12, stops=frozenset({13}))
    metadata = {"tokenizer.ggml.fim_pre_token_id": 3, "tokenizer.ggml.fim_suf_token_id": 4,
                "tokenizer.ggml.fim_mid_token_id": 5, "tokenizer.ggml.fim_sep_token_id": 6}
    assert fim_tokens(metadata, lookup, 20) == FimTokens(3, 4, 5, stops=frozenset({6, 13}))
    out_of_range = {**metadata, "tokenizer.ggml.fim_mid_token_id": 99}
    assert fim_tokens(out_of_range, lookup, 20).prefix == 10  # a broken id in the file: the names decide
    legacy = {"tokenizer.ggml.prefix_token_id": 7, "tokenizer.ggml.suffix_token_id": 8,
              "tokenizer.ggml.middle_token_id": 9}
    assert fim_tokens(legacy, {}.get, 20) == FimTokens(7, 8, 9)
    starcoder = {"<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3}
    assert fim_tokens({}, starcoder.get, 20) == FimTokens(1, 2, 3)
    assert fim_tokens({}, {"<|fim_prefix|>": 1}.get, 20) is None
