"""Property tests (hypothesis) for context assembly with a real model's tokenizer and chat template.

tests/test_context_properties.py checks assemble_context on a small vocabulary with stand-in token
counters. Here the text is arbitrary Unicode (control characters, emoji, right-to-left marks,
template look-alikes) and the counter is a tiny model's own tokenizer: the prompt the model really
receives, rendered through its chat template, must fit its context window with the reply budget
still free, and the question must reach it unchanged.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.loader import LoadOptions, load_model
from sessions import ContextDocument, assemble_context

CONTEXT = 256
SPACE_MARK = "\u2581"  # how SentencePiece writes a space inside its tokens
TRICKY = ["\x00", "\x1b[31m", "\r\n", "\u202e", "\ufeff", "🙂", "日本語", "<|im_start|>", "<start_of_turn>",
          "<|eot_id|>", "</s>", "{{ messages }}", "{% if %}", "\\n", "  ", "\t"]
texts = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(TRICKY)), max_size=12).map("".join)


@st.composite
def conversations(draw):
    n = draw(st.integers(0, 10))
    history = [{"id": f"m{i}", "role": ("user", "assistant")[i % 2], "content": draw(texts)} for i in range(n)]
    docs = [ContextDocument(f"f{i}", f"doc{i}.txt", draw(st.lists(texts, max_size=40).map("\n".join)), {})
            for i in range(draw(st.integers(0, 2)))]
    return {"system_prompt": draw(st.one_of(st.just(""), texts)), "history": history, "documents": docs,
            "question": draw(texts.filter(str.strip)), "reply_budget": draw(st.integers(16, CONTEXT // 4))}


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tiny_models, model_cache):
    """Two chat formats: Llama-3 headers, and Gemma's turns (which fold the system prompt into a user turn)."""
    return load_model(tiny_models[request.param], model_cache, LoadOptions(max_context=CONTEXT))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=conversations())
@example(case={"system_prompt": "", "history": [], "documents": [], "question": SPACE_MARK, "reply_budget": 16})
def test_the_rendered_prompt_fits_with_room_for_the_reply(model, case):
    limit = model.context_length
    try:
        result = assemble_context(**case, count_tokens=model.count_tokens, context_limit=limit)
    except ValueError as error:  # only when the system prompt and the question cannot fit on their own
        fixed = model.count_tokens(case["question"]) + model.count_tokens(case["system_prompt"])
        overhead = 8 * (2 if case["system_prompt"] else 1)  # assemble_context's per-message overhead
        assert fixed + overhead + case["reply_budget"] > limit, error
        return
    prompt = model.render_chat(result.messages)
    # The estimate budgets each message's envelope, not the prompt's own (BOS and the assistant header that
    # opens the reply): the reply may get that many tokens fewer than reply_budget, never less.
    envelope = len(model.render_chat([{"role": "user", "content": ""}]))
    assert len(prompt) + case["reply_budget"] <= limit + envelope, (len(prompt), envelope, result.report)
    assert len(prompt) < limit
    assert result.messages[-1] == {"role": "user", "content": case["question"]}
    # templates may trim a message; SentencePiece's whitespace mark U+2581 typed as text decodes as a space
    # (in SentencePiece and transformers' Gemma tokenizer alike): the model gets the same tokens either way
    decoded = model.tokenizer.decode(prompt).replace(SPACE_MARK, " ")
    assert case["question"].replace(SPACE_MARK, " ").strip() in decoded
