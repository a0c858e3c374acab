"""Tiny random-weight GGUF model files for tests.

    from gguf_factory import write_tiny_gguf  # tests/ is on sys.path under pytest
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "qwen2")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

The files follow llama.cpp's `convert_hf_to_gguf.py` conventions (metadata keys, tensor names, the
q/k row permutation of llama, the +1 offset of Gemma's RMSNorm weights), so transformers' GGUF
loader undoes them the same way it does for a real checkpoint. The model is random noise: it
generates gibberish, but deterministically for a given seed, and the whole file is a few hundred KB.

Tokenizers (a few hundred tokens, enough to encode any text):

* llama / qwen2: byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the 256 byte tokens in GPT-2's
  byte alphabet, then merges learned from a small built-in English text (so "Ġ t", "h e",
  "Ġt he", ...), then the family's special tokens as CONTROL.
* gemma3: sentencepiece-style BPE (`tokenizer.ggml.model = "llama"`): <pad> <eos> <bos> <unk> <mask>
  at ids 0..4 as in Gemma, <start_of_turn>/<end_of_turn> as CONTROL, the 256 byte-fallback tokens
  <0x00>..<0xFF>, then the printable ASCII characters and "▁"-prefixed pieces with scores.

`vocab_info(arch)` gives the special token ids without writing a file.
"""

from __future__ import annotations

import os
import pathlib
import re
import tempfile
from collections import Counter
from functools import lru_cache

import numpy as np

import gguf
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType


ARCHS = ("llama", "qwen2", "gemma3")

# Small English text the merges / pieces are learned from. Plain ASCII only.
_CORPUS = """
The quick brown fox jumps over the lazy dog. The cat sat on the mat and the dog sat on the log.
In the beginning there was the word, and the word was with the model. This is a test of the
tokenizer: it should split text into tokens and join them back into the same text. Hello world!
Hello there, how are you? I am fine, thank you. What is the weather like today? It is sunny
and warm, with a light wind from the west. Please answer the question in one short sentence.
You are a helpful assistant. The user asks a question and the assistant answers it with care.
Here are the things that they want to know: where, when, what, which, who, why and how.
Numbers like 1, 2, 3, 10, 42 and 100 are written with digits. The end of the story is near.
"""

_N_MERGES = 128

_LLAMA_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
_QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5-Coder's fill-in-the-middle and repository tokens (pass as `extra_specials=FIM_SPECIALS`)
FIM_SPECIALS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
_GEMMA_HEAD = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")

# Minimal chat templates in each family's format, for callers that want one in the file
# (pass as `chat_template=CHAT_TEMPLATES[arch]`; nothing is written unless asked).
CHAT_TEMPLATES = {
    "llama": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "qwen2": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>"
        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
}


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (same order as OpenAI's / transformers')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            symbols = splits[word]
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        joined = best[0] + best[1]
        for word, symbols in splits.items():
            i, out = 0, []
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            splits[word] = out
    return merges


def _corpus_words(space: str) -> Counter:
    """The corpus pre-split GPT-2 style (a word keeps its leading space), space spelled `space`."""
    pieces = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+", " ".join(_CORPUS.split()))
    return Counter(p.replace(" ", space) for p in pieces)


@lru_cache(maxsize=None)
def _byte_level_vocab(arch: str) -> dict:
    byte_chars = list(_bytes_to_unicode().values())
    merges = _learn_merges(_corpus_words("Ġ"), _N_MERGES)
    tokens = byte_chars + [a + b for a, b in merges]
    assert len(set(tokens)) == len(tokens)
    token_types = [TokenType.NORMAL] * len(tokens)
    specials = _LLAMA_SPECIALS if arch == "llama" else _QWEN2_SPECIALS
    first = len(tokens)
    tokens += specials
    token_types += [TokenType.CONTROL] * len(specials)
    ids = {t: first + i for i, t in enumerate(specials)}
    if arch == "llama":  # Llama 3.x Instruct, as llama.cpp writes it
        special_ids = dict(
            bos=ids["<|begin_of_text|>"], eos=ids["<|eot_id|>"], pad=ids["<|end_of_text|>"], unk=None
        )
        add_bos, pre = True, "llama-bpe"
    else:  # Qwen2 / Qwen2.5 Instruct
        special_ids = dict(bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"], pad=ids["<|endoftext|>"], unk=None)
        add_bos, pre = False, "qwen2"
    return dict(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        scores=None,
        merges=[f"{a} {b}" for a, b in merges],
        add_bos=add_bos,
        special_tokens={t: ids[t] for t in specials},
        **special_ids,
    )


@lru_cache(maxsize=None)
def _sentencepiece_vocab() -> dict:
    tokens, types, scores = [], [], []
    for t in _GEMMA_HEAD:
        tokens.append(t)
        types.append(TokenType.CONTROL)
        scores.append(-1000.0)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(TokenType.BYTE)
        scores.append(0.0)
    merges = _learn_merges(_corpus_words("▁"), _N_MERGES)
    chars = ["▁"] + [chr(c) for c in range(0x21, 0x7F)]
    pieces = chars + [a + b for a, b in merges]
    assert len(set(pieces)) == len(pieces)
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(TokenType.NORMAL)
        scores.append(-float(rank))
    ids = {t: i for i, t in enumerate(_GEMMA_HEAD)}
    return dict(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=scores,
        merges=None,
        add_bos=True,
        special_tokens=dict(ids),
        bos=ids["<bos>"],
        eos=ids["<eos>"],
        pad=ids["<pad>"],
        unk=ids["<unk>"],
    )


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {ARCHS}")


def vocab_info(arch: str = "llama") -> dict:
    """Tokenizer facts for `arch`: vocab_size, bos/eos/pad/unk ids (None if absent),
    add_bos, and `special_tokens` (name -> id)."""
    _check_arch(arch)
    v = _sentencepiece_vocab() if arch == "gemma3" else _byte_level_vocab(arch)
    return dict(
        vocab_size=len(v["tokens"]),
        bos_token_id=v["bos"],
        eos_token_id=v["eos"],
        pad_token_id=v["pad"],
        unk_token_id=v["unk"],
        add_bos=v["add_bos"],
        special_tokens=dict(v["special_tokens"]),
    )


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` for q/k rows (HF rotate-half -> interleaved rope layout)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# A Q4_K_M-like mix by GGUF tensor role (`weight_types="mixed"`): what llama.cpp's Q4_K_M puts where.
MIXED_TYPES = {
    "token_embd": "Q8_0", "output": "Q4_0", "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K",
    "attn_output": "Q5_0", "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K",
}
# Types gguf-py can quantize; the K-quants are written as random valid blocks (random weights anyway).
_NUMPY_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, cols: int) -> np.ndarray:
    """Random valid Q4_K / Q6_K blocks for a [rows, cols] matrix (weights of magnitude ~0.02)."""
    qtype = GGMLQuantizationType[type_name]
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, block_bytes), dtype=np.uint8)
    if type_name == "Q4_K":  # d, dmin (half floats) first: w = d * sc * q - dmin * m
        raw[:, 0:2] = np.full(n, 0.04 / (63 * 15), np.float16).view(np.uint8).reshape(n, 2)
        raw[:, 2:4] = np.full(n, 0.02 / 63 / 63, np.float16).view(np.uint8).reshape(n, 2)
    elif type_name == "Q6_K":  # d (half float) last: w = d * scale * (q - 32)
        raw[:, -2:] = np.full(n, 0.02 / (32 * 64), np.float16).view(np.uint8).reshape(n, 2)
    else:
        raise ValueError(f"no random-block writer for {type_name}")
    return raw.reshape(rows, cols // block * block_bytes)


class _Tensors:
    def __init__(self, writer: GGUFWriter, quantize: bool, types: dict | None = None,
                 rng: np.random.Generator | None = None):
        self.writer, self.quantize, self.types, self.rng = writer, quantize, types or {}, rng

    def _type_for(self, name: str, cols: int) -> str | None:
        role = name.split(".")[-2]
        wanted = self.types.get(role)
        if wanted is None:
            return None
        block = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[wanted]][0]
        return wanted if cols % block == 0 else "Q8_0" if cols % 32 == 0 else None

    def matrix(self, name: str, w: np.ndarray, *, f16: bool = False) -> None:
        w = np.ascontiguousarray(w, dtype=np.float32)
        wanted = self._type_for(name, w.shape[-1])
        if wanted in _NUMPY_QUANTS:
            qtype = GGMLQuantizationType[wanted]
            self.writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        elif wanted is not None:
            raw = random_blocks(self.rng, wanted, *w.shape)
            self.writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType[wanted])
        elif not self.quantize:
            self.writer.add_tensor(name, w)
        elif not f16 and w.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(w, GGMLQuantizationType.Q8_0)
            self.writer.add_tensor(name, q, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            self.writer.add_tensor(name, w.astype(np.float16))

    def vector(self, name: str, v: np.ndarray) -> None:
        self.writer.add_tensor(name, np.ascontiguousarray(v, dtype=np.float32))


def _with_specials(voc: dict, specials: tuple[str, ...]) -> dict:
    """The vocabulary with `specials` appended as CONTROL tokens."""
    if not specials:
        return voc
    voc = dict(voc)
    first = len(voc["tokens"])
    voc["tokens"] = [*voc["tokens"], *specials]
    voc["token_types"] = [*voc["token_types"], *([int(TokenType.CONTROL)] * len(specials))]
    if voc["scores"] is not None:
        voc["scores"] = [*voc["scores"], *([-1000.0] * len(specials))]
    voc["special_tokens"] = {**voc["special_tokens"], **{t: first + i for i, t in enumerate(specials)}}
    return voc


def _padded(voc: dict, multiple: int) -> dict:
    """The vocabulary with `<unused_N>` tokens appended up to a multiple of `multiple`."""
    extra = -len(voc["tokens"]) % multiple
    if not extra:
        return voc
    voc = dict(voc)
    voc["tokens"] = [*voc["tokens"], *(f"<unused_{i}>" for i in range(extra))]
    voc["token_types"] = [*voc["token_types"], *([TokenType.UNUSED] * extra)]
    if voc["scores"] is not None:
        voc["scores"] = [*voc["scores"], *([-1000.0] * extra)]
    return voc


# A tiny model with a 32-token sliding window (gemma3: half the context) and mixed weight types: short
# tests cross the window and use every quantized layout.
WINDOWED = dict(hidden=128, ffn=256, heads=4, kv_heads=2, context_length=64, weight_types="mixed")


def write_tiny_gguf(
    path,
    arch: str = "llama",
    *,
    seed: int = 0,
    context_length: int = 256,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    quantize: bool = True,
    weight_types: str | dict | None = None,
    vocab_multiple: int = 1,
    chat_template: str | None = None,
    name: str | None = None,
    extra_specials: tuple[str, ...] = (),
    token_metadata: dict[str, str] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> pathlib.Path:
    """Write a tiny random-weight GGUF of `arch` ("llama", "qwen2" or "gemma3") and return its path.

    `path` is the file to write, or an existing directory (the file is then `tiny-{arch}.gguf`).
    Same arguments -> byte-identical file. With `quantize`, 2-D weights whose rows are a multiple
    of 32 are Q8_0, token_embd / output (and any other matrix) are F16, norms and biases F32;
    without it everything is F32. `weight_types` overrides the type per tensor role (`attn_q`,
    `ffn_down`, `token_embd`, ...; "mixed" = `MIXED_TYPES`): Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 quantize the
    random weights, Q4_K/Q6_K are random valid blocks; a role whose rows do not fit the type's block
    falls back to Q8_0. `vocab_multiple`: pad the vocabulary with unused tokens to a multiple of this.
    `extra_specials`: more CONTROL tokens after the family's own (e.g. `FIM_SPECIALS`);
    `token_metadata`: GGUF keys whose value is a token's id, by the token's text (e.g.
    `{"tokenizer.ggml.fim_pre_token_id": "<PRE>", ...}`, as llama.cpp writes them). `rope_freqs`
    (llama): one divisor per rotary frequency, stored as Llama 3.1's converter stores its rope scaling.
    """
    _check_arch(arch)
    if hidden % heads or heads % kv_heads or (hidden // heads) % 2:
        raise ValueError("need hidden % heads == 0, heads % kv_heads == 0 and an even head dim")
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / f"tiny-{arch}.gguf"
    head_dim = hidden // heads
    voc = _sentencepiece_vocab() if arch == "gemma3" else _byte_level_vocab(arch)
    voc = _padded(_with_specials(voc, extra_specials), vocab_multiple)
    n_vocab = len(voc["tokens"])
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm(n):  # stored value; ~1 for every arch (gemma's is 1 + w, which transformers undoes)
        return 1.0 + rand(n)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = GGUFWriter(tmp, arch)
    try:
        # ---- general / hyperparameters, in llama.cpp's key names
        writer.add_name(name or f"tiny-{arch}")
        writer.add_context_length(context_length)
        writer.add_embedding_length(hidden)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        if arch == "llama":
            writer.add_vocab_size(n_vocab)
            writer.add_rope_dimension_count(head_dim)
            writer.add_rope_freq_base(500000.0)
            writer.add_layer_norm_rms_eps(1e-5)
        elif arch == "qwen2":
            writer.add_rope_freq_base(1000000.0)
            writer.add_layer_norm_rms_eps(1e-6)
        else:
            writer.add_layer_norm_rms_eps(1e-6)
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
            writer.add_rope_freq_base(1000000.0)
            writer.add_sliding_window(max(1, context_length // 2))
        writer.add_file_type(LlamaFileType.MOSTLY_Q8_0 if quantize else LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # ---- tokenizer
        writer.add_tokenizer_model(voc["model"])
        writer.add_tokenizer_pre(voc["pre"])
        writer.add_token_list(voc["tokens"])
        if voc["scores"] is not None:
            writer.add_token_scores(voc["scores"])
        writer.add_token_types(voc["token_types"])
        if voc["merges"] is not None:
            writer.add_token_merges(voc["merges"])
        writer.add_bos_token_id(voc["bos"])
        writer.add_eos_token_id(voc["eos"])
        if voc["unk"] is not None:
            writer.add_unk_token_id(voc["unk"])
        writer.add_pad_token_id(voc["pad"])
        writer.add_add_bos_token(voc["add_bos"])
        writer.add_add_eos_token(False)
        if arch == "gemma3":
            writer.add_add_space_prefix(False)
        if chat_template is not None:
            writer.add_chat_template(chat_template)
        for key, token in (token_metadata or {}).items():
            writer.add_uint32(key, voc["tokens"].index(token))

        # ---- tensors (generated in HF layout, then converted the way llama.cpp does)
        types = MIXED_TYPES if weight_types == "mixed" else weight_types
        t = _Tensors(writer, quantize, types, np.random.default_rng(seed + 1))
        if rope_freqs is not None:
            t.vector("rope_freqs.weight", rope_freqs)
        t.matrix("token_embd.weight", rand(n_vocab, hidden), f16=True)
        for i in range(layers):
            b = f"blk.{i}"
            q = rand(heads * head_dim, hidden)
            k = rand(kv_heads * head_dim, hidden)
            if arch == "llama":
                q, k = _llama_permute(q, heads), _llama_permute(k, kv_heads)
            t.matrix(f"{b}.attn_q.weight", q)
            t.matrix(f"{b}.attn_k.weight", k)
            t.matrix(f"{b}.attn_v.weight", rand(kv_heads * head_dim, hidden))
            t.matrix(f"{b}.attn_output.weight", rand(hidden, heads * head_dim))
            if arch == "qwen2":
                t.vector(f"{b}.attn_q.bias", rand(heads * head_dim))
                t.vector(f"{b}.attn_k.bias", rand(kv_heads * head_dim))
                t.vector(f"{b}.attn_v.bias", rand(kv_heads * head_dim))
            t.matrix(f"{b}.ffn_gate.weight", rand(ffn, hidden))
            t.matrix(f"{b}.ffn_up.weight", rand(ffn, hidden))
            t.matrix(f"{b}.ffn_down.weight", rand(hidden, ffn))
            t.vector(f"{b}.attn_norm.weight", norm(hidden))
            t.vector(f"{b}.ffn_norm.weight", norm(hidden))
            if arch == "gemma3":
                t.vector(f"{b}.attn_q_norm.weight", norm(head_dim))
                t.vector(f"{b}.attn_k_norm.weight", norm(head_dim))
                t.vector(f"{b}.post_attention_norm.weight", norm(hidden))
                t.vector(f"{b}.post_ffw_norm.weight", norm(hidden))
        t.vector("output_norm.weight", norm(hidden))
        if arch != "gemma3":  # gemma ties the output projection to token_embd
            t.matrix("output.weight", rand(n_vocab, hidden), f16=True)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
