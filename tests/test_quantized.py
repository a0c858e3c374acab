"""Quantized CPU weights: GGUF blocks repacked exactly, the kernels' products, and whole models.

The tiny models here carry a Q4_K_M-like mix of types (Q4_K, Q6_K, Q5_0, Q8_0, Q4_0), so every
conversion route runs: int4 repack (with llama's q/k row reordering), int8 rounding, tied and
untied output projections, biases (qwen2).
"""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from gguf_factory import random_blocks, write_tiny_gguf
from models.loader import QUANT_FORMAT, LoadOptions, checkpoint_dir, load_model
from models import quant_checkpoint
from models.qlinear import (Int4Linear, Int8Embedding, Int8Linear, ShortlistHead, int4_scales_zeros, pack_int4)
from models.quant_blocks import dequantize, int4_rows, int8_rows, is_int4_exact, round_int4

RNG = np.random.default_rng(7)


def quantized_raw(type_name: str, rows: int, cols: int) -> np.ndarray:
    if type_name in ("Q4_K", "Q6_K"):
        return random_blocks(RNG, type_name, rows, cols)
    weights = (RNG.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    return gguf.quants.quantize(weights, Q[type_name])


# ----- the repack ----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_repack_is_bit_exact(type_name):
    rows, cols = 48, 512
    raw = quantized_raw(type_name, rows, cols)
    want = gguf.quants.dequantize(raw, Q[type_name]).reshape(rows, cols)
    got = int4_rows(raw, Q[type_name].value, rows, cols)
    assert got.q.dtype == np.uint8 and got.q.max() <= 15
    assert np.array_equal(got.dequantize(), want)  # bit for bit, not approximately


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"])
def test_our_dequantization_is_gguf_pys_bit_for_bit(type_name):
    """The numpy dequantizers a first conversion uses instead of importing gguf-py give its values exactly
    (random bytes everywhere but the half-float scales, so every bit pattern of the quants turns up)."""
    rows, cols = 24, 512
    qtype = Q[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if block == 1:
        values = RNG.standard_normal(rows * cols).astype(np.float32)
        raw = gguf.quants.quantize(values, qtype) if type_name == "BF16" else values.astype(
            np.float16 if type_name == "F16" else np.float32)
        raw = raw.view(np.uint8)
    else:
        raw = RNG.integers(0, 256, size=(rows * cols // block, block_bytes), dtype=np.uint8)
        halves = {"Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q6_K": (block_bytes - 2,)}.get(type_name, (0,))
        for at in halves:
            raw[:, at:at + 2] = (RNG.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    want = gguf.quants.dequantize(raw, qtype).reshape(-1)
    got = dequantize(raw.reshape(-1), qtype.value)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("type_name", ["Q5_0", "Q6_K", "Q8_0"])
def test_other_types_round_to_int8_within_half_a_step(type_name):
    rows, cols = 32, 256
    weights = gguf.quants.dequantize(quantized_raw(type_name, rows, cols), Q[type_name]).reshape(rows, cols)
    table = int8_rows(weights)
    assert not is_int4_exact(Q[type_name].value)
    assert np.all(np.abs(table.dequantize() - weights) <= table.scale[:, None] / 2 * 1.0001)
    assert np.abs(table.q).max() == 127


def test_int8_rows_of_zeros():
    table = int8_rows(np.zeros((3, 32), dtype=np.float32))
    assert np.all(table.q == 0) and np.all(table.scale == 1)


# ----- the kernels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int4_linear_matches_dense(rows):
    out_f, in_f = 64, 256
    groups = int4_rows(quantized_raw("Q4_K", out_f, in_f), Q.Q4_K.value, out_f, in_f)
    bias = torch.randn(out_f) * 0.01
    layer = Int4Linear(in_f, out_f, pack_int4(torch.from_numpy(groups.q)),
                       int4_scales_zeros(torch.from_numpy(groups.scale), torch.from_numpy(groups.min)).bfloat16(),
                       bias)
    x = torch.randn(2, rows, in_f)
    want = F.linear(x, torch.from_numpy(groups.dequantize()), bias)
    got = layer(x)
    assert got.shape == (2, rows, out_f) and got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.02  # bfloat16 inputs and scales


def test_int8_linear_and_embedding_match_dense():
    weights = (RNG.standard_normal((96, 64)) * 0.05).astype(np.float32)
    table = int8_rows(weights)
    q, scale = torch.from_numpy(table.q), torch.from_numpy(table.scale).bfloat16()
    dense = torch.from_numpy(table.dequantize())
    layer = Int8Linear(64, 96, q, scale)
    x = torch.randn(3, 64)
    want = F.linear(x, dense)
    assert (layer(x) - want).norm() / want.norm() < 0.02
    embedding = Int8Embedding(q, scale, embed_scale=2.0)
    ids = torch.tensor([[0, 5, 95]])
    assert torch.allclose(embedding(ids), 2.0 * dense[ids], rtol=0.01, atol=1e-4)


# ----- whole models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    return {arch: write_tiny_gguf(folder / f"mixed-{arch}.gguf", arch, hidden=256, ffn=512, heads=4, kv_heads=2,
                                  weight_types="mixed")
            for arch in ("llama", "qwen2", "gemma3")}


def logits_of(lm, ids):
    with torch.inference_mode():
        return lm.model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("activations", ["float32", "bfloat16"])  # AVX2-only CPUs, AVX512-BF16/AMX CPUs
def test_quantized_model_follows_the_dense_one(mixed_models, tmp_path, arch, activations):
    cache = tmp_path / "cache"
    dense = load_model(mixed_models[arch], cache, LoadOptions(dtype="float32", weights="dense"))
    quant = load_model(mixed_models[arch], cache, LoadOptions(dtype=activations, weights="quantized"))
    assert quant.weights == "quantized" and dense.weights == "dense"
    assert quant.dtype == getattr(torch, activations)
    kinds = {type(module).__name__ for module in quant.model.modules()}
    assert {"Int4Linear", "Int8Linear", "Int8Embedding", "FusedRMSNorm"} <= kinds and "Linear" not in kinds
    assert not any(name.endswith("RMSNorm") and name != "FusedRMSNorm" for name in kinds)
    ids = quant.encode("The quick brown fox jumps over the lazy dog.")
    want, got = logits_of(dense, ids), logits_of(quant, ids)
    assert (got - want).norm() / want.norm() < (0.03 if activations == "float32" else 0.06)
    assert quant.memory_bytes < dense.memory_bytes / 2.5


def test_tied_output_shares_the_embedding_table(mixed_models, model_cache):
    lm = load_model(mixed_models["gemma3"], model_cache, LoadOptions(weights="quantized"))
    assert lm.model.lm_head.q is lm.model.model.embed_tokens.q


def test_untied_output_keeps_its_own_weights(mixed_models, model_cache):
    lm = load_model(mixed_models["llama"], model_cache, LoadOptions(weights="quantized"))
    # Q4_0 output.weight, but 389 rows: torch packs int4 rows by 16, so it is rounded to int8
    assert isinstance(lm.model.lm_head, Int8Linear) and lm.model.lm_head.q is not lm.model.model.embed_tokens.q
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, Int4Linear)  # Q4_K, rows reordered


def test_cpu_default_is_quantized_and_dense_stays_selectable(mixed_models, model_cache):
    assert load_model(mixed_models["qwen2"], model_cache).weights == "quantized"
    assert load_model(mixed_models["qwen2"], model_cache, LoadOptions(weights="dense")).weights == "dense"


def test_quantized_cache_is_reused_and_kept_apart(tmp_path, mixed_models):
    gguf_path = shutil.copy(mixed_models["qwen2"], tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    messages: list[str] = []
    first = load_model(gguf_path, cache, LoadOptions(weights="quantized"), progress=lambda f, m: messages.append(m))
    assert any("converting" in m for m in messages)
    folder = checkpoint_dir(cache, gguf_path, first.dtype, "quantized")
    assert folder.is_dir() and f"-q{QUANT_FORMAT}-" in folder.name
    before = (folder / "model.safetensors").stat()
    messages.clear()
    second = load_model(gguf_path, cache, LoadOptions(weights="quantized"), progress=lambda f, m: messages.append(m))
    assert not any("convert" in m for m in messages)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before.st_mtime_ns
    ids = first.encode("hello there")
    assert torch.equal(logits_of(first, ids), logits_of(second, ids))
    load_model(gguf_path, cache, LoadOptions(weights="dense"))
    assert len(list((cache / "converted").iterdir())) == 2


def test_damaged_quantized_cache_is_rebuilt(tmp_path, mixed_models):
    gguf_path = shutil.copy(mixed_models["gemma3"], tmp_path / "model.gguf")
    cache = tmp_path / "cache"
    first = load_model(gguf_path, cache, LoadOptions(weights="quantized"))
    ids = first.encode("hello")
    want = logits_of(first, ids)
    del first  # its weights map the file damaged below
    folder = checkpoint_dir(cache, gguf_path, torch.float32, "quantized")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 100)
    again = load_model(gguf_path, cache, LoadOptions(weights="quantized"))
    assert torch.equal(want, logits_of(again, ids))


def test_quantized_on_cuda_is_refused_clearly(mixed_models, model_cache):
    from models.loader import LoadError, pick_weights

    with pytest.raises(LoadError, match="CPU"):
        pick_weights(torch.device("cuda"), LoadOptions(weights="quantized"))
    with pytest.raises(LoadError, match="unknown weights"):
        pick_weights(torch.device("cpu"), LoadOptions(weights="int3"))
    assert pick_weights(torch.device("cuda"), LoadOptions()) == "dense"


# ----- the shortlist output projection ---------------------------------------------------------------

def test_int4_packing_composes_by_blocks_of_64_rows():
    """The conversion packs a matrix 64 rows at a time; that must equal packing it whole."""
    q = torch.from_numpy(RNG.integers(0, 16, size=(320, 128), dtype=np.uint8))
    whole = pack_int4(q)
    pieces = torch.cat([pack_int4(q[first:first + 64]) for first in range(0, 320, 64)])
    assert torch.equal(whole, pieces)


@pytest.mark.parametrize("rows", [16, 48, 64, 80, 320, 384])
def test_int4_packing_is_torchs_own(rows):
    """`pack_int4` packs whole 64-row blocks in numpy where that gives torch's layout: byte for byte
    what torch's packing gives, whatever the rows left over."""
    q = torch.from_numpy(RNG.integers(0, 16, size=(rows, 640), dtype=np.uint8))
    assert torch.equal(pack_int4(q), torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))


def test_round_int4_stays_within_half_a_step():
    weights = (RNG.standard_normal((16, 64)) * 0.05).astype(np.float32)
    rounded = round_int4(weights)
    step = np.repeat(rounded.scale, 32, axis=1)
    assert np.all(np.abs(rounded.dequantize() - weights) <= step / 2 * 1.0001 + 1e-7)


def shortlist_pair(vocab=4096, width=128, shortlist=64):
    weights = (RNG.standard_normal((vocab, width)) * 0.05).astype(np.float32)
    table = int8_rows(weights)
    coarse = round_int4(table.dequantize())
    q, scale = torch.from_numpy(table.q), torch.from_numpy(table.scale).bfloat16()
    exact = Int8Linear(width, vocab, q, scale)
    layer = Int4Linear(width, vocab, pack_int4(torch.from_numpy(coarse.q)),
                       int4_scales_zeros(torch.from_numpy(coarse.scale), torch.from_numpy(coarse.min)).bfloat16())
    return exact, ShortlistHead(layer, q, scale, shortlist=shortlist)


def test_shortlist_head_gives_the_best_tokens_their_exact_logits():
    exact, head = shortlist_pair()
    x = torch.randn(2, 3, 128)
    want, got = exact(x), head(x)
    assert got.shape == want.shape == (2, 3, 4096)
    flat_want, flat_got = want.reshape(-1, 4096), got.reshape(-1, 4096)
    for row in range(6):
        best = flat_want[row].topk(8).indices
        assert torch.allclose(flat_got[row, best], flat_want[row, best], rtol=1e-2, atol=1e-3)
        assert int(flat_got[row].argmax()) == int(flat_want[row].argmax())
    assert (got - want).norm() / want.norm() < 0.1  # the tail is only coarse


def test_large_vocabularies_get_a_shortlist_head_where_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(quant_checkpoint, "COARSE_MIN_ROWS", 256)
    path = write_tiny_gguf(tmp_path / "m.gguf", "gemma3", hidden=256, ffn=512, weight_types="mixed",
                           vocab_multiple=16)
    cache = tmp_path / "cache"
    plain = load_model(path, cache, LoadOptions(weights="quantized"))
    folder = checkpoint_dir(cache, path, torch.float32, "quantized")
    coarse_file = folder / quant_checkpoint.COARSE_FILE
    assert not coarse_file.exists()  # the conversion leaves the coarse copy to the loads that use it
    assert not any(".coarse." in name for name in quant_checkpoint.map_safetensors(folder / "model.safetensors"))
    fast = quant_checkpoint.load_quantized_model(folder, torch.float32, shortlist=True)
    written = coarse_file.stat().st_mtime_ns
    slow = quant_checkpoint.load_quantized_model(folder, torch.float32, shortlist=False)
    again = quant_checkpoint.load_quantized_model(folder, torch.float32, shortlist=True)
    assert coarse_file.stat().st_mtime_ns == written  # built once, then mapped
    assert isinstance(fast.lm_head, ShortlistHead) and isinstance(slow.lm_head, Int8Linear)
    assert torch.equal(fast.lm_head.coarse.packed, again.lm_head.coarse.packed)
    whole = coarse_file.read_bytes()
    for damaged in (whole[:len(whole) // 2], b"\x01"):  # cut short by a crash; a stub
        stand_in = tmp_path / "damaged"  # a new file in its place: the models above still map the old one
        stand_in.write_bytes(damaged)
        stand_in.replace(coarse_file)
        rebuilt = quant_checkpoint.load_quantized_model(folder, torch.float32, shortlist=True)
        assert coarse_file.read_bytes() == whole
        assert torch.equal(rebuilt.lm_head.coarse.packed, fast.lm_head.coarse.packed)
    assert fast.lm_head.q is fast.model.embed_tokens.q  # still one exact table, shared with the embedding
    ids = plain.encode("The quick brown fox")
    with torch.inference_mode():
        a, b = fast(input_ids=torch.tensor([ids])).logits[0], slow(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_wide_inputs_multiply_the_dequantized_int8_weights():
    """A prefill's many rows go through a dense product of the dequantized weights (in the inputs'
    dtype), a few decode rows through the int8 kernel; both compute the same product."""
    weights = (RNG.standard_normal((96, 64)) * 0.05).astype(np.float32)
    table = int8_rows(weights)
    dense = torch.from_numpy(table.q).float() * torch.from_numpy(table.scale).bfloat16().float()[:, None]
    layer = Int8Linear(64, 96, torch.from_numpy(table.q), torch.from_numpy(table.scale).bfloat16())
    wide, narrow = torch.randn(1, 40, 64), torch.randn(1, 2, 64)
    assert torch.allclose(layer(wide), F.linear(wide, dense), atol=1e-5, rtol=1e-5)  # float32 throughout
    assert (layer(narrow) - F.linear(narrow, dense)).norm() / F.linear(narrow, dense).norm() < 0.02
