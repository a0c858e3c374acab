"""models.convert's streamed safetensors writer and its fast paths give what transformers' own steps give.

The reference for the weights is the converter as it was before streaming: every GGUF tensor
dequantized whole with gguf-py, fixed up by transformers' tensor processor, named by transformers'
`get_gguf_hf_weights_map`, converted with torch and saved with `safetensors.torch.save_file`. (The
converter now does each of those steps with its own code: models/gguf_arch.py, models/quant_blocks.py.)
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models import convert
from models.convert import (
    UnsupportedModel,
    build_config,
    build_tokenizer,
    convert_to_checkpoint,
    tokenizer_fields,
)
from gguf_factory import write_tiny_gguf
from models.gguf_file import read_header, tensor_data
from models.merges import derive_merges

ARCHS = ("llama", "qwen2", "gemma3")


def _skeleton_and_processor(header):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    config = build_config(header)
    with convert.MODEL_BUILD_LOCK, torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(convert.transformers_config(config))
    processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(config=config)
    return skeleton, processor, config


def whole_tensor_state_dict(header, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The weights as the converter built them before it streamed: whole tensors, transformers' name map."""
    from gguf import quants
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    skeleton, processor, config_dict = _skeleton_and_processor(header)
    name_map = get_gguf_hf_weights_map(skeleton, processor)
    state = {}
    for info in header.tensors:
        weights = quants.dequantize(np.asarray(tensor_data(header, info)), info.ggml_type)
        result = processor.process(weights=weights.reshape(tuple(reversed(info.shape))), name=info.name,
                                   tensor_key_mapping=name_map, parsed_parameters={"config": config_dict})
        if result.name in name_map:
            state[name_map[result.name]] = torch.from_numpy(np.array(result.weights)).to(dtype)
    return state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype, pieces", [(torch.bfloat16, "default"), (torch.float32, "default"),
                                           (torch.bfloat16, "tiny"), (torch.float32, "mixed types")])
def test_streamed_weights_match_whole_tensor_conversion(tmp_path, tiny_models, monkeypatch, arch, dtype, pieces):
    """`model.safetensors` loads with safetensors' own reader and holds exactly the old weights.

    "tiny" pieces cut every matrix of the tiny models into many pieces and convert a few values
    per torch call, as the bundled model's large tensors are. "mixed types": a Q4_K_M-like mix
    (Q4_K, Q6_K, Q5_0, Q8_0, Q4_0), every dequantizer and fix-up on the way.
    """
    if pieces == "tiny":
        monkeypatch.setattr(convert, "CHUNK_BYTES", 1000)
        monkeypatch.setattr(convert, "SERIAL_VALUES", 100)
    path = tiny_models[arch]
    if pieces == "mixed types":
        path = write_tiny_gguf(tmp_path / f"{arch}.gguf", arch, weight_types="mixed")
    header = read_header(path)
    folder = convert_to_checkpoint(header, tmp_path / "checkpoint", dtype)
    got = load_file(folder / "model.safetensors")
    want = whole_tensor_state_dict(header, dtype)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt"}
    head_length = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    assert head_length % 8 == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_json_matches_transformers_own_build(tiny_models, arch):
    """With our merges written in (gemma3) or not (the byte-level files carry theirs), the same tokenizer.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    header = read_header(tiny_models[arch])
    text, _ = build_tokenizer(header)
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_fields(header)[0])
    assert json.loads(text) == json.loads(backend.to_str())
    if arch == "gemma3":
        assert len(json.loads(text)["model"]["merges"]) > 100


@pytest.mark.parametrize("arch", ["gemma3", "llama", "phi3"])
def test_sentencepiece_tokenizer_matches_under_each_builder(tiny_models, arch):
    """The tiny Gemma vocabulary as each SentencePiece builder reads it (Gemma's respelling and
    file order, Llama's and Phi-3's scores): our merges written in give transformers' tokenizer.json."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    gemma = read_header(tiny_models["gemma3"])
    header = dataclasses.replace(gemma, metadata={**gemma.metadata, "general.architecture": arch})
    text, _ = build_tokenizer(header)
    backend, _ = convert_gguf_tokenizer(arch, tokenizer_fields(header)[0])
    assert json.loads(text) == json.loads(backend.to_str())


def _transformers_merges(vocab, scores):
    from transformers.tokenization_utils_base import generate_merges

    return [list(pair) for pair in generate_merges(vocab, scores)]


def test_derive_merges_matches_transformers_on_random_vocabularies():
    """Tied scores, JSON escapes, control and astral characters: the same merges in the same order."""
    rng = random.Random(7)
    alphabet = 'ab\u2581\u0107\x00\U0001f389"\\\n\x1f '
    for _ in range(300):
        tokens = list(dict.fromkeys("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                                    for _ in range(rng.randint(1, 60))))
        scores = {token: rng.choice([0, 1, 2, -1.5, 0.5]) for token in tokens}
        vocab = {token: index for index, token in enumerate(tokens)}
        assert json.loads(derive_merges(vocab, scores)) == _transformers_merges(vocab, scores)


def test_derive_merges_matches_transformers_on_a_sentencepiece_vocabulary(tiny_models):
    tokens = tokenizer_fields(read_header(tiny_models["gemma3"]))[0]["tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    positions = {token: -index for index, token in enumerate(tokens)}
    merges = json.loads(derive_merges(vocab, positions))
    assert merges == _transformers_merges(vocab, positions) and len(merges) > 100


def test_derive_merges_declines_what_it_cannot_say():
    assert derive_merges({}, {}) == "[]"
    assert derive_merges({"a": 0, "b": 1}, {"a": 0.0}) is None  # other tokens in the vocabulary
    assert derive_merges({"ab": 0, "a": 1}, {"ab": float("nan"), "a": 0.0}) is None


def _with_tensors(header, change):
    """A copy of `header` whose tensor list is `change(tensors)`."""
    return dataclasses.replace(header, tensors=change(list(header.tensors)))


def test_missing_weight_is_refused_before_writing(tmp_path, tiny_models):
    header = _with_tensors(read_header(tiny_models["qwen2"]),
                           lambda tensors: [t for t in tensors if t.name != "blk.1.ffn_up.weight"])
    with pytest.raises(UnsupportedModel, match="lacks 1 weights the model needs, e.g. model.layers.1.mlp.up_proj"):
        convert_to_checkpoint(header, tmp_path / "checkpoint", torch.bfloat16)
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no staging folder left behind


@pytest.mark.parametrize("shape", ["transposed", "other size"])
def test_wrong_shape_is_refused(tmp_path, tiny_models, shape):
    def change(tensors):
        for index, tensor in enumerate(tensors):
            if tensor.name == "blk.0.ffn_up.weight":
                width, height = tensor.shape
                new = (height, width) if shape == "transposed" else (width, height // 2)
                tensors[index] = dataclasses.replace(tensor, shape=new)
        return tensors

    header = _with_tensors(read_header(tiny_models["gemma3"]), change)
    with pytest.raises(UnsupportedModel, match=r"tensor blk.0.ffn_up.weight has shape \[.*\], but the model "
                                               r"expects \[128, 64\] for model.layers.0.mlp.up_proj.weight"):
        convert_to_checkpoint(header, tmp_path / "checkpoint", torch.bfloat16)
    assert list(tmp_path.iterdir()) == []


def test_progress_runs_to_the_end(tmp_path, tiny_models):
    reports: list[tuple[float, str]] = []
    convert_to_checkpoint(read_header(tiny_models["llama"]), tmp_path / "checkpoint", torch.bfloat16,
                          progress=lambda fraction, message: reports.append((fraction, message)))
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert reports[-1][1].startswith("converting tensors")
