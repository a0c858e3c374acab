"""Fallback chat templates by architecture, for GGUF files that carry none.

The bundled Gemma 3 270M is a base model whose file has no `tokenizer.chat_template`; we still
want a chat to render the turns the model family was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str  # Jinja, rendered by the tokenizer's `apply_chat_template`
    stop_tokens: tuple[str, ...]  # end-of-turn tokens, looked up in the vocabulary


GEMMA = ChatFormat(
    name="gemma",
    template=(
        "{{ bos_token }}{% set ns = namespace(system='') %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] | trim + '\n\n' %}"
        "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{% if m['role'] == 'user' and ns.system %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
        "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    stop_tokens=("<end_of_turn>",),
)

CHATML = ChatFormat(
    name="chatml",
    template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
)

LLAMA3 = ChatFormat(
    name="llama3",
    template=(
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
)

FALLBACK_FORMATS = {"gemma3": GEMMA, "qwen2": CHATML, "llama": LLAMA3}

# End-of-turn markers worth stopping on whichever template a file brings.
KNOWN_STOP_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|eom_id|>")


class UnknownArchitecture(ValueError):
    """No fallback chat template is known for this architecture."""


def chat_format_for(architecture: str, file_template: str | None) -> ChatFormat:
    """The file's own template when it has one, else the fallback for its architecture."""
    if file_template:
        return ChatFormat(name="gguf", template=file_template, stop_tokens=KNOWN_STOP_TOKENS)
    try:
        return FALLBACK_FORMATS[architecture]
    except KeyError:
        known = ", ".join(sorted(FALLBACK_FORMATS))
        raise UnknownArchitecture(
            f"the file has no chat template and there is no fallback for architecture "
            f"{architecture!r} (fallbacks exist for: {known})"
        ) from None


# ----- fill-in-the-middle --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FimTokens:
    """The ids a code model fills a hole with: `prefix {before} suffix {after} middle` (PSM order), the
    model then writing what goes between. `stops`: separators that end the middle (a file separator,
    the pad token), besides the model's own end tokens."""

    prefix: int
    suffix: int
    middle: int
    stops: frozenset[int] = frozenset()


# llama.cpp's GGUF keys (and the older ones it still reads): preferred to names when present
FIM_METADATA = (("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id",
                 "tokenizer.ggml.fim_mid_token_id"),
                ("tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id", "tokenizer.ggml.middle_token_id"))
FIM_STOP_METADATA = ("tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id",
                     "tokenizer.ggml.fim_sep_token_id", "tokenizer.ggml.eot_token_id")
# prefix, suffix, middle tokens by name, family by family
FIM_NAMES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2 / Qwen2.5(-Coder), CodeGemma
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, StarCoder2, SantaCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),  # DeepSeek-Coder (fullwidth bars)
    ("▁<PRE>", "▁<SUF>", "▁<MID>"),  # CodeLlama
)
FIM_STOP_NAMES = ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|file_separator|>", "<fim_pad>", "<file_sep>",
                  "▁<EOT>")


def fim_tokens(metadata: dict, lookup, vocab_size: int) -> FimTokens | None:
    """The model's fill-in-the-middle tokens, or None when it has none: from the GGUF's fim_* ids where
    the file names them, else by the families' token names. `lookup(name)`: a token's id, or None."""
    def valid(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size

    stops = {metadata.get(key) for key in FIM_STOP_METADATA} | {lookup(name) for name in FIM_STOP_NAMES}
    stops = frozenset(token for token in stops if valid(token))
    for keys in FIM_METADATA:
        ids = [metadata.get(key) for key in keys]
        if all(valid(token) for token in ids):
            return FimTokens(*ids, stops=stops)
    for names in FIM_NAMES:
        ids = [lookup(name) for name in names]
        if all(valid(token) for token in ids):
            return FimTokens(*ids, stops=stops)
    return None
