"""Local and remote models behind one protocol: the engine asks no model which kind it is."""

from __future__ import annotations

import threading

import pytest

from inference.engine import Engine
from inference.generate import PromptTooLong
from inference.params import GenerationParams
from inference.peers import REMOTE_CONTEXT, LocalPeer, RemotePeer, approx_tokens
from models.catalog import RemoteEngine, ModelSpec
from models.loader import load_model

GREEDY = GenerationParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def lm(tiny_models, model_cache):
    return load_model(tiny_models["qwen2"], model_cache)


def test_a_loaded_model_is_a_local_peer(lm):
    engine = Engine()
    peer = engine.peer(lm)
    assert isinstance(peer, LocalPeer)
    assert peer.context_length == lm.context_length == engine.context_limit(lm)
    assert engine.token_counter(lm)("hello there") == lm.count_tokens("hello there")
    with pytest.raises(PromptTooLong):
        peer.prepare([{"role": "user", "content": "word " * 400}])


@pytest.mark.parametrize("batching", [True, False])
def test_both_ways_of_running_give_the_same_reply(lm, batching):
    messages = [{"role": "user", "content": "Say something."}]
    engine = Engine(batching=batching)
    text = "".join(c.text for c in engine.stream_chat(lm, messages, GREEDY, threading.Event()))
    other = Engine(batching=not batching)
    assert text == "".join(c.text for c in other.stream_chat(lm, messages, GREEDY, threading.Event()))


def test_a_remote_spec_is_a_remote_peer():
    spec = ModelSpec("far", "Far away", remote=RemoteEngine(base_url="http://127.0.0.1:9/v1", model="m"))
    engine = Engine()
    peer = engine.peer(spec)
    assert isinstance(peer, RemotePeer)
    assert engine.context_limit(spec) == REMOTE_CONTEXT
    assert engine.token_counter(spec)("abcdefgh") == approx_tokens("abcdefgh") == 2
    messages = [{"role": "user", "content": "hi"}]
    assert peer.prepare(messages) is messages  # sent as they are
