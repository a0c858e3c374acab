"""The catalog on tiny GGUF files: instruct or base, a wrong file under a catalog name, a hub without network."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest

from gguf_factory import CHAT_TEMPLATES, write_tiny_gguf
from models.catalog import DEFAULT_MODEL_FILE, DEFAULT_MODEL_ID, HUB_MODELS, RECOMMENDED_MODEL_ID, Catalog
from models.download import DownloadError, ensure_local, hub_unreachable
from models.loader import LoadOptions
from models.manager import ModelError, ModelManager

RECOMMENDED = next(hub for hub in HUB_MODELS if hub.id == RECOMMENDED_MODEL_ID)
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def manager(data_dir, model_cache):
    mgr = ModelManager(Catalog(data_dir), model_cache, memory_budget=1 << 40, options=LoadOptions(dtype="float32"))
    yield mgr
    mgr.close()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----- instruct or base -----------------------------------------------------------------------------------------
def test_records_say_instruct_or_base(manager, data_dir):
    write_tiny_gguf(data_dir / "models" / "with-template.gguf", "qwen2", chat_template=CHAT_TEMPLATES["qwen2"])
    write_tiny_gguf(data_dir / "models" / "tiny-chat-model.gguf", "llama", name="Tiny Chat Model")
    records = {r["id"]: r for r in manager.records()}
    assert records["tiny-llama"]["instruct"] is False  # no chat template, no instruct word: a base model
    assert records["with-template"]["instruct"] is True  # a chat template in the file
    assert records["tiny-chat-model"]["instruct"] is True  # "chat" in its name
    assert records[DEFAULT_MODEL_ID]["instruct"] is False  # the bundled Gemma 3 270M is a base model
    for hub in HUB_MODELS:  # not downloaded: the catalog entry says it
        assert records[hub.id]["instruct"] is True
    recommended = [r for r in records.values() if r["recommended"]]
    assert [r["id"] for r in recommended] == [RECOMMENDED_MODEL_ID]
    assert recommended[0]["download_bytes"] == RECOMMENDED.size_bytes


def test_a_catalog_json_entry_may_say_instruct(data_dir, manager):
    (data_dir / "catalog.json").write_text(json.dumps({"models": [
        {"id": "mine", "name": "My tune", "path": "tiny-llama.gguf", "instruct": True}]}))
    assert manager.record("mine")["instruct"] is True


# ----- a wrong file under a catalog name ----------------------------------------------------------------------
def test_a_wrong_file_under_a_catalog_name_is_refused(manager, data_dir, tiny_models):
    shutil.copy(tiny_models["gemma3"], data_dir / "models" / RECOMMENDED.file)
    record = manager.record(RECOMMENDED.id)
    assert record["state"] == "error"  # known before any load
    for words in ("architecture is gemma3", "not qwen2", RECOMMENDED.file, RECOMMENDED.name):
        assert words in record["error"], (words, record["error"])
    with pytest.raises(ModelError) as info:
        manager.load(RECOMMENDED.id)
    assert "architecture is gemma3" in str(info.value) and RECOMMENDED.repo in str(info.value)
    assert manager.record(RECOMMENDED.id)["state"] == "error" and manager.memory_used() == 0


def test_a_file_of_the_right_architecture_but_another_size_is_refused(manager, data_dir, tiny_models):
    shutil.copy(tiny_models["qwen2"], data_dir / "models" / RECOMMENDED.file)
    with pytest.raises(ModelError) as info:
        manager.load(RECOMMENDED.id)
    message = str(info.value)
    assert f"{RECOMMENDED.size_bytes:,}" in message and "architecture" not in message


def test_the_bundled_name_holding_another_model_is_refused(manager, data_dir, tiny_models):
    shutil.copy(tiny_models["llama"], data_dir / "models" / DEFAULT_MODEL_FILE)
    with pytest.raises(ModelError, match="architecture is llama"):
        manager.load(DEFAULT_MODEL_ID)


def test_a_file_named_by_the_user_is_not_checked(manager):
    assert manager.load("tiny-gemma3")["state"] == "loaded"


# ----- no network ----------------------------------------------------------------------------------------------
def test_a_hub_model_without_network_fails_at_once(manager, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")  # where the hub would be
    started = time.monotonic()
    with pytest.raises(ModelError) as info:
        manager.load(RECOMMENDED.id)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "offline" in message and "cannot be reached" in message
    assert RECOMMENDED.repo in message and RECOMMENDED.file in message  # where to put the file instead
    assert elapsed < 10, f"took {elapsed:.1f} s: the hub's retries ran"
    assert manager.record(RECOMMENDED.id)["state"] == "error"


def test_the_probe_tells_a_listening_port_from_a_closed_one(monkeypatch):
    for variable in PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub_unreachable(f"http://127.0.0.1:{server.getsockname()[1]}") is None
    assert "cannot be reached" in hub_unreachable(f"http://127.0.0.1:{closed_port()}")


def test_an_unreachable_proxy_is_reported(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert "127.0.0.1" in hub_unreachable("https://hub.example")


def test_a_file_on_disk_needs_no_network(data_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    spec = Catalog(data_dir).get("tiny-qwen2")
    assert ensure_local(spec) == spec.path
    with pytest.raises(DownloadError, match="missing"):
        ensure_local(Catalog(data_dir).get(DEFAULT_MODEL_ID))
