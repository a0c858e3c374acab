"""Small C kernels for quantized weights on AVX2 CPUs, built at run time and called through ctypes.

Where the CPU has no native bfloat16 (AVX2 only), torch's int8 and int4 weight kernels convert every
weight to float before multiplying and are compute-bound: the 262,144 x 640 output table of Gemma 3
dominates a decode step. `native/q8_matmul.c` quantizes the activations to int8 in blocks of 32
(as llama.cpp does for its own dot products) and multiplies bytes by bytes, which makes a decode
step read-bound (figures in bench/RESULTS.md).

The kernel is used only where it helps and works: an x86 CPU with AVX2 and FMA and no native
bfloat16, a C compiler on the PATH (`cc`, or `CC`), a build that succeeds and a self-check against
torch that agrees. Otherwise `load_kernels` returns None and torch's kernels serve (models/qlinear.py);
`LoadOptions(kernels="torch")` / `--cpu-kernels torch` choose them on every CPU. The library is built
once per source version into `build_dir` and reused by later starts.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE = Path(__file__).with_name("native")
SOURCES = (NATIVE / "q8_matmul.c", NATIVE / "layers.c")  # layers.c: a decode step's layer stack in one call
HEADERS = (NATIVE / "q8.h",)
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
BLOCK = 32  # activation values per scale; the kernel's BLOCK
BUILD_TIMEOUT_S = 120
_loaded: dict[str, "Q8Kernels | None"] = {}
_lock = threading.Lock()


class Q8Kernels:
    """The loaded library: `matmul(x, q, scale)` = x @ (q * scale[:, None]).T and `matmul4(x, nibbles,
    scales_zeros)` for 4-bit groups of 32, both with int8 activations."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        self._lib.q8_matmul.argtypes = [p, i64, i64, p, p, i64, p, p, p, ctypes.c_int]
        self._lib.q8_matmul.restype = None
        self._lib.q4_matmul.argtypes = [p, i64, i64, p, p, i64, p, p, p, p, ctypes.c_int]
        self._lib.q4_matmul.restype = None
        self._lib.rms_norm.argtypes = [p, p, p, i64, i64, ctypes.c_float]
        self._lib.rms_norm.restype = None
        self._lib.q4_dequantize.argtypes = [p, p, i64, i64, p, ctypes.c_int]
        self._lib.q4_dequantize.restype = None
        self._lib.decode_layers.argtypes = [p, p, i64, p, i64, p, i64, p, p]
        self._lib.decode_layers.restype = ctypes.c_int
        if self._lib.q8_block() != BLOCK:
            raise RuntimeError("the built kernel's block size differs from this module's")
        if self._lib.layers_abi() != LAYERS_ABI:
            raise RuntimeError("the built library's layer structures differ from this module's")

    @staticmethod
    def supports(in_features: int, *weights: torch.Tensor) -> bool:
        """Whether the kernels can read these weights: whole 32-value blocks, plain contiguous memory."""
        return in_features % BLOCK == 0 and all(w.is_contiguous() and w.device.type == "cpu" for w in weights)

    def matmul(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """x [m, k] float32 contiguous, q [n, k] int8 contiguous, scale [n] float32 -> [m, n] float32."""
        m, k = x.shape
        n = q.shape[0]
        xq = torch.empty(m, k, dtype=torch.int8)
        xscale = torch.empty(m, k // BLOCK, dtype=torch.float32)
        y = torch.empty(m, n, dtype=torch.float32)
        self._lib.q8_matmul(x.data_ptr(), m, k, q.data_ptr(), scale.data_ptr(), n, xq.data_ptr(),
                            xscale.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y

    def matmul4(self, x: torch.Tensor, nibbles: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
        """x [m, k] float32; nibbles [n, k/2] uint8 (`pack_nibbles`); scales_zeros [n, k/32, 2] float16
        with w = scale * (q - 8) + zero -> [m, n] float32."""
        m, k = x.shape
        n = nibbles.shape[0]
        xq = torch.empty(m, k, dtype=torch.int8)
        xscale = torch.empty(m, k // BLOCK, dtype=torch.float32)
        xsum = torch.empty(m, k // BLOCK, dtype=torch.float32)
        y = torch.empty(m, n, dtype=torch.float32)
        self._lib.q4_matmul(x.data_ptr(), m, k, nibbles.data_ptr(), scales_zeros.data_ptr(), n, xq.data_ptr(),
                            xscale.data_ptr(), xsum.data_ptr(), y.data_ptr(), torch.get_num_threads())
        return y


    def dequantize4(self, nibbles: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
        """The float32 [n, k] weights of `matmul4`'s (nibbles, scales_zeros)."""
        n, k = nibbles.shape[0], nibbles.shape[1] * 2
        out = torch.empty(n, k, dtype=torch.float32)
        self._lib.q4_dequantize(nibbles.data_ptr(), scales_zeros.data_ptr(), n, k, out.data_ptr(),
                                torch.get_num_threads())
        return out

    def decode_layers(self, config: "LayerConfig", layers, x: torch.Tensor, start: torch.Tensor, length: int,
                      cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Run `layers` (a ctypes array of `LayerSpec`) on x [rows, hidden] float32 in place: one new token
        per row at cache column `length`; start [rows] int64: each row's first real column; cos, sin
        [2, rows, head_dim] float32 (native/layers.c describes the layouts)."""
        status = self._lib.decode_layers(ctypes.addressof(config), ctypes.addressof(layers), len(layers), x.data_ptr(),
                                         x.shape[0], start.data_ptr(), length, cos.data_ptr(), sin.data_ptr())
        if status != 0:
            raise MemoryError("the native decode step could not allocate its scratch memory")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x / rms(x) * weight over the last dimension; x float32, weight float32 [dim]."""
        x = x.contiguous()
        y = torch.empty_like(x)
        dim = x.shape[-1]
        self._lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // dim, dim, eps)
        return y


class LinearSpec(ctypes.Structure):
    """native/layers.c's `Linear`: one quantized product's weights."""
    _fields_ = [("bits", ctypes.c_int32), ("unused", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class LayerSpec(ctypes.Structure):
    """native/layers.c's `Layer`: a layer's products, norms (0 = none), KV buffers and attention window."""
    _fields_ = [*((name, LinearSpec) for name in ("q", "k", "v", "o", "gate", "up", "down")),
                *((name, ctypes.c_void_p) for name in ("norm_in", "norm_attn_out", "norm_ff_in", "norm_ff_out",
                                                       "norm_q", "norm_k", "keys", "values")),
                ("capacity", ctypes.c_int64), ("window", ctypes.c_int64), ("rope", ctypes.c_int32),
                ("unused", ctypes.c_int32)]


class LayerConfig(ctypes.Structure):
    """native/layers.c's `Config`."""
    _fields_ = [*((name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "ffn")),
                ("act", ctypes.c_int32), ("threads", ctypes.c_int32), ("eps", ctypes.c_float),
                ("scaling", ctypes.c_float)]


LAYERS_ABI = ctypes.sizeof(LinearSpec) * 1000 + ctypes.sizeof(LayerSpec) * 10 + ctypes.sizeof(LayerConfig) % 10


def pack_nibbles(q):
    """uint8 values 0..15 [rows, cols] (numpy) -> the kernel's [rows, cols/2] bytes: in each group of
    32, byte j holds value j in its low nibble and value j + 16 in its high one."""
    rows, cols = q.shape
    groups = q.reshape(rows, cols // BLOCK, 2, BLOCK // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(rows, cols // 2)


def cpu_has_avx2() -> bool:
    """An x86 CPU with AVX2, FMA and F16C: what the kernel's instructions need."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= flags


def cpu_wants_native() -> bool:
    """AVX2 and FMA, and bfloat16 emulated: where torch's kernels are compute-bound and this one wins."""
    from .cpu_matmul import cpu_has_native_bf16

    return cpu_has_avx2() and not cpu_has_native_bf16()


def load_kernels(build_dir: Path, compiler: str | None = None) -> Q8Kernels | None:
    """The kernels built into `build_dir` (built now if missing), or None where they can't be had.

    Never raises: a missing compiler, a failed build or a failed self-check logs why and returns None.
    """
    key = f"{build_dir}|{compiler}"
    with _lock:
        if key not in _loaded:
            _loaded[key] = _build_and_check(Path(build_dir), compiler)
        return _loaded[key]


def _build_and_check(build_dir: Path, compiler: str | None) -> Q8Kernels | None:
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        log.info("no C compiler found: the AVX2 int8 kernel is not built; torch's kernels serve")
        return None
    try:
        kernels = Q8Kernels(_built_library(build_dir, compiler))
        _self_check(kernels)
    except Exception as error:  # any failure leaves torch's kernels in charge
        log.warning("the AVX2 int8 kernel is not used (%s); torch's kernels serve", error)
        return None
    log.info("AVX2 int8 kernel ready: %s", kernels.path)
    return kernels


def _built_library(build_dir: Path, compiler: str) -> Path:
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(source + " ".join(FLAGS).encode() + platform.machine().encode()).hexdigest()[:12]
    target = build_dir / f"q8_matmul-{digest}.so"
    if target.exists():
        return target
    build_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=build_dir) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *FLAGS, f"-I{NATIVE}", *map(str, SOURCES), "-o", str(built), "-lm"],
                                capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-300:]}")
        os.replace(built, target)  # atomic: another process sees the whole library or none
    return target


def _self_check(kernels: Q8Kernels) -> None:
    """The kernel against a float reference on random data: int8 activations cost ~1% at most."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4 * BLOCK, generator=generator)
    q = torch.randint(-127, 128, (40, 4 * BLOCK), generator=generator, dtype=torch.int8)
    scale = torch.rand(40, generator=generator) / 100
    expected = x @ (q.float() * scale[:, None]).t()
    error = (kernels.matmul(x, q, scale) - expected).norm() / expected.norm()
    q4 = torch.randint(0, 16, (40, 4 * BLOCK), generator=generator, dtype=torch.uint8)
    scales_zeros = (torch.rand(40, 4, 2, generator=generator) / 100).half()
    dense4 = (q4.float() - 8).reshape(40, 4, BLOCK) * scales_zeros[..., :1].float() + scales_zeros[..., 1:].float()
    expected4 = x @ dense4.reshape(40, -1).t()
    nibbles = torch.from_numpy(pack_nibbles(q4.numpy()))
    error4 = (kernels.matmul4(x, nibbles, scales_zeros) - expected4).norm() / expected4.norm()
    weight = torch.rand(4 * BLOCK, generator=generator)
    normed = kernels.rms_norm(x, weight, 1e-6)
    if not max(error, error4) < 0.02 or not torch.allclose(normed, torch.nn.functional.rms_norm(
            x, (x.shape[-1],), weight, 1e-6), rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"self-check failed (relative errors {float(error):.3g}, {float(error4):.3g})")
