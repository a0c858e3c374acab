"""models.gguf_file: the fast header reader on tiny files, and its refusals of damaged ones."""

from __future__ import annotations

import os
import struct

import pytest

from gguf_factory import CHAT_TEMPLATES, vocab_info, write_tiny_gguf
from models.gguf_file import GGUFError, read_header


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_header_of_tiny_models(tiny_models, arch):
    header = read_header(tiny_models[arch])
    assert header.architecture == arch
    assert header.version == 3
    assert header.quantization == "Q8_0"
    assert header.context_length == 256
    assert header.chat_template is None
    assert header.file_size == tiny_models[arch].stat().st_size
    assert header.metadata["general.name"] == f"tiny-{arch}"
    assert header.arch_value("block_count") == 2
    assert header.arch_value("embedding_length") == 64
    assert len(header.metadata["tokenizer.ggml.tokens"]) == vocab_info(arch)["vocab_size"]
    assert header.metadata["tokenizer.ggml.eos_token_id"] == vocab_info(arch)["eos_token_id"]
    names = {t.name for t in header.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    assert ("output.weight" in names) == (arch != "gemma3")
    # tensor table is consistent: every tensor lies inside the file, after the header
    assert all(header.data_offset <= t.offset and t.offset + t.n_bytes <= header.file_size for t in header.tensors)
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    assert embd.shape == (64, vocab_info(arch)["vocab_size"])  # GGUF order: innermost first
    assert embd.type_name == "F16"
    assert header.n_parameters > 0
    assert header.estimate_memory(4) > header.n_parameters * 4


def test_unquantized_file_and_other_context_length(tmp_path):
    path = write_tiny_gguf(tmp_path / "f32.gguf", "qwen2", quantize=False, context_length=512,
                           chat_template=CHAT_TEMPLATES["qwen2"])
    header = read_header(path)
    assert header.quantization == "F32"
    assert header.context_length == 512
    assert header.chat_template == CHAT_TEMPLATES["qwen2"]
    assert {t.type_name for t in header.tensors} == {"F32"}


# ----- damaged files -------------------------------------------------------------------------

def _write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refused(path) -> str:
    with pytest.raises(GGUFError) as info:
        read_header(path)
    message = str(info.value)
    assert path.name in message  # says which file
    return message


def test_empty_file(tmp_path):
    message = _refused(_write(tmp_path, "empty.gguf", b""))
    assert "not a GGUF file" in message and "0 bytes" in message


def test_random_bytes(tmp_path):
    message = _refused(_write(tmp_path, "noise.gguf", os.urandom(4096)))
    assert "not a GGUF file" in message


def test_random_bytes_after_a_valid_preamble(tmp_path):
    """Magic and version right, the rest noise: the counts or lengths give it away."""
    for seed in range(20):
        noise = bytes((seed * 7919 + i * 104729) % 251 for i in range(4096))
        path = _write(tmp_path, f"noise{seed}.gguf", b"GGUF" + struct.pack("<I", 3) + noise)
        message = _refused(path)
        assert "corrupt" in message or "truncated" in message or "architecture" in message


def test_wrong_magic(tmp_path, tiny_models):
    data = bytearray(tiny_models["llama"].read_bytes())
    data[:4] = b"GGML"
    message = _refused(_write(tmp_path, "magic.gguf", bytes(data)))
    assert "bad magic" in message


def test_unsupported_version(tmp_path, tiny_models):
    data = bytearray(tiny_models["llama"].read_bytes())
    data[4:8] = struct.pack("<I", 99)
    message = _refused(_write(tmp_path, "v99.gguf", bytes(data)))
    assert "version 99" in message


def test_truncated_in_tensor_data(tmp_path, tiny_models):
    data = tiny_models["qwen2"].read_bytes()
    header = read_header(tiny_models["qwen2"])
    cut = (header.data_offset + len(data)) // 2
    message = _refused(_write(tmp_path, "cut-data.gguf", data[:cut]))
    assert "truncated" in message and f"{cut:,} bytes" in message


def test_truncated_by_one_byte(tmp_path, tiny_models):
    data = tiny_models["gemma3"].read_bytes()
    assert "truncated" in _refused(_write(tmp_path, "cut1.gguf", data[:-1]))


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.95])
def test_truncated_in_header(tmp_path, tiny_models, fraction):
    data = tiny_models["llama"].read_bytes()
    end_of_header = read_header(tiny_models["llama"]).data_offset
    cut = int(end_of_header * fraction)
    message = _refused(_write(tmp_path, f"cut-header-{fraction}.gguf", data[:cut]))
    assert "truncated" in message


def test_absurd_tensor_shape(tmp_path, tiny_models):
    """A dimension so large its element count overflows 64 bits must not pass as a small tensor."""
    path = tiny_models["llama"]
    header = read_header(path)
    data = bytearray(path.read_bytes())
    embd = next(t for t in header.tensors if t.name == "token_embd.weight")
    # token_embd's shape is written as two u64 after its name; find them in the tensor table
    needle = b"token_embd.weight" + struct.pack("<I", 2) + struct.pack("<QQ", *embd.shape)
    at = data.index(needle) + len(b"token_embd.weight") + 4
    data[at:at + 16] = struct.pack("<QQ", 1 << 62, 1 << 62)
    assert "truncated" in _refused(_write(tmp_path, "huge.gguf", bytes(data)))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="cannot read missing.gguf"):
        read_header(tmp_path / "missing.gguf")
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    with pytest.raises(GGUFError, match="folder.gguf"):
        read_header(folder)
