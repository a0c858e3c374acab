"""models/gguf_arch.py gives what transformers' GGUF loader gives: the same config.json (for the tiny models
and for metadata with keys left out, where the config classes' defaults apply), the same name map and the
same tensor fix-ups; and a first conversion of a Gemma model imports neither transformers nor gguf-py."""

from __future__ import annotations

import json
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
