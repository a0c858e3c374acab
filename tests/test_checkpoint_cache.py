"""A damaged conversion cache is found at load time and rebuilt, not served or left to fail forever."""

from pathlib import Path

import pytest
import torch

from models.convert import checkpoint_problem
from models.loader import LoadOptions, checkpoint_dir, load_model

WEIGHTS = ("dense", "quantized")  # both conversion caches: dequantized, and kept in the CPU kernels' layouts


def first_logits(lm) -> torch.Tensor:
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits[0, -1]


def cut_short(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "weights cut short": lambda folder: cut_short(folder / "model.safetensors", 0.9),
    "weights emptied": lambda folder: (folder / "model.safetensors").write_bytes(b""),
    "weights header garbled": lambda folder: (folder / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"x" * 16),
    "weights header not an object": lambda folder: (folder / "model.safetensors").write_bytes(
        b"\x02" + b"\0" * 7 + b"[]" + b"\0" * 64),
    "tokenizer cut short": lambda folder: cut_short(folder / "tokenizer.json"),
    "config garbled": lambda folder: (folder / "config.json").write_text("{\"model_type\": "),
    "source record lost": lambda folder: (folder / "source.json").unlink(),
}


@pytest.fixture(params=WEIGHTS)
def converted(tiny_models, tmp_path, request):
    gguf = tiny_models["llama"]
    options = LoadOptions(dtype="float32", weights=request.param)
    lm = load_model(gguf, tmp_path, options)
    folder = checkpoint_dir(tmp_path, gguf, torch.float32, request.param)
    logits = first_logits(lm)
    del lm  # a quantized model maps its cache file, which the tests below damage
    return gguf, tmp_path, folder, logits, options


def test_a_fresh_conversion_is_complete_and_reused_as_is(converted):
    gguf, cache, folder, logits, options = converted
    assert checkpoint_problem(folder) is None
    written = (folder / "model.safetensors").stat().st_mtime_ns
    messages = []
    lm = load_model(gguf, cache, options, progress=lambda fraction, message: messages.append(message))
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert not any("convert" in m or "rebuild" in m for m in messages)
    assert torch.equal(first_logits(lm), logits)


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_conversion_is_rebuilt_on_the_next_load(converted, damage, caplog):
    gguf, cache, folder, logits, options = converted
    damage(folder)
    assert checkpoint_problem(folder)
    messages = []
    lm = load_model(gguf, cache, options, progress=lambda fraction, message: messages.append(message))
    assert "rebuilding a damaged conversion cache" in messages
    assert "rebuilding the cached checkpoint" in caplog.text
    assert checkpoint_problem(folder) is None
    assert torch.equal(first_logits(lm), logits)
    assert not list(folder.parent.glob("*.partial"))
