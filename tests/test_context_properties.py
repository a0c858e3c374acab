"""Property tests for assemble_context (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessions import ContextDocument, assemble_context
from sessions.context import DOCS_HEADER

VOCAB = ["alpha", "beta", "gamma", "delta", "parse_file", "HttpClient", "42", "page", "x"]


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    """Costs more for joined text than for its parts, so estimates can fall short."""
    return len(text) // 4 + text.count("\n\n") ** 2


def phrases(min_words: int, max_words: int):
    return st.lists(st.sampled_from(VOCAB), min_size=min_words, max_size=max_words).map(" ".join)


phrase = phrases(0, 30)


@st.composite
def histories(draw):
    n = draw(st.integers(0, 16))
    roles = draw(st.lists(st.sampled_from(["user", "assistant", "user", "system"]), min_size=n, max_size=n))
    return [{"id": f"m{i}", "role": role, "content": draw(phrase)} for i, role in enumerate(roles)]


@st.composite
def documents(draw):
    docs = []
    for i in range(draw(st.integers(0, 3))):
        rng = random.Random(draw(st.integers(0, 2**32)))
        n_lines = draw(st.sampled_from([0, 1, 3, 20, 80, 300]))
        text = "\n".join(" ".join(rng.choices(VOCAB, k=rng.randint(0, 12))) for _ in range(n_lines))
        metadata = draw(st.sampled_from([{}, {"language": "python"}, "pages"]))
        if metadata == "pages":
            half = len(text) // 2
            metadata = {"pages": [{"page": 1, "start": 0, "end": half},
                                  {"page": 2, "start": half, "end": len(text)}]}
        docs.append(ContextDocument(f"f{i}", f"doc{i}.txt", text, metadata))
    return docs


@st.composite
def limits(draw):
    reply = draw(st.integers(0, 300))
    return {"reply_budget": reply, "context_limit": reply + draw(st.integers(-20, 2000))}


cases = st.builds(lambda base, lim: {**base, **lim}, st.fixed_dictionaries({
    "system_prompt": phrases(0, 12),
    "documents": documents(),
    "history": histories(),
    "question": phrases(1, 12),
    "count_tokens": st.sampled_from([words, chars]),
    "per_message_overhead": st.integers(0, 10),
    "doc_share": st.floats(0.0, 1.0),
    "chunk_tokens": st.integers(5, 200),
}), limits())

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fixed_cost(case) -> int:
    count, over = case["count_tokens"], case["per_message_overhead"]
    system = count(case["system_prompt"]) + over if case["system_prompt"] else 0
    return system + count(case["question"]) + over


@SETTINGS
@given(cases)
def test_never_exceeds_budget_and_keeps_question(case):
    budget = case["context_limit"] - case["reply_budget"]
    try:
        result = assemble_context(**case)
    except ValueError as exc:
        assert fixed_cost(case) > budget, exc
        return
    count, over = case["count_tokens"], case["per_message_overhead"]
    total = sum(count(m["content"]) + over for m in result.messages)
    assert total == result.report["prompt_tokens"] <= budget
    assert result.messages[-1] == {"role": "user", "content": case["question"]}
    if case["system_prompt"]:
        assert result.messages[0]["content"].startswith(case["system_prompt"])


@SETTINGS
@given(cases)
def test_dropped_turns_are_always_the_oldest(case):
    try:
        result = assemble_context(**case)
    except ValueError:
        return
    history = case["history"]
    first = result.messages[0]
    has_system = bool(case["system_prompt"]) or (
        first["role"] == "system" and first["content"].startswith(DOCS_HEADER))
    kept = result.messages[1 if has_system else 0:-1]
    dropped = len(history) - len(kept)
    # What is kept is exactly the newest part of the history, unchanged.
    assert kept == [{"role": m["role"], "content": m["content"]} for m in history[dropped:]]
    assert result.report["dropped_message_ids"] == [m["id"] for m in history[:dropped]]
    # Whole turns: the kept part starts at a user message (or is everything/nothing).
    if 0 < dropped < len(history):
        assert history[dropped]["role"] == "user"


@SETTINGS
@given(cases)
def test_every_document_is_reported_once(case):
    try:
        result = assemble_context(**case)
    except ValueError:
        return
    report = result.report
    names = (report["files_included"] + [p["name"] for p in report["files_partial"]]
             + report["files_left_out"])
    assert sorted(names) == sorted(d.name for d in case["documents"])
    for partial in report["files_partial"]:
        assert 0 < partial["chunks_used"] <= partial["chunks_total"]
