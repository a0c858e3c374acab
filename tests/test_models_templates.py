"""models.templates: fallback chat formats by architecture, the file's own template when it has one."""

from __future__ import annotations

import pytest

from gguf_factory import write_tiny_gguf
from models.loader import LoadOptions, load_model, token_lookup
from models.templates import CHATML, GEMMA, LLAMA3, UnknownArchitecture, chat_format_for

F32 = LoadOptions(dtype="float32")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Say ✓ please"},
]
EXPECTED = {
    "gemma3": (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nSay ✓ please<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "qwen2": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nSay ✓ please<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nSay ✓ please<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
}
END_OF_TURN = {"gemma3": "<end_of_turn>", "qwen2": "<|im_end|>", "llama": "<|eot_id|>"}
OWN_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
)



@pytest.fixture(scope="module")
def loaded(tiny_models, model_cache):
    return {arch: load_model(path, model_cache, F32) for arch, path in tiny_models.items()}


def render_text(lm, messages) -> str:
    return lm.tokenizer.apply_chat_template(messages, chat_template=lm.chat_format.template,
                                            add_generation_prompt=True, tokenize=False)


def test_fallback_by_architecture():
    assert chat_format_for("gemma3", None) is GEMMA
    assert chat_format_for("qwen2", None) is CHATML
    assert chat_format_for("llama", "") is LLAMA3


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_fallback_renders_the_family_turns(loaded, arch):
    lm = loaded[arch]
    assert lm.chat_format is chat_format_for(arch, None)
    assert render_text(lm, CHAT) == EXPECTED[arch]
    ids = lm.render_chat(CHAT)
    assert lm.tokenizer.decode(ids) == EXPECTED[arch]
    # the turn markers are single special tokens, not spelled out in pieces
    vocab = token_lookup(lm.tokenizer)
    assert ids.count(vocab(END_OF_TURN[arch])) == EXPECTED[arch].count(END_OF_TURN[arch]) >= 3


@pytest.mark.parametrize("arch", ["gemma3", "qwen2", "llama"])
def test_stop_tokens_hold_end_of_turn_and_eos(loaded, arch):
    lm = loaded[arch]
    vocab = token_lookup(lm.tokenizer)
    assert vocab(END_OF_TURN[arch]) in lm.stop_token_ids
    assert lm.tokenizer.eos_token_id in lm.stop_token_ids
    assert all(0 <= i < len(lm.tokenizer) for i in lm.stop_token_ids)


def test_gemma_system_prompt_without_user_turn(loaded):
    text = render_text(loaded["gemma3"], [{"role": "system", "content": "  Rules.  "}])
    assert text == "<bos><start_of_turn>model\n"  # Gemma has no system role; nothing to attach it to


def test_files_own_template_wins(tmp_path, model_cache):
    path = write_tiny_gguf(tmp_path / "own.gguf", "gemma3", chat_template=OWN_TEMPLATE, seed=3)
    lm = load_model(path, model_cache, F32)
    assert lm.chat_format.name == "gguf"
    assert lm.chat_format.template == OWN_TEMPLATE
    text = render_text(lm, CHAT[1:3])
    assert text == "### USER: Hi there\n### ASSISTANT: Hello!\n### ASSISTANT:"
    assert lm.tokenizer.decode(lm.render_chat(CHAT[1:3])) == text
    vocab = token_lookup(lm.tokenizer)
    assert {vocab("<end_of_turn>"), vocab("<eos>")} <= lm.stop_token_ids


def test_unknown_architecture_without_template():
    with pytest.raises(UnknownArchitecture) as info:
        chat_format_for("mamba", None)
    message = str(info.value)
    assert "'mamba'" in message and "no chat template" in message
    assert "gemma3" in message and "llama" in message and "qwen2" in message


def test_unknown_architecture_with_its_own_template():
    fmt = chat_format_for("mamba", OWN_TEMPLATE)
    assert fmt.template == OWN_TEMPLATE and "<|im_end|>" in fmt.stop_tokens
