"""Gemma's tokenizer as a SentencePiece model of the GGUF's vocabulary (models/spm_tokenizer.py): the same
ids, text, pieces and special tokens as transformers' `tokenizers` build of the same file."""

from __future__ import annotations

import dataclasses
import random
import shutil
from pathlib import Path

import pytest
import torch

from models import gguf_file
from models.convert import build_tokenizer, save_tokenizer
from models.gguf_file import read_header
from models.loader import LoadOptions, checkpoint_dir, load_model, load_tokenizer, token_lookup
from models.spm_tokenizer import MODEL_FILE, AddedTokens, SentencePieceTokenizer, applies_to, build_model
from tokenizer_reference import transformers_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<unk>", "<pad>", "<mask>", "\n\n", "\n", "\t\t",
            "<unused99999>", "<unused12", "<unused0>",
            "<b>", "</b>", "<unused3>", "[multimodal]", "<0x41>", "\u2581", "   ", "  "]


def sample_texts(count: int, seed: int = 0) -> list[str]:
    """Prose, code, whitespace runs, scripts outside the vocabulary, emoji, and the added tokens' spellings
    mixed into text (matched whole, leftmost-longest)."""
    rng = random.Random(seed)
    texts = [(ROOT / "tests" / "quality_text.txt").read_text(), (ROOT / "models" / "spm_tokenizer.py").read_text(),
             "", " ", "  leading", "trailing  ", "a\u00a0b\u200bc\r\n\x00", "<start_of_turn>user\nhi<end_of_turn>\n",
             "<start_of_turn", "<unused", "\U0001F600\U0001F469\u200d\U0001F4BB", "\u4e2d\u6587 \u0639\u0631\u0628\u064a"]
    alphabet = [*"abc xyz\n\t.,;:!?'\"<>/_-=()[]{}", "\u00e9", "\u4e2d", "\U0001F600", "\u2581", "\ufffd",
                *(chr(rng.randrange(0x80, 0x2FFFF)) for _ in range(60))]
    alphabet = [c for c in alphabet if not 0xD800 <= ord(c[0]) < 0xE000]
    for _ in range(count):
        texts.append("".join(rng.choice(alphabet) if rng.random() < 0.85 else rng.choice(SPECIALS)
                             for _ in range(rng.randrange(1, 80))))
    return texts


def assert_same_tokenizer(ours, theirs, texts: list[str], seed: int = 0) -> None:
    assert len(ours) == len(theirs)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert {i: (t.content, t.special) for i, t in ours.added_tokens_decoder.items()} == \
        {i: (t.content, t.special) for i, t in theirs.added_tokens_decoder.items()}
    for text in texts:
        for special in (False, True):
            assert ours(text, add_special_tokens=special)["input_ids"] == \
                theirs(text, add_special_tokens=special)["input_ids"], repr(text[:80])
    rng = random.Random(seed)
    size = len(theirs)
    byte = theirs.convert_tokens_to_ids("<0x00>")
    pool = [*range(min(size, 300)), *(byte + b for b in (0xE4, 0xB8, 0xAD, 0xF0, 0x9F, 0x98, 0x80, 0x41, 0xFF))]
    for _ in range(2000):
        ids = [rng.choice(pool) if rng.random() < 0.7 else rng.randrange(size) for _ in range(rng.randrange(12))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids
    assert ours.convert_ids_to_tokens(list(range(size))) == theirs.convert_ids_to_tokens(list(range(size)))
    lookup, reference = token_lookup(ours), token_lookup(theirs)
    for token in [*SPECIALS, "nonexistent-token", "Hello", "\u2581the", "<|im_end|>"]:
        assert lookup(token) == reference(token), token


def test_the_tiny_gemma_tokenizer_agrees_with_transformers(tiny_models, model_cache):
    lm = load_model(tiny_models["gemma3"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    assert isinstance(lm.tokenizer, SentencePieceTokenizer)
    assert_same_tokenizer(lm.tokenizer, transformers_tokenizer(tiny_models["gemma3"]), sample_texts(400))


def test_a_chat_renders_as_transformers_renders_it(tiny_models, model_cache):
    lm = load_model(tiny_models["gemma3"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    theirs = transformers_tokenizer(tiny_models["gemma3"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>there</b>\n\n"},
                {"role": "assistant", "content": "Hello.", "tool_calls": None}, {"role": "user", "content": "Again"}]
    template = lm.chat_format.template
    for generation in (False, True):
        assert lm.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation,
                                                tokenize=False) == \
            theirs.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation,
                                       tokenize=False)
    assert lm.tokenizer.apply_chat_template(messages, chat_template="{{ bos_token }}{{ messages[0].content }}") == \
        "<bos>Be brief."


def test_only_gemma_sentencepiece_files_get_it(tiny_models):
    assert applies_to(read_header(tiny_models["gemma3"]))
    assert not applies_to(read_header(tiny_models["llama"]))  # byte-level BPE: transformers' tokenizer
    gemma = read_header(tiny_models["gemma3"])
    no_unknown = dataclasses.replace(gemma, metadata=gguf_file.GGUFMetadata(
        {k: v for k, v in gemma.metadata.items() if k != "tokenizer.ggml.unknown_token_id"}))
    assert not applies_to(no_unknown)
    with pytest.raises(ValueError, match="unknown token"):
        build_model(no_unknown)


def test_a_folder_converted_before_gets_the_sentencepiece_model_on_its_next_load(tiny_models, tmp_path):
    gguf = tiny_models["gemma3"]
    options = LoadOptions(dtype="float32", kernels="torch")
    first = load_model(gguf, tmp_path, options)
    ids = first.render_chat([{"role": "user", "content": "Hello there"}])
    folder = checkpoint_dir(tmp_path, gguf, torch.float32, "quantized")
    (folder / MODEL_FILE).unlink()  # what a cache written before this tokenizer holds: tokenizer.json only
    save_tokenizer(*build_tokenizer(read_header(gguf)), folder)
    assert not isinstance(load_tokenizer(folder), SentencePieceTokenizer)
    again = load_model(gguf, tmp_path, options)
    assert (folder / MODEL_FILE).is_file() and isinstance(again.tokenizer, SentencePieceTokenizer)
    assert again.render_chat([{"role": "user", "content": "Hello there"}]) == ids


def test_a_tokenizer_model_cut_short_is_rebuilt(tiny_models, tmp_path, caplog):
    gguf = tiny_models["gemma3"]
    options = LoadOptions(dtype="float32", kernels="torch")
    ids = load_model(gguf, tmp_path, options).encode("Hello there")
    folder = checkpoint_dir(tmp_path, gguf, torch.float32, "quantized")
    data = (folder / MODEL_FILE).read_bytes()
    (folder / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        again = load_model(gguf, tmp_path, options)
    assert "tokenizer.model is cut short" in caplog.text
    assert again.encode("Hello there") == ids


def test_large_header_arrays_are_read_only_when_asked_for(tiny_models, monkeypatch, tmp_path):
    """A vocabulary's arrays stay in the file until looked up; they read back the same, and a conversion
    through the deferred arrays gives the same tokenizer."""
    gguf = tiny_models["gemma3"]
    whole = read_header(gguf)
    monkeypatch.setattr(gguf_file, "DEFERRED_ITEMS", 8)
    lean = read_header(gguf)
    stored = dict.__getitem__(lean.metadata, "tokenizer.ggml.tokens")
    assert isinstance(stored, gguf_file.DeferredArray)
    assert lean.metadata.length("tokenizer.ggml.tokens") == len(whole.metadata["tokenizer.ggml.tokens"])
    assert dict(lean.metadata.items()) == dict(whole.metadata.items())
    assert lean.metadata.get("tokenizer.ggml.scores") == whole.metadata["tokenizer.ggml.scores"]
    shutil.copy(gguf, tmp_path / "copy.gguf")
    lm = load_model(tmp_path / "copy.gguf", tmp_path / "cache", LoadOptions(dtype="float32", kernels="torch"))
    assert lm.encode("Hello there, world") == load_model(gguf, tmp_path / "cache2", LoadOptions(
        dtype="float32", kernels="torch")).encode("Hello there, world")


def test_another_architecture_keeps_transformers_tokenizer(tiny_models, model_cache):
    lm = load_model(tiny_models["qwen2"], model_cache, LoadOptions(dtype="float32", kernels="torch"))
    assert not isinstance(lm.tokenizer, SentencePieceTokenizer)
    assert lm.tokenizer.decode(lm.encode("Hello there")) == "Hello there"


@pytest.mark.slow
def test_the_bundled_gemma_tokenizer_agrees_with_transformers(bundled_model, model_cache):
    """The real 262k vocabulary: control and user-defined tokens, whitespace respelled, byte fallback."""
    lm = load_model(bundled_model, model_cache)
    assert isinstance(lm.tokenizer, SentencePieceTokenizer)
    theirs = transformers_tokenizer(bundled_model)
    assert_same_tokenizer(lm.tokenizer, theirs, sample_texts(1500, seed=1), seed=1)


def leftmost_longest(tokens: dict[str, int], text: str) -> list[tuple[int, int, int]]:
    found, pos = [], 0
    while pos < len(text):
        match = max((t for t in tokens if text.startswith(t, pos)), key=len, default=None)
        if match is None:
            pos += 1
        else:
            found.append((pos, pos + len(match), tokens[match]))
            pos += len(match)
    return found


def test_added_tokens_are_found_leftmost_then_longest_numbered_families_included():
    """A numbered family (`<unused0>`..) is matched by its shape and checked against the set: numbers
    outside it, and longer or overlapping tokens of the rest, still come out as a plain scan finds them."""
    words = [f"<unused{i}>" for i in range(200)] + ["<u>", "<unused>", "<unused7", "<unused12>x", "\n", "\n\n", "<b>",
                                                   "</b>", "[multimodal]", "<bos>"]
    tokens = {word: i for i, word in enumerate(words)}
    matcher = AddedTokens(tokens)
    assert matcher.pattern.groupindex.get("family")  # the family is matched by its shape
    rng = random.Random(3)
    pieces = ["<unused", "<u>", ">", "12", "7", "999", "<", "x", "\n", "a b", "</b>", "[multimodal]", "<bos", ">"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 12)))
        assert list(matcher.find(text)) == leftmost_longest(tokens, text), repr(text)
    assert list(AddedTokens({}).find("<unused1>")) == []
