"""Linear layers and embeddings whose weights stay quantized in memory, on torch's CPU kernels.

The one seam between a model (ours, models/cpu_model.py, or transformers') and the kernels:
`install_quantized` swaps each `nn.Linear` (and the token embedding) for the module below that
matches how its weight is stored, and leaves the model code alone.

- `Int4Linear`: `torch._weight_int4pack_mm_for_cpu`, groups of 32 with a scale and a zero each.
- `Int8Linear`: `torch._weight_int8pack_mm`, one scale per output row; on AVX2 CPUs the C kernel of
  models/native_kernels.py for decode steps and short prefills (int8 activations, faster there), as
  for `Int4Linear`'s 4-bit groups.
- `FusedRMSNorm`: the architectures' RMS norms as one fused op (`F.rms_norm`) instead of six; a
  decode step runs ~110 of them (Gemma 3 270M), so their per-op overhead adds up.
- `Int8Embedding`: looks rows up in the int8 table and scales them; it shares its table with the
  output projection when the model ties the two (Gemma), so the largest matrix is held once.

The kernels take bfloat16 inputs and scales on every CPU: on an AVX2-only CPU they are several
times slower with float32 inputs (bench/RESULTS.md). The rest of the model (norms, attention, the
residual stream) runs in `compute_dtype`: bfloat16 where the CPU multiplies it natively
(AVX512-BF16, AMX), float32 elsewhere, where bfloat16 arithmetic is emulated and slower.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cpu_matmul import cpu_has_native_bf16
from .cpu_model import RMSNorm

GROUP = 32
PACK_ROWS = 64  # rows torch's CPU int4 layout interleaves together
KERNEL_DTYPE = torch.bfloat16  # what the int4/int8 kernels read: inputs, scales, outputs
# int8 weights without the AVX2 kernel multiply inputs of this many rows or more (a prompt's prefill)
# dequantized, in the activations' dtype: faster than torch's int8 kernel there (with the AVX2 kernel,
# `NATIVE_ROWS_INT8` below decides instead). Only for weights of at most
# WIDE_MAX_WEIGHTS values: the transient dense copy of a 262k-token output table would be 670 MB.
WIDE_ROWS = 32
WIDE_MAX_WEIGHTS = 1 << 24
# int4 weights with the AVX2 kernel's copy multiply inputs of this many rows or more dequantized to
# float32 (one C pass, ~1 ms for 1.3M weights) and then as one float product: 1.3-2x faster than
# torch's int4 kernel on an AVX2 CPU from 128 rows on (bench/RESULTS.md); below it, the kernel.
WIDE_ROWS_INT4 = 128
# int8 weights with the AVX2 kernel: the kernel serves inputs of fewer rows than this (a batch's
# prefill of short prompts, a chunk of a long one), the dequantized float product wider ones
# (bench/RESULTS.md: the kernel 1.2-1.7x faster at 192 rows, 0.85-0.93x at 512). A matrix too large
# to dequantize (`WIDE_MAX_WEIGHTS`: a large vocabulary's output projection for a whole prompt's logits,
# the MLPs of int8 models of 4B parameters or more) stays on the kernel at any width, where torch's int8
# kernel served before: 1.7-2.4x faster at 256-512 rows (bench/RESULTS.md, 2026-12-02 morning).
NATIVE_ROWS_INT8 = 256


def compute_dtype() -> torch.dtype:
    """The activation dtype of quantized models on this CPU."""
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.lru_cache(maxsize=1)
def int4_layout_tag() -> str:
    """A short fingerprint of torch's packed int4 layout on this machine.

    The packed layout is torch's own and may differ between CPU kinds or torch versions; the
    conversion cache stores packed weights, so its folder name carries this tag.
    """
    import hashlib

    probe = (torch.arange(64 * 64, dtype=torch.int32).reshape(64, 64) * 7) % 16
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    return hashlib.sha256(packed.numpy().tobytes()).hexdigest()[:8]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [out, in] -> torch's packed int4 layout for the CPU kernel.

    torch's own packing is a scalar loop (~9 ms for 384 x 640 values here; the shortlist head's coarse
    table of the bundled model has 168M values). Where its layout is the one `_pack_blocks`
    writes (checked once against torch on random values), whole 64-row blocks are packed in numpy,
    ~40x faster, and only the rows after the last whole block by torch."""
    whole = q.shape[0] // PACK_ROWS * PACK_ROWS if _numpy_packing_matches() else 0
    if whole == 0:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    head = torch.from_numpy(_pack_blocks(q[:whole].to(torch.uint8).numpy()))
    if whole == q.shape[0]:
        return head
    return torch.cat([head, torch._convert_weight_to_int4pack_for_cpu(q[whole:].to(torch.int32), 1)])


def _pack_blocks(q: np.ndarray) -> np.ndarray:
    """torch's CPU int4 layout, for rows in whole blocks of 64: each block's two halves of 32 rows are
    stored one after the other, and within a half, for each input column, 16 bytes hold rows j (low
    nibble) and j + 16 (high nibble)."""
    rows, cols = q.shape
    blocks = q.reshape(rows // PACK_ROWS, 2, 2, 16, cols)  # block, half, low/high, j, column
    packed = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    return np.ascontiguousarray(packed.transpose(0, 1, 3, 2)).reshape(rows, cols // 2)


@functools.lru_cache(maxsize=1)
def _numpy_packing_matches() -> bool:
    """Whether `_pack_blocks` writes torch's layout on this machine (checked once, on random values)."""
    probe = torch.randint(0, 16, (2 * PACK_ROWS, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    expected = torch._convert_weight_to_int4pack_for_cpu(probe, 1).numpy()
    return expected.shape == (2 * PACK_ROWS, 32) and np.array_equal(_pack_blocks(probe.numpy().astype(np.uint8)),
                                                                     expected)


def int4_scales_zeros(scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """[out, in/32] scales and mins of `w = scale * q - min` -> the kernel's [in/32, out, 2].

    The kernel computes `(q - 8) * scale + zero`, so zero = 8 * scale - min.
    """
    zero = 8 * scale - low
    return torch.stack([scale.t(), zero.t()], dim=-1).contiguous()


def _flat(x: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    x = x.reshape(-1, features)
    if x.dtype != dtype:
        x = x.to(dtype)
    return x.contiguous()


def _finish(y: torch.Tensor, x: torch.Tensor, features: int, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.reshape(*x.shape[:-1], features).to(x.dtype)
    return y if bias is None else y + bias


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W in torch's packed int4 layout, group size 32.

    `native`: the AVX2 kernel (models/native_kernels.py) with the same values as `nibbles` and
    float16 `native_scales`, used for inputs of fewer than `WIDE_ROWS_INT4` rows.
    """

    def __init__(self, in_features: int, out_features: int, packed: torch.Tensor, scales_zeros: torch.Tensor,
                 bias: torch.Tensor | None = None, native=None, nibbles: torch.Tensor | None = None,
                 native_scales: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", bias)
        usable = native is not None and nibbles is not None and native.supports(in_features, nibbles)
        self.native = native if usable else None
        if self.native is not None:
            self.register_buffer("nibbles", nibbles)
            self.register_buffer("native_scales", native_scales.to(torch.float16).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.native is not None and rows < WIDE_ROWS_INT4:
            y = self.native.matmul4(_flat(x, self.in_features, torch.float32), self.nibbles, self.native_scales)
            return _finish(y, x, self.out_features, self.bias)
        if (self.native is not None and x.dtype == torch.float32
                and self.out_features * self.in_features <= WIDE_MAX_WEIGHTS):  # WIDE_ROWS_INT4 rows or more
            return F.linear(x, self.native.dequantize4(self.nibbles, self.native_scales), self.bias)
        flat = _flat(x, self.in_features, self.scales_zeros.dtype)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_zeros)
        return _finish(y, x, self.out_features, self.bias)

    def extra_repr(self) -> str:
        kernel = ", AVX2 kernel" if self.native is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g{GROUP}{kernel}"


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W int8 and one scale per output row.

    `native`: the AVX2 kernel (models/native_kernels.py), used for inputs of fewer than
    `NATIVE_ROWS_INT8` rows, and of any width where the weights are too many to dequantize
    (`WIDE_MAX_WEIGHTS`); it quantizes the activations to int8 in blocks of 32, so its results differ
    from the bfloat16-input kernel's by rounding (the quality gate in tests/test_models_bundled.py bounds it).
    """

    def __init__(self, in_features: int, out_features: int, q: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, native=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.native = native if native is not None and native.supports(in_features, q) else None
        if self.native is not None:
            self.register_buffer("scale32", scale.float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.native is not None and (rows < NATIVE_ROWS_INT8 or self.q.numel() > WIDE_MAX_WEIGHTS):
            y = self.native.matmul(_flat(x, self.in_features, torch.float32), self.q, self.scale32)
            return _finish(y, x, self.out_features, self.bias)
        if rows >= WIDE_ROWS and self.q.numel() <= WIDE_MAX_WEIGHTS and x.dtype.is_floating_point:
            weight = self.q.to(x.dtype) * self.scale.to(x.dtype).unsqueeze(1)
            return torch.nn.functional.linear(x, weight, self.bias)
        flat = _flat(x, self.in_features, self.scale.dtype)
        y = torch._weight_int8pack_mm(flat, self.q, self.scale)
        return _finish(y, x, self.out_features, self.bias)

    def extra_repr(self) -> str:
        kernel = ", AVX2 kernel" if self.native is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row{kernel}"


class ShortlistHead(nn.Module):
    """An output projection over a large vocabulary: every logit from a coarse int4 copy of the table,
    then the `shortlist` best of each row recomputed from the exact int8 table.

    Where the CPU has no native bfloat16 and torch's kernels serve, the int4 kernel reads Gemma's
    262,144 x 640 table about twice as fast as the int8 one; the best tokens, which are all that greedy
    decoding, top-k/top-p sampling and the returned log-probabilities look at, get their exact int8
    logits. Tokens outside the shortlist keep their coarse logits (they share the exact path's ranking
    only approximately). The AVX2 kernel reads the int8 table faster still and needs no shortlist.
    """

    def __init__(self, coarse: Int4Linear, q: torch.Tensor, scale: torch.Tensor, shortlist: int = 256):
        super().__init__()
        self.coarse, self.shortlist = coarse, shortlist
        self.in_features, self.out_features = coarse.in_features, coarse.out_features
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.coarse(x)
        flat, rows = _flat(x, self.in_features, self.scale.dtype), logits.reshape(-1, self.out_features)
        best = rows.topk(min(self.shortlist, self.out_features), dim=-1).indices
        for row in range(rows.shape[0]):
            picked = best[row]
            exact = torch._weight_int8pack_mm(flat[row:row + 1], self.q[picked], self.scale[picked])
            rows[row].index_copy_(0, picked, exact[0].to(rows.dtype))
        return logits

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shortlist={self.shortlist}"


class Int8Embedding(nn.Module):
    """Token embedding from an int8 table with one scale per row (times `embed_scale`, as Gemma's)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, embed_scale: float | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.q[input_ids].to(self.dtype) * self.scale[input_ids].unsqueeze(-1).to(self.dtype)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


class FusedRMSNorm(nn.Module):
    """x / rms(x) * weight in one op, computed in float32 (as the models' own norms do).

    `weight` is the effective scale: Gemma's `1 + w` is folded in once here. `native`: the AVX2
    library's one-thread loop (models/native_kernels.py) for float32 inputs; on the small inputs of a
    decode step, torch's op costs far more in overhead than in arithmetic.
    """

    def __init__(self, weight: torch.Tensor, eps: float, native=None):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())
        self.eps, self.shape, self.native = eps, (weight.shape[-1],), native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            if self.native is not None:
                return self.native.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.rms_norm(x.float(), self.shape, self.weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.shape[0]}, eps={self.eps}"


def _rms_norm_kinds() -> dict[type, tuple[str, float]]:
    """The RMS norm classes of transformers' supported architectures: (eps attribute, offset added to weight)."""
    from .convert import MODEL_BUILD_LOCK

    with MODEL_BUILD_LOCK:  # model code imported one thread at a time, as transformers' builds are
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return {Gemma3RMSNorm: ("eps", 1.0), LlamaRMSNorm: ("variance_epsilon", 0.0),
            Qwen2RMSNorm: ("variance_epsilon", 0.0)}


def _norm_kind(module: nn.Module, kinds: dict) -> tuple[float, float] | None:
    """(eps, offset added to the weight) of an RMS norm we can fuse, else None. Our own models' norms
    (models/cpu_model.py) say it themselves; transformers' are looked up (importing its model code
    only for its models)."""
    if isinstance(module, RMSNorm):
        return module.eps, module.offset
    if not type(module).__module__.startswith("transformers."):
        return None
    if not kinds:
        kinds.update(_rms_norm_kinds())
    kind = kinds.get(type(module))
    return None if kind is None else (float(getattr(module, kind[0])), kind[1])


def fuse_norms(model: nn.Module, native=None) -> int:
    """Swap the model's RMS norms for `FusedRMSNorm` (on `native`'s loop where given); return how many."""
    kinds: dict = {}
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            kind = _norm_kind(child, kinds)
            if kind is not None:
                eps, offset = kind
                weight = child.weight.detach().float() + offset
                setattr(module, name, FusedRMSNorm(weight, eps, native))
                count += 1
    return count


def install_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                      shortlist: bool = False, native=None) -> None:
    """Fill a model built on the meta device from a quantized checkpoint's `tensors`.

    Each `nn.Linear` whose weight is stored as int4 or int8 becomes an `Int4Linear` /
    `Int8Linear`, the token embedding an `Int8Embedding`, a tied output projection shares the
    embedding's table, and every other parameter is set from its float32 tensor in `dtype`.
    `shortlist`: an int8 output projection with a coarse copy becomes a `ShortlistHead`.
    `native`: the AVX2 kernels (models/native_kernels.py) the int4 and int8 layers use for decode steps.
    Raises `ValueError` if anything the model needs is missing from `tensors`.
    """
    def small(name: str, to: torch.dtype = dtype) -> torch.Tensor:  # scales, vectors: converted (copied)
        return tensors[name].to(to).contiguous()

    embedding = None
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{module_name}.{child_name}" if module_name else child_name
            weight = full + ".weight"
            bias = small(full + ".bias") if full + ".bias" in tensors else None
            if isinstance(child, nn.Linear) and weight + ".packed" in tensors:
                scales_zeros = tensors[weight + ".scales_zeros"]
                new = Int4Linear(child.in_features, child.out_features, tensors[weight + ".packed"],
                                 scales_zeros.transpose(0, 1).to(KERNEL_DTYPE).contiguous(), bias, native,
                                 tensors.get(weight + ".nibbles"), scales_zeros)
            elif isinstance(child, nn.Linear) and weight + ".q" in tensors:
                new = Int8Linear(child.in_features, child.out_features, tensors[weight + ".q"],
                                 small(weight + ".scale", KERNEL_DTYPE), bias, native)
            elif isinstance(child, nn.Embedding) and weight + ".q" in tensors:
                scale = getattr(child, "embed_scale", None)
                new = embedding = Int8Embedding(tensors[weight + ".q"], small(weight + ".scale", KERNEL_DTYPE),
                                                None if scale is None else float(scale), dtype)
            else:
                continue
            setattr(module, child_name, new)
    _tie_output(model, tensors, embedding, native)
    if shortlist:
        _use_shortlist(model, tensors)
    for name, param in list(model.named_parameters()):
        if name not in tensors:
            raise ValueError(f"the quantized checkpoint lacks {name}")
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(small(name), requires_grad=False))
    left = [name for name, buffer in model.named_buffers() if buffer is not None and buffer.is_meta]
    if left:
        raise ValueError(f"the quantized checkpoint left {left[0]} unset")
    fuse_norms(model, native)


def _use_shortlist(model: nn.Module, tensors: dict) -> None:
    """Swap an int8 output projection for a `ShortlistHead` where the checkpoint has its coarse copy."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, Int8Linear) or head.bias is not None:
        return
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        table = tensors.get(name + ".q")
        if name + ".coarse.packed" in tensors and table is not None and table.data_ptr() == head.q.data_ptr():
            scales_zeros = tensors[name + ".coarse.scales_zeros"].transpose(0, 1).to(KERNEL_DTYPE).contiguous()
            coarse = Int4Linear(head.in_features, head.out_features, tensors[name + ".coarse.packed"], scales_zeros)
            model.lm_head = ShortlistHead(coarse, head.q, head.scale)
            return


def _tie_output(model: nn.Module, tensors: dict, embedding: Int8Embedding | None, native=None) -> None:
    """A model without its own output weights projects with the embedding table (Gemma, tied llama)."""
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or "lm_head.weight.q" in tensors or "lm_head.weight.packed" in tensors:
        return
    if embedding is None:
        raise ValueError("the quantized checkpoint has neither an output projection nor an embedding table")
    model.lm_head = Int8Linear(head.in_features, head.out_features, embedding.q, embedding.scale, native=native)
