"""What we take from transformers' non-public modules is still there and still means the same.

transformers has no public API for its GGUF tables (config keys, tokenizer builders, tensor
processors), for the SentencePiece merges it derives, or for its KV cache layers and RMS norm
classes; models/convert.py, models/merges.py, models/qlinear.py and inference/kv.py use them
as they are, and models/gguf_arch.py writes out the config keys, names and fix-ups that the tests
compare with transformers' own; which is why requirements.txt pins transformers below the versions
not yet checked. The equivalence tests (tests/test_convert_streaming.py, tests/test_gguf_arch.py,
tests/test_decode_step.py) say *whether*
the results still agree; these say *what* moved, so that an upgrade fails with the name of the
symbol and of the code that relies on it, not with an ImportError deep in a model load.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F

UPGRADE = "transformers {version} changed it; update {user} (and requirements.txt's transformers pin) to match"

# (module, name, our code that uses it)
SYMBOLS = [
    ("transformers.integrations.ggml", "GGUF_CONFIG_MAPPING", "tests/test_gguf_arch.py (models/gguf_arch.py's reference)"),
    ("transformers.integrations.ggml", "GGUF_CONFIG_DEFAULTS_MAPPING",
     "tests/test_gguf_arch.py (models/gguf_arch.py's reference)"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "GGUF_TOKENIZER_MAPPING",
     "models/convert.py tokenizer_fields"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "convert_gguf_tokenizer",
     "models/convert.py _tokenizer_json"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "select_tokenizer_builder",
     "models/merges.py sentencepiece_merges"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "gemma_tokenizer",
     "models/merges.py sentencepiece_merges"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "sentencepiece_tokenizer",
     "models/merges.py sentencepiece_merges"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "phi3_tokenizer",
     "models/merges.py sentencepiece_merges"),
    ("transformers.modeling_gguf_pytorch_utils", "TENSOR_PROCESSORS",
     "tests/test_convert_streaming.py (models/gguf_arch.py FixUps' reference)"),
    ("transformers.modeling_gguf_pytorch_utils", "TensorProcessor",
     "tests/test_convert_streaming.py (models/gguf_arch.py FixUps' reference)"),
    ("transformers.modeling_gguf_pytorch_utils", "get_gguf_hf_weights_map",
     "tests/test_gguf_arch.py (models/gguf_arch.py name_map's reference)"),
    ("transformers.tokenization_utils_base", "generate_merges", "models/merges.py derive_merges (a faster copy)"),
    ("transformers.cache_utils", "DynamicLayer", "inference/kv.py GrowingLayer"),
    ("transformers.models.gemma3.modeling_gemma3", "Gemma3RMSNorm", "models/qlinear.py _rms_norm_kinds"),
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", "models/qlinear.py _rms_norm_kinds"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", "models/qlinear.py _rms_norm_kinds"),
    ("transformers.initialization", "no_init_weights", "models/quant_checkpoint.py _transformers_model"),
    ("transformers.utils.chat_template_utils", "render_jinja_template",
     "tests/test_chat_template.py (the reference models/chat_template.py renders as)"),
]

# (module, name, parameters we pass, our code that calls it)
SIGNATURES = [
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "select_tokenizer_builder",
     ["architecture", "tokenizer_type"], "models/merges.py sentencepiece_merges"),
    ("transformers.integrations.gguf.gguf_tokenizer_mapping", "convert_gguf_tokenizer",
     ["architecture", "tokenizer_dict"], "models/convert.py _tokenizer_json"),
    ("transformers.modeling_gguf_pytorch_utils", "TensorProcessor.process", ["self", "weights", "name"],
     "tests/test_convert_streaming.py (models/gguf_arch.py FixUps' reference)"),
    ("transformers.tokenization_utils_base", "generate_merges", ["vocab", "vocab_scores"],
     "models/merges.py derive_merges"),
    ("transformers.utils.chat_template_utils", "render_jinja_template",
     ["conversations", "tools", "documents", "chat_template", "return_assistant_tokens_mask",
      "continue_final_message", "add_generation_prompt"],
     "tests/test_chat_template.py (the reference models/chat_template.py renders as)"),
]


def version() -> str:
    import transformers

    return transformers.__version__


def lookup(module: str, dotted: str):
    target = importlib.import_module(module)
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


@pytest.mark.parametrize("module, name, user", SYMBOLS, ids=[f"{m}.{n}" for m, n, _ in SYMBOLS])
def test_the_symbols_we_import_are_there(module, name, user):
    try:
        lookup(module, name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{module}.{name} is gone ({error}): "
                    + UPGRADE.format(version=version(), user=user))


@pytest.mark.parametrize("module, name, parameters, user", SIGNATURES, ids=[n for _, n, _, _ in SIGNATURES])
def test_the_functions_we_call_take_what_we_pass(module, name, parameters, user):
    taken = list(inspect.signature(lookup(module, name)).parameters)
    assert taken[:len(parameters)] == parameters, (
        f"{module}.{name} now takes {taken}, not {parameters} first: " + UPGRADE.format(version=version(), user=user))


def test_the_gguf_tables_cover_our_architectures():
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    from models.convert import SUPPORTED_ARCHITECTURES

    missing = [arch for arch in SUPPORTED_ARCHITECTURES if arch not in GGUF_CONFIG_MAPPING]
    assert not missing, (f"GGUF_CONFIG_MAPPING has no entry for {missing}: "
                         + UPGRADE.format(version=version(), user="models/gguf_arch.py ARCH_KEYS"))
    assert set(GGUF_TOKENIZER_MAPPING) == {"tokenizer", "tokenizer_config"}, (
        f"GGUF_TOKENIZER_MAPPING's groups are now {sorted(GGUF_TOKENIZER_MAPPING)}: "
        + UPGRADE.format(version=version(), user="models/convert.py tokenizer_fields"))


@pytest.mark.parametrize("architecture, builder", [("gemma3", "gemma_tokenizer"), ("llama", "sentencepiece_tokenizer"),
                                                   ("phi3", "phi3_tokenizer")])
def test_each_architecture_gets_the_tokenizer_builder_merges_expects(architecture, builder):
    """models/merges.py copies each builder's respelling and scores, chosen by which builder it is."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    chosen = mapping.select_tokenizer_builder(architecture, "llama")
    assert chosen is getattr(mapping, builder), (
        f"select_tokenizer_builder({architecture!r}, 'llama') is now {getattr(chosen, '__name__', chosen)}, "
        f"not {builder}: " + UPGRADE.format(version=version(), user="models/merges.py sentencepiece_merges"))


def test_the_rms_norms_keep_their_epsilon_and_offset():
    """models/qlinear.py fuses each norm into F.rms_norm(x, weight + offset, eps) by reading these attributes."""
    from models.qlinear import _rms_norm_kinds

    x = torch.randn(3, 8)
    for cls, (eps_attribute, offset) in _rms_norm_kinds().items():
        norm = cls(8, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(8))
        assert hasattr(norm, eps_attribute), (
            f"{cls.__name__} has no attribute {eps_attribute!r} now: "
            + UPGRADE.format(version=version(), user="models/qlinear.py _rms_norm_kinds"))
        fused = F.rms_norm(x, (8,), norm.weight.detach() + offset, getattr(norm, eps_attribute))
        assert torch.allclose(norm(x), fused, atol=1e-5), (
            f"{cls.__name__} no longer computes rms_norm(x) * (weight + {offset}): "
            + UPGRADE.format(version=version(), user="models/qlinear.py _rms_norm_kinds"))


def test_the_cache_still_builds_its_layers_from_the_class_we_give_it():
    """inference/kv.py sets DynamicCache.layer_class_to_replicate and overrides DynamicLayer.update."""
    from transformers.cache_utils import DynamicLayer

    from inference.kv import GrowingLayer, transformers_cache

    user = "inference/kv.py transformers_cache / GrowingLayer"
    layer = DynamicLayer()
    for attribute in ("is_initialized", "lazy_initialization", "update"):
        assert hasattr(layer, attribute), (
            f"DynamicLayer has no {attribute!r} now: " + UPGRADE.format(version=version(), user=user))
    cache = transformers_cache()
    keys = torch.randn(1, 2, 3, 4)
    out_keys, _ = cache.update(keys, keys.clone(), 0)
    assert isinstance(cache.layers[0], GrowingLayer), (
        "DynamicCache no longer builds its layers from layer_class_to_replicate: "
        + UPGRADE.format(version=version(), user=user))
    assert torch.equal(out_keys, keys)
