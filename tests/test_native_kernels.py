"""The AVX2 int8 kernel (models/native_kernels.py): built with the machine's C compiler, checked
against float references, chosen by CPU feature, and replaced by torch's kernels wherever it can't
be had. The torch path stays tested on every machine by tests/test_quantized.py (kernels="torch")."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gguf_factory import write_tiny_gguf
from inference.generate import stream_generate
from inference.params import GenerationParams
from models import native_kernels, qlinear
from models.loader import LoadError, LoadOptions, load_model
from models.qlinear import NATIVE_ROWS_INT8, WIDE_ROWS_INT4, Int4Linear, Int8Linear, int4_scales_zeros, pack_int4
from models.quant_blocks import int8_rows, round_int4

needs_avx2 = pytest.mark.skipif(not native_kernels.cpu_has_avx2() or not shutil.which("cc"),
                                reason="the kernel needs an x86 CPU with AVX2 and a C compiler")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    built = native_kernels.load_kernels(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the kernel should build and pass its self-check on an AVX2 CPU with a compiler"
    return built


def reference(x, q, scale):
    return x @ (q.float() * scale[:, None]).t()


@needs_avx2
@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (1, 640, 1000), (3, 2048, 77), (31, 256, 300)])
def test_matches_a_float_reference(kernels, m, k, n):
    generator = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=generator)
    q = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale = torch.rand(n, generator=generator) / 50
    got = kernels.matmul(x, q, scale)
    want = reference(x, q, scale)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert (got - want).norm() / want.norm() < 0.01  # int8 activations in blocks of 32


@needs_avx2
def test_activations_are_quantized_as_llama_cpp_does(kernels):
    """Each block of 32: d = max |x| / 127, q = x / d rounded half to even, and the sum of the q — byte for
    byte, on values over many magnitudes, exact halves, zeros and denormal blocks (which become zeros)."""
    import ctypes

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((64, 256)) * 10.0 ** rng.integers(-30, 30, (64, 1))).astype(np.float32)
    x[1, :32] = np.arange(32) - 15.5  # a ramp through zero
    x[2, :32] = np.where(np.arange(32) % 2, 127.0, 2.5)  # d = 1: 2.5 is a tie, rounded to 2 (even)
    x[3, :32] = 0.0
    x[4, :32] = 1e-40  # denormal: a block of zeros
    m, k = x.shape
    q = np.empty((m, k), dtype=np.int8)
    scale, sums = np.empty((m, k // 32), dtype=np.float32), np.empty((m, k // 32), dtype=np.float32)
    pointer = ctypes.c_void_p
    kernels._lib.quantize_rows.argtypes = [pointer, ctypes.c_int64, ctypes.c_int64, pointer, pointer, pointer]
    kernels._lib.quantize_rows(x.ctypes.data, m, k, q.ctypes.data, scale.ctypes.data, sums.ctypes.data)
    blocks = x.reshape(m, k // 32, 32)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", over="ignore"):
        inverse = np.float32(1) / d
    d[~(inverse <= np.finfo(np.float32).max)] = 0  # 1 / d overflows (or d is 0): the block is zeros
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    want = np.rint(blocks * inverse[..., None]).astype(np.int8)
    assert np.array_equal(scale, d) and np.array_equal(q, want.reshape(m, k))
    assert np.array_equal(sums, want.sum(axis=-1, dtype=np.int32).astype(np.float32))


@needs_avx2
def test_blocks_are_scaled_on_their_own(kernels):
    """A block of large values beside a block of small ones: each block keeps its own precision."""
    x = torch.cat([torch.full((1, 32), 1000.0), torch.full((1, 32), 0.001)], dim=1)
    q = torch.cat([torch.zeros(1, 32, dtype=torch.int8), torch.ones(1, 32, dtype=torch.int8)], dim=1)
    got = kernels.matmul(x, q, torch.ones(1))
    assert torch.allclose(got, torch.tensor([[0.032]]), rtol=0.01)


@needs_avx2
def test_zero_activations_give_zeros(kernels):
    q = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    assert torch.equal(kernels.matmul(torch.zeros(2, 64), q, torch.ones(8)), torch.zeros(2, 8))


@needs_avx2
def test_int8_linear_uses_it_for_decode_steps_and_short_prefills(kernels, monkeypatch):
    weights = (np.random.default_rng(3).standard_normal((96, 64)) * 0.05).astype(np.float32)
    table = int8_rows(weights)
    q, scale = torch.from_numpy(table.q), torch.from_numpy(table.scale).bfloat16()
    bias = torch.randn(96) * 0.01
    layer = Int8Linear(64, 96, q, scale, bias, native=kernels)
    calls = []
    monkeypatch.setattr(kernels, "matmul", lambda *a, f=kernels.matmul: calls.append(1) or f(*a))
    x = torch.randn(2, 5, 64)
    want = F.linear(x, torch.from_numpy(table.dequantize()), bias)
    got = layer(x)
    assert calls and got.shape == (2, 5, 96)
    assert (got - want).norm() / want.norm() < 0.01
    calls.clear()
    layer(torch.randn(NATIVE_ROWS_INT8 - 1, 64))  # a short prompt's prefill: still the kernel
    assert calls
    calls.clear()
    layer(torch.randn(NATIVE_ROWS_INT8, 64))  # a long one: the dequantized product
    assert not calls
    assert "AVX2" in repr(layer)
    monkeypatch.setattr(qlinear, "WIDE_MAX_WEIGHTS", 96 * 64 - 1)  # a table too large to dequantize
    x = torch.randn(NATIVE_ROWS_INT8 + 3, 64)  # a whole prompt's logits: the kernel at any width
    got = layer(x)
    assert calls
    want = F.linear(x, torch.from_numpy(table.dequantize()), bias)
    assert (got - want).norm() / want.norm() < 0.01


def int4_layer(weights: np.ndarray, kernels=None):
    groups = round_int4(weights)
    scales_zeros = int4_scales_zeros(torch.from_numpy(groups.scale), torch.from_numpy(groups.min))  # [in/32, out, 2]
    nibbles = torch.from_numpy(native_kernels.pack_nibbles(groups.q))
    layer = Int4Linear(weights.shape[1], weights.shape[0], pack_int4(torch.from_numpy(groups.q)),
                       scales_zeros.bfloat16(), native=kernels, nibbles=nibbles, native_scales=scales_zeros.transpose(0, 1))
    return layer, torch.from_numpy(groups.dequantize())


@needs_avx2
@pytest.mark.parametrize("m", [1, 7])
def test_int4_matches_a_float_reference(kernels, m, monkeypatch):
    weights = (np.random.default_rng(m).standard_normal((80, 256)) * 0.05).astype(np.float32)
    layer, dense = int4_layer(weights, kernels)
    x = torch.randn(m, 256)
    want = x @ dense.t()
    assert layer.native is not None and "AVX2" in repr(layer)
    assert (layer(x) - want).norm() / want.norm() < 0.01
    torch_only, _ = int4_layer(weights)
    assert torch_only.native is None and (torch_only(x) - want).norm() / want.norm() < 0.02
    calls = []
    monkeypatch.setattr(kernels, "matmul4", lambda *a, f=kernels.matmul4: calls.append(1) or f(*a))
    prompt = torch.randn(WIDE_ROWS_INT4 - 1, 256)  # a short prompt's prefill: the kernel too
    assert (layer(prompt) - prompt @ dense.t()).norm() / (prompt @ dense.t()).norm() < 0.01 and calls


@needs_avx2
def test_int4_wide_inputs_multiply_the_dequantized_weights(kernels):
    """From WIDE_ROWS_INT4 rows on, the kernel's copy (float16 scales) is dequantized and multiplied as
    floats: the groups' values up to the float16 rounding of their scales."""
    weights = (np.random.default_rng(5).standard_normal((80, 256)) * 0.05).astype(np.float32)
    layer, dense = int4_layer(weights, kernels)
    assert (kernels.dequantize4(layer.nibbles, layer.native_scales) - dense).norm() / dense.norm() < 2e-3
    x = torch.randn(WIDE_ROWS_INT4, 256)
    want = x @ dense.t()
    assert (layer(x) - want).norm() / want.norm() < 2e-3


def test_odd_widths_and_strided_weights_keep_torch_kernels():
    class Fake:
        supports = staticmethod(native_kernels.Q8Kernels.supports)

    layer = Int8Linear(40, 8, torch.zeros(8, 40, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16), native=Fake())
    assert layer.native is None  # 40 is not a multiple of the kernel's 32-value blocks
    strided = torch.zeros(64, 16, dtype=torch.int8).t()  # [16, 64], not contiguous
    layer = Int8Linear(64, 16, strided, torch.ones(16, dtype=torch.bfloat16), native=Fake())
    assert layer.native is None  # the kernel reads rows as plain memory


def test_no_compiler_means_torch_kernels(tmp_path, caplog):
    assert native_kernels.load_kernels(tmp_path, compiler="/nonexistent/cc") is None


@needs_avx2
def test_a_failing_build_means_torch_kernels(tmp_path, caplog):
    assert native_kernels.load_kernels(tmp_path, compiler=shutil.which("false")) is None
    assert "not used" in caplog.text


@needs_avx2
def test_the_built_library_is_reused(tmp_path):
    first = native_kernels._build_and_check(tmp_path, None)
    stamp = first.path.stat().st_mtime_ns
    second = native_kernels._build_and_check(tmp_path, None)
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no scratch left behind


# ----- through the loader ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native-models")
    return write_tiny_gguf(folder / "mixed-gemma3.gguf", "gemma3", hidden=256, ffn=512, heads=4, kv_heads=2,
                           weight_types="mixed")


def greedy(lm, n=12):
    ids = lm.encode("The quick brown fox")
    chunks = stream_generate(lm, ids, GenerationParams(max_tokens=n, temperature=0))
    return "".join(chunk.text for chunk in chunks)


@needs_avx2
def test_loader_native_and_torch_kernels_agree(tiny, model_cache):
    native = load_model(tiny, model_cache, LoadOptions(kernels="native"))
    torch_kernels = load_model(tiny, model_cache, LoadOptions(kernels="torch"))
    assert native.kernels == "native" and torch_kernels.kernels == "torch"
    assert native.model.lm_head.native is not None and torch_kernels.model.lm_head.native is None
    ids = native.encode("The quick brown fox jumps over the lazy dog.")
    with torch.inference_mode():  # one token at a time: the decode path
        from inference import kv

        logits = {}
        for name, lm in (("native", native), ("torch", torch_kernels)):
            cache, rows = kv.new_cache(lm.model), []
            for position, token in enumerate(ids):
                out = lm.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True,
                               position_ids=torch.tensor([[position]]))
                rows.append(out.logits[0, -1].float())
            logits[name] = torch.stack(rows)
    error = (logits["native"] - logits["torch"]).norm() / logits["torch"].norm()
    assert error < 0.03
    assert greedy(native)  # streams through the engine


def test_auto_follows_the_cpu(tiny, model_cache, monkeypatch):
    monkeypatch.setattr(native_kernels, "cpu_wants_native", lambda: False)
    assert load_model(tiny, model_cache).kernels == "torch"


@needs_avx2
def test_auto_uses_the_kernel_where_the_cpu_wants_it(tiny, model_cache, monkeypatch):
    monkeypatch.setattr(native_kernels, "cpu_wants_native", lambda: True)
    assert load_model(tiny, model_cache).kernels == "native"


def test_dense_weights_never_use_it(tiny, model_cache):
    assert load_model(tiny, model_cache, LoadOptions(weights="dense", kernels="native")).kernels == "torch"


def test_unknown_or_impossible_kernels_are_refused_clearly(tiny, model_cache, monkeypatch):
    with pytest.raises(LoadError, match="unknown kernels 'fast'"):
        load_model(tiny, model_cache, LoadOptions(kernels="fast"))
    monkeypatch.setattr(native_kernels, "cpu_has_avx2", lambda: False)
    with pytest.raises(LoadError, match="needs an x86 CPU with AVX2"):
        load_model(tiny, model_cache, LoadOptions(kernels="native"))


def test_command_line_and_environment_choose_the_kernels(monkeypatch, tmp_path):
    from inference.config import config_from_args
    from inference.service import ChatService

    assert config_from_args([]).kernels == "auto"
    assert config_from_args(["--cpu-kernels", "torch"]).kernels == "torch"
    monkeypatch.setenv("LLM_CPU_KERNELS", "native")
    config = config_from_args(["--data-dir", str(tmp_path)])
    assert config.kernels == "native"
    assert ChatService(config).manager.options.kernels == "native"
