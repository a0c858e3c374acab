"""What a newcomer meets first, through a real app: /health while a model loads, base models marked as such,
and the recommended instruct model one click away."""

from __future__ import annotations

import threading

import httpx
import pytest
from gradio_client import Client

from app import model_choices, model_note, models_table
from app_harness import app_config, running_app
from models.catalog import BASE_MODEL_NOTE, DEFAULT_MODEL_ID, RECOMMENDED_MODEL_ID
from models.manager import ModelError
from sessions import LOCAL_USER


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_models, model_cache, bundled_model):
    config = app_config(tmp_path_factory.mktemp("first-run"), tiny_models, model_cache, bundled_model)
    with running_app(config) as running:
        yield running


def health(app) -> dict:
    response = httpx.get(f"{app.url}/health", timeout=10)
    assert response.status_code == 200
    return response.json()


# ----- /health ----------------------------------------------------------------------------------------------------
def test_health_reports_a_loading_model_and_when_one_is_ready(app):
    before = health(app)
    assert before["status"] == "ok" and before["ready"] is False and before["loading"] == []
    inside, release = threading.Event(), threading.Event()

    def slow_watcher(fraction, message):  # a progress consumer that holds the load in its "loading" state
        inside.set()
        release.wait(60)

    loader = threading.Thread(target=app.service.load_model, args=("tiny-llama", slow_watcher))
    loader.start()
    try:
        assert inside.wait(60), "the load never reported progress"
        during = health(app)
        assert during["loading"] == ["tiny-llama"] and during["ready"] is False
        progress = during["loading_progress"]["tiny-llama"]
        assert 0 <= progress["progress"] <= 1 and progress["message"]
    finally:
        release.set()
        loader.join(60)
    after = health(app)
    assert after["ready"] is True and after["loading"] == [] and after["models_loaded"] == 1


# ----- base or instruct --------------------------------------------------------------------------------------------
def test_model_lists_say_which_models_follow_instructions(app):
    v1 = {m["id"]: m for m in httpx.get(f"{app.v1}/models", timeout=10).json()["data"]}
    assert v1[DEFAULT_MODEL_ID]["instruct"] is False and v1[RECOMMENDED_MODEL_ID]["instruct"] is True
    records = Client(app.url, verbose=False, download_files=False).predict(api_name="/list_models")
    by_id = {r["id"]: r for r in records}
    assert by_id[DEFAULT_MODEL_ID]["instruct"] is False and by_id[RECOMMENDED_MODEL_ID]["instruct"] is True


def test_the_picker_and_the_models_tab_mark_base_models(app):
    labels = dict((model_id, label) for label, model_id in model_choices(app.service))
    assert "base model" in labels[DEFAULT_MODEL_ID] and "base model" not in labels[RECOMMENDED_MODEL_ID]
    assert BASE_MODEL_NOTE in model_note(app.service.model_record(DEFAULT_MODEL_ID))
    assert BASE_MODEL_NOTE not in model_note(app.service.model_record(RECOMMENDED_MODEL_ID))
    rows = {row[0]: row for row in models_table(app.service)}
    assert BASE_MODEL_NOTE in rows[DEFAULT_MODEL_ID][2] and BASE_MODEL_NOTE not in rows[RECOMMENDED_MODEL_ID][2]


# ----- the recommended model ----------------------------------------------------------------------------------------
def test_the_models_tab_offers_the_recommended_model(app):
    components = httpx.get(f"{app.url}/config", timeout=10).json()["components"]
    button = next(c for c in components if c.get("props", {}).get("elem_id") == "use-recommended")
    assert "Qwen2.5 0.5B Instruct" in button["props"]["value"]
    assert app.service.recommended_model()["id"] == RECOMMENDED_MODEL_ID


def test_use_model_loads_first_then_makes_it_the_chats_model(app):
    session = app.service.new_session(LOCAL_USER, "first run")
    assert app.service.use_model(LOCAL_USER, session["id"], "tiny-qwen2")["state"] == "loaded"
    assert app.service.get_session(LOCAL_USER, session["id"])["model_id"] == "tiny-qwen2"
    with pytest.raises(ModelError, match="offline"):  # HF_HUB_OFFLINE=1 in the tests: it cannot download
        app.service.use_model(LOCAL_USER, session["id"], RECOMMENDED_MODEL_ID)
    assert app.service.get_session(LOCAL_USER, session["id"])["model_id"] == "tiny-qwen2"  # left as it was
