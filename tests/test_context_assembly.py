"""assemble_context at the edges, retrieval, labels, and isolation between sessions."""

from __future__ import annotations

import math
import re

import pytest

from sessions import LOCAL_USER, ContextDocument, DocumentCache, SessionStore, assemble_context
from sessions.bm25 import Postings, bm25_scores, tokenize
from sessions.chunking import chunk_document, fence
from sessions.context import DOCS_HEADER, MAX_CHARS_PER_TOKEN, SAMPLE_CHARS
from sessions.session_context import session_context


def words(text: str) -> int:
    return len(text.split())


def build(**kw):
    args = dict(system_prompt="", documents=[], history=[], question="What now?",
                count_tokens=words, context_limit=1000, reply_budget=100)
    args.update(kw)
    return assemble_context(**args)


def turn(i: int, n_words: int = 5) -> list[dict]:
    return [{"id": f"u{i}", "role": "user", "content": " ".join([f"q{i}"] * n_words)},
            {"id": f"a{i}", "role": "assistant", "content": " ".join([f"r{i}"] * n_words)}]


def cost(messages, overhead=8):
    return sum(words(m["content"]) + overhead for m in messages)


def test_empty_history_no_documents():
    result = build(question="Hello there")
    assert result.messages == [{"role": "user", "content": "Hello there"}]
    assert result.report == {
        "prompt_tokens": 2 + 8, "context_limit": 1000, "reply_budget": 100, "dropped_turns": 0,
        "dropped_message_ids": [], "files_included": [], "files_partial": [], "files_left_out": []}


def test_system_prompt_first_then_history_then_question():
    history = turn(1) + turn(2)
    result = build(system_prompt="Be terse.", history=history, question="And?")
    assert result.messages[0] == {"role": "system", "content": "Be terse."}
    assert result.messages[1:-1] == [{"role": m["role"], "content": m["content"]} for m in history]
    assert result.messages[-1] == {"role": "user", "content": "And?"}


def test_exact_fit_keeps_everything_and_one_less_drops_oldest_turn():
    history = turn(1) + turn(2) + turn(3)
    full = 2 + 8 + 6 * (5 + 8) + 1 + 8  # system, six messages, question
    exact = build(system_prompt="Be terse.", history=history, question="Next?",
                  context_limit=full + 50, reply_budget=50)
    assert exact.report["prompt_tokens"] == full == cost(exact.messages)
    assert exact.report["dropped_turns"] == 0
    short = build(system_prompt="Be terse.", history=history, question="Next?",
                  context_limit=full + 49, reply_budget=50)
    assert short.report["dropped_turns"] == 1
    assert short.report["dropped_message_ids"] == ["u1", "a1"]
    assert short.messages[1]["content"].startswith("q2")


def test_overflow_drops_oldest_turns_whole():
    history = [m for i in range(20) for m in turn(i)]
    result = build(history=history, context_limit=200, reply_budget=50)
    kept = result.messages[:-1]
    assert cost(result.messages) <= 150
    assert kept == [{"role": m["role"], "content": m["content"]} for m in history[-len(kept):]]
    assert len(kept) % 2 == 0 and kept[0]["role"] == "user"  # whole turns only
    n = result.report["dropped_turns"]
    assert result.report["dropped_message_ids"] == [x for i in range(n) for x in (f"u{i}", f"a{i}")]


def test_question_alone_too_long_raises_clear_error():
    with pytest.raises(ValueError) as exc:
        build(question="word " * 300, context_limit=256, reply_budget=64)
    assert str(exc.value).startswith(
        "Your message is 300 tokens; this model's context is 256 tokens with 64 kept for the reply.")
    with pytest.raises(ValueError, match="plus 200 for the system prompt"):
        build(system_prompt="s " * 200, question="short", context_limit=256, reply_budget=64)


def test_question_that_exactly_fits_with_nothing_else():
    result = build(question="a b c", history=turn(1), context_limit=11 + 20, reply_budget=20)
    assert result.messages == [{"role": "user", "content": "a b c"}]
    assert result.report["prompt_tokens"] == 11 and result.report["dropped_turns"] == 1


def test_small_documents_go_in_whole_with_labels():
    docs = [ContextDocument("f1", "notes.txt", "alpha beta\ngamma", {}),
            ContextDocument("f2", "main.py", "def f():\n    return 1", {"language": "python"})]
    result = build(system_prompt="Sys.", documents=docs)
    system = result.messages[0]["content"]
    assert system.startswith("Sys.\n\n" + DOCS_HEADER)
    assert "[notes.txt]\nalpha beta\ngamma" in system
    assert "[main.py]\n```python\ndef f():\n    return 1\n```" in system
    assert result.report["files_included"] == ["notes.txt", "main.py"]
    assert result.report["files_partial"] == [] and result.report["files_left_out"] == []


def test_documents_without_system_prompt_make_a_system_message():
    docs = [ContextDocument("f1", "a.txt", "text", {})]
    result = build(documents=docs)
    assert result.messages[0]["role"] == "system"
    assert result.messages[0]["content"].startswith(DOCS_HEADER)


def numbered_code(n_lines: int, needle_line: int) -> str:
    lines = [f"x_{i} = compute_value({i})  # filler line number {i}" for i in range(1, n_lines + 1)]
    lines[needle_line - 1] = "def frobnicate_widget(config):  # the special function"
    return "\n".join(lines)


def test_huge_document_is_chunked_and_best_chunk_retrieved():
    text = numbered_code(5000, needle_line=3210)
    doc = ContextDocument("f1", "big.py", text, {"language": "python"})
    result = build(documents=[doc], question="What does frobnicate_widget do?",
                   context_limit=4096, reply_budget=512)
    system = result.messages[0]["content"]
    assert cost(result.messages) <= 4096 - 512
    assert "frobnicate_widget" in system
    labels = re.findall(r"\[big\.py, lines (\d+)-(\d+)\]", system)
    assert labels and any(int(a) <= 3210 <= int(b) for a, b in labels)
    starts = [int(a) for a, _ in labels]
    assert starts == sorted(starts)  # chunks appear in document order
    assert "```python" in system
    (partial,) = result.report["files_partial"]
    assert partial["name"] == "big.py" and 0 < partial["chunks_used"] < partial["chunks_total"]
    assert result.report["files_included"] == [] and result.report["files_left_out"] == []
    docs_tokens = words(system)
    assert docs_tokens <= 0.5 * (4096 - 512 - 8 - words("What does frobnicate_widget do?") - 8)


def test_a_document_is_tokenized_and_indexed_once_not_every_turn():
    """With a cache, the next turn tokenizes only what is new (the question, the chosen chunks), not the
    whole document again, and assembles exactly the same prompt as without one. (The context is wide enough
    that the document might go in whole, so the first turn counts it whole.)"""
    text = numbered_code(5000, needle_line=3210)
    docs = [ContextDocument("f1", "big.py", text, {"language": "python"}),
            ContextDocument("f2", "small.txt", "A short note about widgets.")]
    tokenized: list[int] = []
    CONTEXT = len(text) // MAX_CHARS_PER_TOKEN + 1000

    def counting(piece: str) -> int:
        tokenized.append(len(piece))
        return words(piece)

    cache = DocumentCache()
    uncached = build(documents=docs, question="What does frobnicate_widget do?", context_limit=CONTEXT,
                     reply_budget=512)
    for question in ("What does frobnicate_widget do?", "And what does line 42 hold?"):
        tokenized.clear()
        cached = build(documents=docs, question=question, context_limit=CONTEXT, reply_budget=512,
                       count_tokens=counting, cache=cache, tokenizer_key="model-a")
        first_turn = question.startswith("What")
        if first_turn:
            assert cached == uncached
            assert sum(tokenized) > len(text)  # the first turn reads the whole document
    assert sum(tokenized) < len(text) / 4  # a later turn does not
    tokenized.clear()
    build(documents=docs[::-1], question="What does frobnicate_widget do?", context_limit=CONTEXT, reply_budget=512,
          count_tokens=counting, cache=cache, tokenizer_key="model-a")  # another order: the same entries
    assert sum(tokenized) < len(text) / 4
    tokenized.clear()
    build(documents=docs, question="What does frobnicate_widget do?", context_limit=CONTEXT, reply_budget=512,
          count_tokens=counting, cache=cache, tokenizer_key="model-b")  # another tokenizer counts anew
    assert sum(tokenized) > len(text)
    cache.forget("f1")
    tokenized.clear()
    build(documents=docs, question="x", context_limit=CONTEXT, reply_budget=512, count_tokens=counting,
          cache=cache, tokenizer_key="model-a")
    assert sum(tokenized) > len(text)


def test_a_document_too_long_for_any_context_is_never_tokenized_whole():
    """A document longer than MAX_CHARS_PER_TOKEN characters per token of the context cannot go in whole:
    it is chunked at once (sized from a sample), only the chunks ranked are counted, and the best still wins."""
    text = numbered_code(20_000, needle_line=13_579)
    doc = ContextDocument("f1", "huge.py", text, {"language": "python"})
    tokenized: list[int] = []

    def counting(piece: str) -> int:
        tokenized.append(len(piece))
        return words(piece)

    assert len(text) > 4096 * MAX_CHARS_PER_TOKEN
    result = build(documents=[doc], question="What does frobnicate_widget do?", context_limit=4096,
                   reply_budget=512, count_tokens=counting, cache=DocumentCache(), tokenizer_key="m")
    assert sum(tokenized) < len(text) / 10 and max(tokenized) <= SAMPLE_CHARS
    assert "frobnicate_widget" in result.messages[0]["content"]
    assert cost(result.messages) <= 4096 - 512
    (partial,) = result.report["files_partial"]
    assert partial["name"] == "huge.py" and 0 < partial["chunks_used"] < partial["chunks_total"]


def test_pdf_chunks_are_labelled_with_pages():
    pages, text = [], ""
    for p in range(1, 41):
        body = "\n".join(f"ordinary sentence {i} on page {p} about nothing" for i in range(30))
        if p == 27:
            body += "\nThe quarterly revenue of Zanzibar Holdings was 42 million."
        pages.append({"page": p, "start": len(text), "end": len(text) + len(body)})
        text += body + "\n"
    doc = ContextDocument("f1", "report.pdf", text, {"pages": pages})
    result = build(documents=[doc], question="What was the Zanzibar revenue?",
                   context_limit=2048, reply_budget=256)
    system = result.messages[0]["content"]
    assert "[report.pdf, page 27]\n" in system and "Zanzibar Holdings" in system
    assert not re.search(r"\[report\.pdf, lines", system)


def test_documents_left_out_when_no_room():
    doc = ContextDocument("f1", "a.txt", "some words here", {})
    result = build(documents=[doc], doc_share=0.0)
    assert result.report["files_left_out"] == ["a.txt"]
    assert result.messages == [{"role": "user", "content": "What now?"}]


def test_history_gets_what_documents_leave():
    doc = ContextDocument("f1", "a.txt", "tiny doc", {})
    history = [m for i in range(30) for m in turn(i)]
    result = build(documents=[doc], history=history, context_limit=400, reply_budget=100)
    assert result.report["files_included"] == ["a.txt"]
    assert 0 < result.report["dropped_turns"] < 30
    assert cost(result.messages) <= 300


def test_smallest_documents_whole_first_then_chunks_of_large():
    small = ContextDocument("s", "small.txt", "zebra facts here", {})
    large = ContextDocument("l", "large.txt", numbered_code(2000, 1500), {})
    result = build(documents=[large, small], question="frobnicate_widget zebra",
                   context_limit=3000, reply_budget=200)
    assert result.report["files_included"] == ["small.txt"]
    assert [p["name"] for p in result.report["files_partial"]] == ["large.txt"]
    system = result.messages[0]["content"]
    assert system.index("[large.txt, lines") < system.index("[small.txt]")  # document order


def test_tokenizer_costlier_on_joined_text_still_within_budget():
    def chars(text):  # joined text costs more than its parts: the estimates fall short
        return len(text) // 3 + text.count("\n\n") ** 2
    docs = [ContextDocument(str(i), f"d{i}.txt", "lorem ipsum " * 5, {}) for i in range(6)]
    history = [m for i in range(40) for m in turn(i, n_words=2)]
    result = build(documents=docs, history=history, count_tokens=chars, context_limit=700,
                   reply_budget=100, per_message_overhead=4)
    total = sum(chars(m["content"]) + 4 for m in result.messages)
    assert total == result.report["prompt_tokens"] <= 600
    assert result.report["files_included"] and result.report["dropped_turns"]


def test_bad_doc_share_rejected():
    with pytest.raises(ValueError, match="doc_share"):
        build(doc_share=1.5)


# --- pieces ----------------------------------------------------------------


def test_tokenize_splits_identifiers():
    assert tokenize("parseHTTPHeader snake_case x2") == [
        "parsehttpheader", "parse", "http", "header", "snake_case", "snake", "case", "x2", "x", "2"]


def test_bm25_prefers_rare_exact_terms():
    corpus = [tokenize(t) for t in ["the cat sat", "the dog sat", "the frobnicate cat", "the the the"]]
    scores = bm25_scores([Postings(corpus)], tokenize("frobnicate cat"))
    assert max(range(4), key=scores.__getitem__) == 2
    assert scores[1] == 0.0 and scores[3] == 0.0
    assert bm25_scores([Postings([])], ["x"]) == []


def test_chunks_split_long_lines_and_label_ranges():
    text = "short\n" + "word " * 100 + "\nend"
    chunks = chunk_document(0, "a.txt", text, {}, max_chars=120)
    assert all(len(c.body) <= 120 for c in chunks)
    assert chunks[0].text.startswith("[a.txt, line")
    assert any("[a.txt, line 2]" in c.text for c in chunks)
    assert "".join(c.body for c in chunks).replace(" ", "").count("word") == 100


def test_fence_outgrows_backticks_inside():
    assert fence("a ``` b", "md").startswith("````md\n")


# --- isolation -------------------------------------------------------------


def add_ready_file(store, owner, sid, name, text):
    path = store.safe_upload_path(owner, sid, name)
    path.write_text(text)
    fid = store.add_file(owner, sid, name, str(path))["id"]
    store.set_file_ready(owner, sid, fid, text, {}, words(text))


def test_sessions_never_see_each_others_documents_or_history(tmp_path):
    store = SessionStore(tmp_path)
    a = store.create(LOCAL_USER, system_prompt="Prompt of A")["id"]
    b = store.create(LOCAL_USER, system_prompt="Prompt of B")["id"]
    c = store.create("someone-else")["id"]
    add_ready_file(store, LOCAL_USER, a, "a.txt", "AAA-secret-document alpha")
    add_ready_file(store, LOCAL_USER, b, "b.txt", "BBB-secret-document beta")
    add_ready_file(store, "someone-else", c, "c.txt", "CCC-secret-document gamma")
    store.add_message(LOCAL_USER, a, "user", "AAA-history question")
    store.add_message(LOCAL_USER, b, "user", "BBB-history question")
    store.add_message("someone-else", c, "user", "CCC-history question")

    for sid, mine, others in [(a, "AAA", ("BBB", "CCC", "Prompt of B")),
                              (b, "BBB", ("AAA", "CCC", "Prompt of A"))]:
        result = session_context(store, LOCAL_USER, sid, "secret document history?",
                                 count_tokens=words, context_limit=2000, reply_budget=100)
        prompt = "\n".join(m["content"] for m in result.messages)
        assert f"{mine}-secret-document" in prompt and f"{mine}-history" in prompt
        assert not any(o in prompt for o in others)
    with pytest.raises(KeyError):
        session_context(store, LOCAL_USER, c, "q", count_tokens=words, context_limit=2000,
                        reply_budget=100)


def test_session_context_excludes_the_stored_question(tmp_path):
    store = SessionStore(tmp_path)
    sid = store.create(LOCAL_USER)["id"]
    store.add_message(LOCAL_USER, sid, "user", "first")
    store.add_message(LOCAL_USER, sid, "assistant", "reply")
    q = store.add_message(LOCAL_USER, sid, "user", "second")
    result = session_context(store, LOCAL_USER, sid, "second", count_tokens=words,
                             context_limit=500, reply_budget=50, before_message_id=q["id"])
    assert [m["content"] for m in result.messages] == ["first", "reply", "second"]


def okapi_bm25(corpus: list[list[str]], query: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """The textbook formula, chunk by chunk, as the reference."""
    n, avg = len(corpus), sum(map(len, corpus)) / len(corpus)
    scores = []
    for chunk in corpus:
        score = 0.0
        for term in dict.fromkeys(query):
            df, tf = sum(term in other for other in corpus), chunk.count(term)
            if df and tf:
                idf = math.log((n - df + 0.5) / (df + 0.5) + 1.0)
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(chunk) / avg))
        scores.append(score)
    return scores


def test_postings_score_exactly_as_bm25_over_the_same_chunks():
    """The per-document indexes kept between turns, scored together, give BM25's scores over all chunks."""
    docs = [["parse http header", "zebra river", "http http server"], ["river of zebra", "", "headerParser x"]]
    corpus = [[tokenize(text) for text in doc] for doc in docs]
    query = tokenize("zebra http header river nothing")
    expected = okapi_bm25([chunk for doc in corpus for chunk in doc], query)
    assert bm25_scores([Postings(doc) for doc in corpus], query) == expected
    assert bm25_scores([], query) == [] and bm25_scores([Postings(corpus[0])], []) == [0.0] * 3
