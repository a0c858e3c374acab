"""models/gguf_arch.py gives what transformers' GGUF loader gives: the same config.json (for the tiny models
and for metadata with keys left out, where the config classes' defaults apply), the same name map and the
same tensor fix-ups; and a first conversion of a Gemma model imports neither transformers nor gguf-py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf_factory import write_tiny_gguf
from models import convert, gguf_arch
from models.gguf_file import read_header

ARCHS = ["llama", "qwen2", "gemma3"]
ROOT = Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(3)


def scalar_metadata(header) -> dict:
    """The header's metadata without its token arrays (what the config is built from)."""
    return {key: header.metadata[key] for key in header.metadata if not key.startswith("tokenizer.ggml.t")
            and not key.startswith("tokenizer.ggml.scores") and not key.startswith("tokenizer.ggml.merges")}


def transformers_config_json(architecture: str, metadata: dict, tensor_names: set[str], vocabulary: int,
                             folder: Path) -> dict:
    """config.json as transformers' GGUF loader builds it (its key tables and config classes) and saves it."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    config: dict = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(architecture, {}))
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        target = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if target is None or target == -1 or isinstance(value, list) and prefix != architecture:
            continue
        config[target] = value
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if config.get("model_type") == "gemma3":
        config["model_type"] = "gemma3_text"
    config.setdefault("vocab_size", vocabulary)
    AutoConfig.for_model(config.pop("model_type"), **config).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.pop("transformers_version")
    return saved


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch")
    return {arch: read_header(write_tiny_gguf(folder / f"{arch}.gguf", arch, weight_types="mixed")) for arch in ARCHS}


def _variants(arch: str) -> list[tuple[str, dict]]:
    """(what changes, metadata changes: a value, or None to leave the key out)."""
    a = arch
    variants = [("as written", {}), ("no padding token", {"tokenizer.ggml.padding_token_id": None}),
                ("no unknown token", {"tokenizer.ggml.unknown_token_id": None}),
                ("no bos/eos", {"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.eos_token_id": None}),
                ("no kv head count", {f"{a}.attention.head_count_kv": None}),
                ("no rope base", {f"{a}.rope.freq_base": None}),
                ("no context length, no eps", {f"{a}.context_length": None,
                                               f"{a}.attention.layer_norm_rms_epsilon": None}),
                ("no name", {"general.name": None}),
                ("13 layers, a vocab_size", {f"{a}.block_count": 13, f"{a}.vocab_size": 1000}),
                ("an unused key", {f"{a}.expert_count": 0, "general.license": "mit"})]
    if arch == "llama":
        variants.append(("no rope dimension", {"llama.rope.dimension_count": None}))
    if arch == "gemma3":
        variants += [("no key length", {"gemma3.attention.key_length": None}),
                     ("18 layers, window 512", {"gemma3.block_count": 18, "gemma3.attention.sliding_window": 512}),
                     ("no sliding window", {"gemma3.attention.sliding_window": None})]
    return variants


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [False, True])
def test_config_json_is_transformers_own(headers, tmp_path, arch, tied):
    header = headers[arch]
    names = {info.name for info in header.tensors} - ({"output.weight"} if tied else set())
    vocabulary = header.metadata.length("tokenizer.ggml.tokens")
    for index, (label, changes) in enumerate(_variants(arch)):
        metadata = {**scalar_metadata(header), **changes}
        metadata = {key: value for key, value in metadata.items() if value is not None}
        ours = gguf_arch.checkpoint_config(arch, metadata, names, vocabulary)
        folder = tmp_path / str(index)
        theirs = transformers_config_json(arch, metadata, names, vocabulary, folder)
        assert json.loads(json.dumps(ours)) == theirs, label


def test_per_layer_values_are_refused_clearly(headers):
    metadata = {**scalar_metadata(headers["llama"]), "llama.attention.head_count_kv": [2, 4]}
    with pytest.raises(gguf_arch.UnreadableConfig, match="one value per layer"):
        gguf_arch.checkpoint_config("llama", metadata, set(), 10)


@pytest.mark.parametrize("arch", ARCHS)
def test_name_map_is_transformers_own(headers, arch):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = convert.build_config(headers[arch])
    with convert.MODEL_BUILD_LOCK, torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(convert.transformers_config(config))
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    assert gguf_arch.name_map(arch, skeleton.state_dict()) == get_gguf_hf_weights_map(skeleton, processor)


@pytest.mark.parametrize("arch", ARCHS)
def test_fix_ups_are_transformers_own(headers, arch):
    """Every tensor of the model, fixed up by ours and by transformers' processor: equal values, and the
    same array back where a tensor is left alone (which is how the converter tells the two apart)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config = convert.build_config(headers[arch])
    theirs = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    ours = gguf_arch.FixUps(arch, config)
    changed = 0
    for info in headers[arch].tensors:
        weights = RNG.standard_normal(tuple(reversed(info.shape))).astype(np.float32)
        want = theirs.process(weights=weights, name=info.name).weights
        got = ours.process(weights, info.name).weights
        assert np.array_equal(got, want), info.name
        assert (got is weights) == (want is weights), info.name
        changed += got is not weights
    assert changed > 0 if arch != "qwen2" else changed == 0


@pytest.mark.parametrize("weight_types", [None, "mixed"])
def test_a_first_gemma_conversion_imports_neither_transformers_nor_gguf(tmp_path, weight_types):
    path = write_tiny_gguf(tmp_path / "g.gguf", "gemma3", weight_types=weight_types)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from models.loader import LoadOptions, load_model
        lm = load_model(Path({str(path)!r}), Path({str(tmp_path / "cache")!r}), LoadOptions(kernels="torch"))
        print(type(lm.model).__module__, sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "gguf")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["models.cpu_model", "[]"], result.stdout


# ----- Llama 3's rotary scaling (rope_freqs) -------------------------------------------------------
def llamacpp_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                      original: float) -> np.ndarray:
    """`rope_freqs` as llama.cpp's converter computes it for a Llama 3.1 checkpoint (float32)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def transformers_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, rope_parameters=rope,
                         max_position_embeddings=131072)
    return LlamaRotaryEmbedding(config).inv_freq


@pytest.mark.parametrize("head_dim, theta, params, exact", [
    (128, 500000.0, (8.0, 1.0, 4.0, 8192), True),  # Llama 3.1 8B / 70B
    (64, 500000.0, (32.0, 1.0, 4.0, 8192), True),  # Llama 3.2 1B
    (16, 500000.0, (8.0, 1.0, 4.0, 8192), True),  # one frequency in between
    (32, 10000.0, (4.0, 2.0, 8.0, 4096), False),  # other values: an equivalent set is found
    (8, 10000.0, (8.0, 1.0, 4.0, 64), False),  # none in between
    (12, 15625.0, (8.0, 1.0, 4.0, 700), False),  # none in between, no power of two fits
    (16, 10000.0, (8.0, 1.0, 1.5, 288.1), False),  # one in between, where high 4 does not fit
])
def test_llama3_scaling_is_read_back_from_rope_freqs(head_dim, theta, params, exact):
    divisors = llamacpp_divisors(head_dim, theta, *params)
    rope = gguf_arch.llama3_rope(divisors, theta, head_dim)
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == theta and rope["factor"] == params[0]
    if exact:
        assert (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) == \
            params[1:]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    llamacpp = (plain / torch.from_numpy(divisors).double()).float()
    assert torch.allclose(transformers_frequencies(rope, head_dim), llamacpp, rtol=1e-5, atol=0)
    assert json.loads(json.dumps(rope)) == rope


def test_rope_freqs_that_are_not_llama3_are_refused_or_left_out(caplog):
    plain = {"rope_theta": 10000.0, "rope_type": "default"}
    assert gguf_arch.llama3_rope(np.ones(8, dtype=np.float32), 10000.0, 16) == plain
    assert gguf_arch.llama3_rope(np.full(8, 1.00002, dtype=np.float32), 10000.0, 16) == plain
    with pytest.raises(gguf_arch.UnreadableConfig, match="rotary frequencies"):
        gguf_arch.llama3_rope(np.ones(5, dtype=np.float32), 10000.0, 16)
    with pytest.raises(gguf_arch.UnreadableConfig, match="not positive"):
        gguf_arch.llama3_rope(np.array([1, 1, 1, 1, 0, 8, 8, 8], dtype=np.float32), 10000.0, 16)
    for other in ([1, 3, 1, 2, 5, 1, 8, 8], [0.5] * 8, [1, 1, 1, 1, 8, 8, 8, 2]):  # not Llama 3's shape
        caplog.clear()
        assert gguf_arch.llama3_rope(np.array(other, dtype=np.float32), 10000.0, 16) == plain
        assert "does not follow Llama 3" in caplog.text


def test_a_llama_gguf_with_rope_freqs_converts_and_runs_scaled(tmp_path, model_cache, caplog):
    """The config gets the scaling, our model runs llama.cpp's frequencies, and a conversion cached
    before this fix has its config.json brought up to date (its weights left alone)."""
    from models.cpu_model import CausalLM
    from models.loader import LoadOptions, checkpoint_dir, load_model

    divisors = llamacpp_divisors(16, 500000.0, 8.0, 1.0, 4.0, 8192)
    path = write_tiny_gguf(tmp_path / "scaled.gguf", "llama", rope_freqs=divisors)
    header = read_header(path)
    assert convert.build_config(header)["rope_parameters"] == {
        "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    lm = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    assert isinstance(lm.model, CausalLM)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    want = (plain / torch.from_numpy(divisors).double()).float()
    assert torch.allclose(lm.model.model.rotary_emb.frequencies["full_attention"], want, rtol=1e-5, atol=0)
    dense = load_model(path, model_cache, LoadOptions(weights="dense"))  # transformers' model (the CUDA path)
    assert torch.allclose(dense.model.model.rotary_emb.inv_freq, want, rtol=1e-5, atol=0)

    folder = checkpoint_dir(model_cache, path, torch.float32, "quantized")
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}  # as conversions wrote it
    config["transformers_version"] = "5.24.0"
    (folder / "config.json").write_text(json.dumps(config))
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="models.loader"):
        again = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    assert "rope_parameters" in caplog.text
    refreshed = json.loads((folder / "config.json").read_text())
    assert refreshed["rope_parameters"]["rope_type"] == "llama3"
    assert refreshed == {**config, "rope_parameters": refreshed["rope_parameters"]}  # nothing else rewritten
    assert not list(folder.glob("*.partial"))
    assert torch.allclose(again.model.model.rotary_emb.frequencies["full_attention"], want, rtol=1e-5, atol=0)
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights
    caplog.clear()
    with caplog.at_level("INFO", logger="models.loader"):
        load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    assert "cached config" not in caplog.text  # up to date now: not written again


def test_gemma3_27b_scales_its_queries_as_llamacpp_does(headers, tmp_path):
    """Gemma 3 27B's queries are scaled by 1/sqrt(hidden / heads) = 1/sqrt(168) (llama.cpp, Google's reference
    code); transformers' GGUF loader gives every size its default 256, which is right for the others only."""
    header = headers["gemma3"]
    names = {info.name for info in header.tensors}
    vocabulary = header.metadata.length("tokenizer.ggml.tokens")
    sizes = {18: (640, 4, 256), 26: (1152, 4, 256), 34: (2560, 8, 256), 48: (3840, 16, 256), 62: (5376, 32, 128)}
    for layers, (hidden, heads, head_dim) in sizes.items():
        metadata = {**scalar_metadata(header), "gemma3.block_count": layers, "gemma3.embedding_length": hidden,
                    "gemma3.attention.head_count": heads, "gemma3.attention.key_length": head_dim}
        ours = gguf_arch.checkpoint_config("gemma3", metadata, names, vocabulary)
        theirs = transformers_config_json("gemma3", metadata, names, vocabulary, tmp_path / str(layers))
        assert ours["query_pre_attn_scalar"] == (168 if layers == 62 else 256)
        assert {**json.loads(json.dumps(ours)), "query_pre_attn_scalar": 256} == theirs  # nothing else differs


def test_a_cached_gemma3_27b_conversion_gets_its_attention_scale(tmp_path, model_cache, caplog):
    """A 62-layer Gemma runs with hidden / heads as its query scalar, also from a conversion cached before."""
    from models.loader import LoadOptions, checkpoint_dir, load_model

    path = write_tiny_gguf(tmp_path / "deep.gguf", "gemma3", layers=62, hidden=64, heads=4, kv_heads=1, ffn=64)
    lm = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    assert lm.model.config.query_pre_attn_scalar == 16
    assert all(layer.self_attn.scaling == 16 ** -0.5 for layer in lm.model.model.layers)
    folder = checkpoint_dir(model_cache, path, torch.float32, "quantized")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 256}))  # as before
    with caplog.at_level("INFO", logger="models.loader"):
        again = load_model(path, model_cache, LoadOptions(weights="quantized", kernels="torch"))
    assert "query_pre_attn_scalar" in caplog.text
    assert json.loads((folder / "config.json").read_text()) == config
    assert again.model.model.layers[0].self_attn.scaling == 16 ** -0.5
