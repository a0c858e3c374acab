"""models.manager.ModelManager on tiny GGUF files: records, budget, eviction, pinning, idle unload, swap."""

from __future__ import annotations

import gc
import threading
import time

import psutil
import pytest

from gguf_factory import write_tiny_gguf
from inference.generate import stream_generate
from inference.params import GenerationParams
from models.catalog import DEFAULT_MODEL_ID, HUB_MODELS, Catalog
from models.loader import LoadedModel, LoadOptions, load_model
from models.manager import ModelError, ModelManager, ModelTooLarge, UnknownModel
from parsers.units import format_bytes

F32 = LoadOptions(dtype="float32")
RECORD_FIELDS = {"id", "name", "state", "architecture", "quantization", "file_size_bytes", "memory_bytes",
                 "pinned", "error", "instruct"}
IDS = {"llama": "tiny-llama", "qwen2": "tiny-qwen2", "gemma3": "tiny-gemma3"}
GREEDY = GenerationParams(max_tokens=12, temperature=0.0)



def make_manager(data_dir, model_cache, budget: int = 1 << 40, **kwargs) -> ModelManager:
    return ModelManager(Catalog(data_dir), model_cache, memory_budget=budget, options=F32, **kwargs)


@pytest.fixture
def manager(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache)
    yield mgr
    mgr.close()


def states(mgr) -> dict[str, str]:
    return {r["id"]: r["state"] for r in mgr.records() if r["id"] in IDS.values()}


def two_fit_budget(mgr) -> int:
    """A budget that holds any two of the tiny models but never all three."""
    estimates = sorted(mgr.estimate(mgr.catalog.get(i)) for i in IDS.values())
    budget = estimates[1] + estimates[2] + 1024
    assert budget < sum(estimates)
    return budget


def greedy_text(lm, text="Hello there") -> str:
    return "".join(c.text for c in stream_generate(lm, lm.tokenizer(text)["input_ids"], GREEDY))


def generate_once(mgr, model_id) -> str:
    """One short generation, holding no reference to the model afterwards."""
    with mgr.use(model_id) as lm:
        return greedy_text(lm)


# ----- records -------------------------------------------------------------------------------------

def test_records_list_every_catalog_model(manager, data_dir):
    records = {r["id"]: r for r in manager.records()}
    assert set(records) == {DEFAULT_MODEL_ID, *(m.id for m in HUB_MODELS), *IDS.values()}
    for record in records.values():
        assert RECORD_FIELDS <= set(record), record
        assert record["state"] == "unloaded" and record["pinned"] is False and record["error"] is None
    for arch, model_id in IDS.items():
        record = records[model_id]
        assert record["architecture"] == arch
        assert record["quantization"] == "Q8_0"
        assert record["file_size_bytes"] == (data_dir / "models" / f"tiny-{arch}.gguf").stat().st_size
        assert record["memory_bytes"] == manager.estimate(manager.catalog.get(model_id)) > 0
    for missing in (DEFAULT_MODEL_ID, HUB_MODELS[0].id):  # not on disk in this data dir
        assert records[missing]["architecture"] is None
        assert records[missing]["file_size_bytes"] == 0 and records[missing]["memory_bytes"] == 0


def test_load_and_unload_transitions(manager):
    seen_states = []
    record = manager.load("tiny-qwen2", progress=lambda f, m: seen_states.append(manager.record("tiny-qwen2")["state"]))
    assert "loading" in seen_states
    assert record["state"] == "loaded" and record["error"] is None
    assert 0 < record["memory_bytes"] < manager.estimate(manager.catalog.get("tiny-qwen2"))  # measured now
    # the budget keeps the estimate (weights + working margin) reserved, not just the weights
    assert manager.memory_used() == manager.estimate(manager.catalog.get("tiny-qwen2"))
    assert states(manager) == {"tiny-llama": "unloaded", "tiny-qwen2": "loaded", "tiny-gemma3": "unloaded"}
    assert manager.load("tiny-qwen2")["state"] == "loaded"  # loading again is a no-op
    assert manager.unload("tiny-qwen2")["state"] == "unloaded"
    assert manager.memory_used() == 0
    assert manager.unload("tiny-qwen2")["state"] == "unloaded"  # unloading twice is fine


def test_use_loads_on_demand_and_counts_generations(manager):
    with manager.use("tiny-gemma3") as lm:
        assert isinstance(lm, LoadedModel) and lm.architecture == "gemma3"
        assert manager.record("tiny-gemma3")["active_generations"] == 1
        assert greedy_text(lm)
    record = manager.record("tiny-gemma3")
    assert record["state"] == "loaded" and record["active_generations"] == 0


def test_unknown_model(manager):
    for call in (manager.load, manager.unload, manager.record, manager.pin):
        with pytest.raises(UnknownModel) as info:
            call("no-such-model")
        assert str(info.value).startswith("Unknown model 'no-such-model'")
        assert "tiny-llama" in str(info.value)
        assert isinstance(info.value, ModelError) and isinstance(info.value, KeyError)
    with pytest.raises(UnknownModel):
        with manager.use("no-such-model"):
            pass


# ----- budget, eviction, pinning ----------------------------------------------------------------------

def test_eviction_is_lru_among_idle_unpinned(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache)
    mgr.memory_budget = two_fit_budget(mgr)
    mgr.load("tiny-llama")
    mgr.load("tiny-qwen2")
    with mgr.use("tiny-llama"):  # llama is now the most recently used
        pass
    mgr.load("tiny-gemma3")  # evicts qwen2, the least recently used
    assert states(mgr) == {"tiny-llama": "loaded", "tiny-qwen2": "unloaded", "tiny-gemma3": "loaded"}
    assert mgr.memory_used() <= mgr.memory_budget

    mgr.pin("tiny-llama")  # llama is now older than gemma3, but pinned
    mgr.load("tiny-qwen2")
    assert states(mgr) == {"tiny-llama": "loaded", "tiny-qwen2": "loaded", "tiny-gemma3": "unloaded"}
    assert mgr.record("tiny-llama")["pinned"] is True
    mgr.close()


def test_model_in_use_is_not_evicted(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache)
    mgr.memory_budget = two_fit_budget(mgr)
    with mgr.use("tiny-llama") as busy:  # the oldest, but busy for the whole block
        mgr.load("tiny-qwen2")
        mgr.load("tiny-gemma3")  # must evict qwen2, not the busy llama
        assert states(mgr) == {"tiny-llama": "loaded", "tiny-qwen2": "unloaded", "tiny-gemma3": "loaded"}
        assert greedy_text(busy)
    mgr.close()


def test_nothing_evictable_is_refused_with_reasons(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache)
    mgr.memory_budget = two_fit_budget(mgr)
    mgr.load("tiny-llama")
    mgr.pin("tiny-llama")
    with mgr.use("tiny-qwen2"):
        with pytest.raises(ModelTooLarge) as info:
            mgr.load("tiny-gemma3")
    message = str(info.value)
    assert "tiny-gemma3 needs about" in message
    assert "tiny-llama" in message and "pinned" in message and "tiny-qwen2" in message and "busy" in message
    record = mgr.record("tiny-gemma3")
    assert record["state"] == "error" and record["error"] == message
    assert states(mgr)["tiny-llama"] == states(mgr)["tiny-qwen2"] == "loaded"
    mgr.pin("tiny-llama", False)  # once llama may go, gemma3 loads
    assert mgr.load("tiny-gemma3")["state"] == "loaded"
    assert states(mgr)["tiny-llama"] == "unloaded"
    mgr.close()


def test_model_bigger_than_the_budget_is_refused(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache)
    needed = mgr.estimate(mgr.catalog.get("tiny-qwen2"))
    mgr.memory_budget = needed // 2
    with pytest.raises(ModelTooLarge) as info:
        mgr.load("tiny-qwen2")
    message = str(info.value)
    assert f"needs about {format_bytes(needed)}" in message
    assert f"memory budget of {format_bytes(needed // 2)}" in message and "--memory-budget" in message
    assert mgr.record("tiny-qwen2")["state"] == "error"
    assert mgr.memory_used() == 0
    mgr.close()


# ----- failures -------------------------------------------------------------------------------------------

def test_corrupt_file_is_an_error_and_others_carry_on(data_dir, model_cache, tiny_models):
    models = data_dir / "models"
    (models / "broken.gguf").write_bytes(b"\x00garbage" * 100)
    (models / "cut.gguf").write_bytes(tiny_models["llama"].read_bytes()[:50_000])
    mgr = make_manager(data_dir, model_cache)
    mgr.load("tiny-qwen2")
    used = mgr.memory_used()
    before = mgr.record("broken")
    assert before["state"] == "error" and "not a GGUF file" in before["error"]  # known before any load
    for model_id, words in (("broken", "not a GGUF file"), ("cut", "truncated")):
        with pytest.raises(ModelError, match=words):
            mgr.load(model_id)
        record = mgr.record(model_id)
        assert record["state"] == "error" and words in record["error"] and f"{model_id}.gguf" in record["error"]
    assert states(mgr)["tiny-qwen2"] == "loaded" and mgr.memory_used() == used
    with mgr.use("tiny-qwen2") as lm:
        assert greedy_text(lm)
    mgr.close()


def test_hub_model_offline(manager, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = HUB_MODELS[0]
    with pytest.raises(ModelError) as info:
        manager.load(hub.id)
    message = str(info.value)
    assert "offline" in message and "HF_HUB_OFFLINE" in message and hub.repo in message and hub.file in message
    record = manager.record(hub.id)
    assert record["state"] == "error" and "offline" in record["error"]
    assert manager.memory_used() == 0


def test_missing_bundled_file_is_an_error(manager):
    with pytest.raises(ModelError, match="missing"):
        manager.load(DEFAULT_MODEL_ID)


# ----- idle unload ----------------------------------------------------------------------------------------

def test_sweep_idle(data_dir, model_cache):
    mgr = make_manager(data_dir, model_cache, idle_unload_s=60)
    mgr.load("tiny-llama")
    mgr.load("tiny-qwen2")
    mgr.load("tiny-gemma3")
    mgr.pin("tiny-qwen2")
    now = time.monotonic()
    assert mgr.sweep_idle(now=now + 30) == []
    with mgr.use("tiny-gemma3"):  # busy: never idle, however long ago it started
        assert mgr.sweep_idle(now=time.monotonic() + 61) == ["tiny-llama"]
    assert states(mgr) == {"tiny-llama": "unloaded", "tiny-qwen2": "loaded", "tiny-gemma3": "loaded"}
    assert mgr.sweep_idle(now=time.monotonic() + 61) == ["tiny-gemma3"]
    assert mgr.memory_used() == mgr.estimate(mgr.catalog.get("tiny-qwen2"))  # only the pinned one is left
    mgr.close()


def test_no_idle_unload_without_a_timeout(manager):
    manager.load("tiny-llama")
    assert manager.sweep_idle(now=time.monotonic() + 10**6) == []
    assert states(manager)["tiny-llama"] == "loaded"


# ----- concurrency ------------------------------------------------------------------------------------------

def test_concurrent_loads_load_once(data_dir, model_cache):
    calls = []

    def counting_loader(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.2)  # keep the load under way while the other threads arrive
        return load_model(*args, **kwargs)

    mgr = make_manager(data_dir, model_cache, loader=counting_loader)
    start = threading.Barrier(4)
    results, errors = [], []

    def worker():
        start.wait()
        try:
            results.append(mgr.load("tiny-llama")["state"])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == ["loaded"] * 4
    assert len(calls) == 1
    mgr.close()


def test_unload_while_streaming_lets_the_stream_finish(manager):
    with manager.use("tiny-gemma3") as lm:
        gen = stream_generate(lm, lm.tokenizer("Hello")["input_ids"], GREEDY)
        first = next(gen)
        assert manager.unload("tiny-gemma3")["state"] == "unloaded"
        rest = list(gen)
    assert rest[-1].finish_reason == "length"
    assert first.text + "".join(c.text for c in rest)
    assert manager.record("tiny-gemma3")["state"] == "unloaded"
    assert manager.memory_used() == 0


# ----- memory really comes back -------------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["dense", "quantized"])
def test_unload_frees_memory(tmp_path, model_cache, weights):
    models = tmp_path / "models"
    wide = 512 if weights == "quantized" else 256  # int8 weights take a quarter of float32's room
    write_tiny_gguf(models / "big.gguf", "qwen2", hidden=wide, layers=4, heads=4, kv_heads=2, ffn=4 * wide, seed=5)
    mgr = ModelManager(Catalog(tmp_path), model_cache, memory_budget=1 << 40,
                       options=LoadOptions(dtype="float32", weights=weights))
    mgr.load("big")  # a first cycle converts the file and warms torch's one-time allocations up
    generate_once(mgr, "big")
    mgr.unload("big")
    process = psutil.Process()

    def rss():
        gc.collect()
        return process.memory_info().rss

    before = rss()
    size = mgr.load("big")["memory_bytes"]
    generate_once(mgr, "big")  # touches every weight (they may be memory-mapped)
    loaded = rss()
    assert size > 15 << 20
    assert loaded - before > 0.8 * size  # the load is visible in RSS
    mgr.unload("big")
    after = rss()
    assert after - before < 0.1 * (loaded - before), (before, loaded, after)
    mgr.close()


def test_records_say_how_the_weights_are_held(data_dir, model_cache):
    quantized = make_manager(data_dir, model_cache)
    assert quantized.record("tiny-qwen2")["weights"] == "quantized"  # the CPU default, before loading
    assert quantized.load("tiny-qwen2")["weights"] == "quantized"
    dense = ModelManager(Catalog(data_dir), model_cache, memory_budget=1 << 40,
                         options=LoadOptions(dtype="float32", weights="dense"))
    assert dense.load("tiny-qwen2")["weights"] == "dense"
    assert dense.record("tiny-qwen2")["memory_bytes"] > quantized.record("tiny-qwen2")["memory_bytes"]
    quantized.close()
    dense.close()
