"""The tiny GGUF files from gguf_factory load through transformers and behave like real ones."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

try:  # tests/ is on sys.path under pytest's default rootdir-relative import mode
    from gguf_factory import ARCHS, CHAT_TEMPLATES, vocab_info, write_tiny_gguf
except ImportError:  # tests/ made a package
    from tests.gguf_factory import ARCHS, CHAT_TEMPLATES, vocab_info, write_tiny_gguf

MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}
TEXTS = ["Hello world, the quick brown fox.", "héllo wörld ✓", "  two  spaces\nand a\ttab 42"]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request, tmp_path_factory):
    """(arch, path, tokenizer, model), loaded once per arch for the whole module."""
    arch = request.param
    path = write_tiny_gguf(tmp_path_factory.mktemp(arch) / "tiny.gguf", arch, chat_template=CHAT_TEMPLATES[arch])
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return arch, path, tok, model.eval()


def test_config(loaded):
    arch, _, tok, model = loaded
    info = vocab_info(arch)
    cfg = model.config
    assert cfg.model_type == MODEL_TYPES[arch]
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == info["vocab_size"] == model.get_input_embeddings().weight.shape[0]
    assert cfg.eos_token_id == info["eos_token_id"] == tok.eos_token_id
    assert cfg.bos_token_id == info["bos_token_id"] == tok.bos_token_id
    assert cfg.tie_word_embeddings == (arch == "gemma3")
    if arch != "llama":
        # llama: transformers' GPT2-style builder adds its default unk "<|endoftext|>" as an extra
        # token (id vocab_size) because a Llama 3 vocabulary has no unk; real Llama 3 GGUFs do the same.
        assert len(tok) == cfg.vocab_size


def test_tokenizer_round_trip(loaded):
    arch, _, tok, model = loaded
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert max(ids) < model.config.vocab_size
        assert (ids[0] == tok.bos_token_id) == vocab_info(arch)["add_bos"]
        assert tok.decode(ids, skip_special_tokens=True) == text
        plain = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(plain) == text
        assert len(plain) < len(text.encode())  # merges actually apply
    for special, token_id in vocab_info(arch)["special_tokens"].items():
        assert tok(special, add_special_tokens=False)["input_ids"] == [token_id]


def test_chat_template(loaded):
    arch, _, tok, _ = loaded
    assert tok.chat_template == CHAT_TEMPLATES[arch]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    specials = vocab_info(arch)["special_tokens"]
    turn = {"llama": "<|start_header_id|>", "qwen2": "<|im_start|>", "gemma3": "<start_of_turn>"}[arch]
    assert ids.count(specials[turn]) == 2


def test_generate(loaded):
    _, _, tok, model = loaded
    enc = tok("Hello world", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        logits = model(**enc).logits
    assert out.shape[1] == enc["input_ids"].shape[1] + 8
    assert int(out.max()) < model.config.vocab_size
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


def test_weights_follow_llama_cpp_conventions(loaded):
    """transformers undoes exactly what the file encodes: llama's q/k permutation, gemma's norm + 1."""
    arch, path, _, model = loaded
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def stored(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))

    def unpermute(w, n_head):  # inverse of llama.cpp's LlamaModel.permute
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    layer = model.model.layers[0]
    q, k = stored("blk.0.attn_q.weight"), stored("blk.0.attn_k.weight")
    if arch == "llama":
        q, k = unpermute(q, 4), unpermute(k, 2)
    torch.testing.assert_close(layer.self_attn.q_proj.weight, q)
    torch.testing.assert_close(layer.self_attn.k_proj.weight, k)
    torch.testing.assert_close(layer.mlp.down_proj.weight, stored("blk.0.ffn_down.weight"))
    shift = 1.0 if arch == "gemma3" else 0.0
    torch.testing.assert_close(model.model.norm.weight, stored("output_norm.weight") - shift)
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert ("output.weight" in tensors) == (arch != "gemma3")


def test_metadata(tmp_path):
    path = write_tiny_gguf(tmp_path, "gemma3", quantize=False, name="my-model", context_length=128)
    assert path == tmp_path / "tiny-gemma3.gguf"
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if k != "tokenizer.ggml.tokens"}
    assert fields["general.architecture"] == "gemma3"
    assert fields["general.name"] == "my-model"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert fields["gemma3.context_length"] == 128
    assert fields["gemma3.attention.key_length"] == fields["gemma3.attention.value_length"] == 16
    assert "gemma3.attention.sliding_window" in fields
    assert "tokenizer.chat_template" not in fields
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_deterministic(tmp_path):
    a = write_tiny_gguf(tmp_path / "a.gguf", "qwen2", seed=7).read_bytes()
    b = write_tiny_gguf(tmp_path / "b.gguf", "qwen2", seed=7).read_bytes()
    c = write_tiny_gguf(tmp_path / "c.gguf", "qwen2", seed=8).read_bytes()
    assert a == b
    assert a != c and len(a) == len(c)


def test_unknown_arch_raises(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        write_tiny_gguf(tmp_path / "x.gguf", "mistral")
    assert not list(tmp_path.iterdir())
