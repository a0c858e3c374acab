"""models.convert + models.loader: our checkpoint is the model and tokenizer transformers builds itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_factory import vocab_info
from models.convert import UnsupportedModel
from models.gguf_file import read_header
from models.loader import LoadError, LoadOptions, checkpoint_dir, file_digest, load_model
from models.templates import UnknownArchitecture

F32 = LoadOptions(dtype="float32", weights="dense")  # this file checks the dense conversion
TEXTS = [
    "Hello world, the quick brown fox.",
    "héllo wörld, çà et là, Ærø, naïve café",
    "emoji 🎉🚀 and ✓ marks 👍🏽",
    "def add(a, b):\n    return a + b  # sum\n\n\tprint(add(1, 2))",
    "line one\nline two\r\n\nline four   trailing  ",
    "中文 and русский текст",
]



@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def pair(request, tiny_models, model_cache):
    """(arch, ours, transformers' own model, transformers' own tokenizer), once per arch."""
    arch = request.param
    path = tiny_models[arch]
    ours = load_model(path, model_cache, F32)
    ref_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return arch, ours, ref_model, ref_tokenizer


def test_config_matches(pair):
    arch, ours, ref, _ = pair
    ours_cfg, ref_cfg = ours.model.config, ref.config
    assert ours_cfg.model_type == ref_cfg.model_type
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(ours_cfg, key) == getattr(ref_cfg, key), key
    assert ours.architecture == arch
    assert ours.dtype == torch.float32 and next(ours.model.parameters()).dtype == torch.float32
    assert ours.context_length == 256
    assert ours.memory_bytes >= sum(p.numel() * 4 for p in ours.model.parameters())


def test_logits_match_transformers(pair):
    arch, ours, ref, ref_tokenizer = pair
    ids = ref_tokenizer("The quick brown fox jumps over the lazy dog. héllo ✓")["input_ids"]
    batch = torch.tensor([ids])
    with torch.inference_mode():
        got = ours.model(input_ids=batch).logits
        want = ref(input_ids=batch).logits
    assert got.shape == want.shape == (1, len(ids), ref.config.vocab_size)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    assert got.std() > 0  # not a degenerate model that would match anything


def test_state_dicts_match(pair):
    _, ours, ref, _ = pair
    mine, theirs = ours.model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), name


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(pair, text):
    arch, ours, _, ref_tokenizer = pair
    assert ours.tokenizer(text)["input_ids"] == ref_tokenizer(text)["input_ids"]
    plain = ours.encode(text)
    assert plain == ref_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ours.tokenizer.decode(plain) == text


def test_special_tokens(pair):
    arch, ours, _, ref_tokenizer = pair
    info = vocab_info(arch)
    assert ours.tokenizer.eos_token_id == info["eos_token_id"] == ref_tokenizer.eos_token_id
    assert ours.tokenizer.bos_token_id == info["bos_token_id"] == ref_tokenizer.bos_token_id
    for token, token_id in info["special_tokens"].items():
        assert ours.encode(token) == [token_id], token
    with_special = ours.tokenizer("hi")["input_ids"]
    assert (with_special[0] == info["bos_token_id"]) == info["add_bos"]


# ----- the conversion cache --------------------------------------------------------------------

def test_second_load_reuses_the_converted_folder(tmp_path, tiny_models):
    """The first load converts; the second finds the folder, converts nothing and loads from it."""
    gguf = shutil.copy(tiny_models["qwen2"], tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    messages: list[str] = []
    first = load_model(gguf, cache, F32, progress=lambda f, m: messages.append(m))
    assert any("converting" in m for m in messages)
    folder = checkpoint_dir(cache, gguf, torch.float32)
    weights = folder / "model.safetensors"
    before = weights.stat()
    assert sorted(p.name for p in (cache / "converted").iterdir()) == [folder.name]  # no staging left behind

    messages.clear()
    second = load_model(gguf, cache, F32, progress=lambda f, m: messages.append(m))
    assert not any("convert" in m for m in messages)
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in (cache / "converted").iterdir()) == [folder.name]
    assert second.model.config._name_or_path == str(folder)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor)


def test_other_dtype_gets_its_own_folder(tmp_path, tiny_models):
    gguf = shutil.copy(tiny_models["gemma3"], tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    f32 = load_model(gguf, cache, F32)
    bf16 = load_model(gguf, cache, LoadOptions(dtype="bfloat16", weights="dense"))
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.memory_bytes < f32.memory_bytes
    assert len(list((cache / "converted").iterdir())) == 2


def test_changed_file_is_converted_again(tmp_path, tiny_models):
    gguf = tmp_path / "model.gguf"
    shutil.copy(tiny_models["llama"], gguf)
    cache = tmp_path / "cache"
    load_model(gguf, cache, F32)
    shutil.copy(tiny_models["qwen2"], gguf)  # same name, other content
    again = load_model(gguf, cache, F32)
    assert again.architecture == "qwen2" and again.model.config.model_type == "qwen2"
    assert len(list((cache / "converted").iterdir())) == 2


# ----- refusals ---------------------------------------------------------------------------------

def _with_architecture(src, dst, arch: str):
    """A copy of `src` whose general.architecture says `arch` (same length as the original)."""
    original = read_header(src).architecture
    assert len(arch) == len(original)
    data = src.read_bytes()
    key = b"general.architecture" + struct.pack("<IQ", 8, len(original)) + original.encode()
    assert data.count(key) == 1
    dst.write_bytes(data.replace(key, key[: -len(original)] + arch.encode()))
    return dst


def test_unknown_architecture_is_refused_clearly(tmp_path, tiny_models, model_cache):
    path = _with_architecture(tiny_models["llama"], tmp_path / "mamba.gguf", "mamba")
    with pytest.raises((UnsupportedModel, UnknownArchitecture), match="'mamba'"):
        load_model(path, model_cache, F32)


def test_bad_options_are_refused(tiny_models, model_cache):
    with pytest.raises(LoadError, match="unknown quantization '3bit'"):
        load_model(tiny_models["llama"], model_cache, LoadOptions(quantization="3bit"))
    with pytest.raises(LoadError, match="unknown dtype 'float8'"):
        load_model(tiny_models["llama"], model_cache, LoadOptions(dtype="float8"))
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="needs a CUDA GPU"):
            load_model(tiny_models["llama"], model_cache, LoadOptions(dtype="float32", quantization="4bit"))
        with pytest.raises(LoadError, match="no CUDA device"):
            load_model(tiny_models["llama"], model_cache, LoadOptions(device="cuda"))


# ----- several threads at once -------------------------------------------------------------------

def test_digest_memo_survives_concurrent_writers(tmp_path):
    """The manager loads models from several threads; the shared digests.json must not trip them."""
    files = []
    for i in range(12):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(bytes([i]) * (1000 + i))
        files.append(path)
    memo = tmp_path / "cache" / "digests.json"
    errors = []

    def digest(path):
        try:
            file_digest(path, memo)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    for _ in range(3):
        threads = [threading.Thread(target=digest, args=(path,)) for path in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for path in files:  # new mtimes: every round misses the memo and writes it again
            os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert errors == []
    assert len(json.loads(memo.read_text())) >= len(files)
    assert file_digest(files[0], memo) == hashlib.sha256(files[0].read_bytes()).hexdigest()


def _load_in_threads(jobs):
    """Run load_model(*job) for every job at once; return the results in order, or raise the first error."""
    start = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def load(i, job):
        start.wait()
        try:
            results[i] = load_model(*job)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=load, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    return results


def _assert_tied(lm):
    embed = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    assert head.data_ptr() == embed.data_ptr(), "lm_head is not tied to the embeddings"


def test_concurrent_first_loads_of_one_file(tmp_path, tiny_models):
    """Three loads of a file never converted before: one converts, all get the same, right model."""
    gguf = shutil.copy(tiny_models["gemma3"], tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    results = _load_in_threads([(gguf, cache, F32)] * 3)
    assert [p.name for p in (cache / "converted").iterdir()] == [checkpoint_dir(cache, gguf, torch.float32).name]
    ids = torch.tensor([[2, 300, 301, 302]])
    with torch.inference_mode():
        logits = [lm.model(input_ids=ids).logits for lm in results]
    for lm, got in zip(results, logits):
        _assert_tied(lm)
        assert torch.equal(got, logits[0])


def test_concurrent_loads_leave_transformers_as_they_were(tmp_path, tiny_models, model_cache):
    """transformers patches globals while it builds a model; parallel loads must not leave them patched."""
    from transformers import PreTrainedModel

    jobs = [(tiny_models["gemma3"], model_cache, LoadOptions(dtype="bfloat16", weights="dense")),
            (tiny_models["llama"], model_cache, F32),
            (tiny_models["qwen2"], model_cache, LoadOptions(dtype="bfloat16", weights="dense")),
            (tiny_models["gemma3"], model_cache, F32),
            (tiny_models["gemma3"], model_cache, LoadOptions(weights="quantized"))]
    for _ in range(2):
        _load_in_threads(jobs)
    assert PreTrainedModel.tie_weights.__qualname__ == "PreTrainedModel.tie_weights"  # not transformers' no-op
    assert torch.get_default_dtype() == torch.float32
    later = load_model(tiny_models["gemma3"], model_cache, F32)
    _assert_tied(later)
