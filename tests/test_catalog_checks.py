"""The catalog on tiny GGUF files: instruct or base, a wrong file under a catalog name."""

from __future__ import annotations

import json
import shutil

import pytest

from gguf_factory import CHAT_TEMPLATES, write_tiny_gguf
from models.catalog import DEFAULT_MODEL_FILE, DEFAULT_MODEL_ID, HUB_MODELS, RECOMMENDED_MODEL_ID, Catalog
from models.loader import LoadOptions
from models.manager import ModelError, ModelManager

RECOMMENDED = next(hub for hub in HUB_MODELS if hub.id == RECOMMENDED_MODEL_ID)


@pytest.fixture
def data_dir(tmp_path, tiny_models):
    models = tmp_path / "models"
    models.mkdir()
    for path in tiny_models.values():
        shutil.copy(path, models / path.name)
    return tmp_path


@pytest.fixture
def manager(data_dir, model_cache):
    mgr = ModelManager(Catalog(data_dir), model_cache, memory_budget=1 << 40, options=LoadOptions(dtype="float32"))
    yield mgr
    mgr.close()


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
