"""Assemble a turn's prompt so it fits the model's context window.

A pure function: the caller passes the system prompt, the session's parsed
documents, the history and the new question, plus the model's tokenizer as
``count_tokens``. Each message costs ``count_tokens(content) +
per_message_overhead``; the caller applies the real chat template afterwards
and re-checks.

Order of priority: the system prompt and the question always go in (or a
``ValueError`` says why they cannot); documents get at most ``doc_share`` of
what is left (small ones whole, large ones as the BM25-best chunks for the
question); the history fills the rest, newest turns first, so the oldest
turns are the ones dropped.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from .bm25 import Postings, bm25_scores, tokenize
from .chunking import Passage, chunk_document, whole_pieces

CHUNK_TOKENS = 200
MIN_CHUNK_CHARS = 64
# A document longer than this many characters per token of the context window cannot go in whole with
# any tokenizer we serve, so it is never tokenized whole: it is chunked at once, sized from a sample.
MAX_CHARS_PER_TOKEN = 16
SAMPLE_CHARS = 20_000
# Ranking stops counting chunks after this many in a row did not fit what is left (each count tokenizes one
# chunk; a document of millions of characters has tens of thousands of them).
MAX_MISSES = 32
DOCS_HEADER = ("Documents the user shared in this chat follow. When you use them, "
               "cite the label in square brackets.")

CountTokens = Callable[[str], int]


@dataclass
class ContextDocument:
    """A parsed file of the session.

    ``metadata`` may hold ``"pages": [{"page", "start", "end"}]`` (character
    offsets into ``text``) and ``"language"`` (for code fences).
    """

    file_id: str
    name: str
    text: str
    metadata: dict = field(default_factory=dict)


class DocumentCache:
    """What assembling a prompt computes per document and tokenizer, kept between turns: the document's
    pieces and token cost, its chunks, their BM25 postings and token costs. Without it every turn
    would tokenize each whole document again and re-index it.

    Entries are keyed by the caller's tokenizer key, the file id and the text's length (a file's text
    never changes); the least recently used go once there are `max_entries`.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, dict] = OrderedDict()
        self._lock = threading.Lock()

    def entry(self, tokenizer_key: str, doc: ContextDocument) -> dict:
        """The (mutable) cache entry of `doc` for one tokenizer."""
        key = (tokenizer_key, doc.file_id, len(doc.text))
        with self._lock:
            entry = self._entries.pop(key, None) or {}
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return entry

    def forget(self, file_id: str) -> None:
        with self._lock:
            for key in [key for key in self._entries if key[1] == file_id]:
                del self._entries[key]


@dataclass
class ContextResult:
    """Messages to feed the chat template, and what went in or stayed out."""

    messages: list[dict]
    report: dict


@dataclass
class _Pick:
    """Something chosen for the documents block: a whole document or one chunk."""

    doc_index: int
    chunk_index: int  # -1 for a whole document
    pieces: list[str]
    cost: int


def assemble_context(*, system_prompt: str, documents: list[ContextDocument],
                     history: list[dict], question: str, count_tokens: CountTokens,
                     context_limit: int, reply_budget: int, per_message_overhead: int = 8,
                     doc_share: float = 0.5, chunk_tokens: int = CHUNK_TOKENS,
                     cache: DocumentCache | None = None, tokenizer_key: str = "") -> ContextResult:
    """Build ``[system?, *kept history, user question]`` within the token budget.

    ``history`` is the conversation before ``question`` (dicts with "role",
    "content" and optionally "id"). Large documents are cut into chunks of
    about ``chunk_tokens``. Raises ValueError if the system prompt and the
    question alone do not fit ``context_limit - reply_budget``. With ``cache``,
    what is computed per document is kept there under ``tokenizer_key`` (name
    the tokenizer that ``count_tokens`` uses) and reused by later turns.
    """
    if not 0.0 <= doc_share <= 1.0:
        raise ValueError("doc_share must be between 0 and 1.")
    budget = context_limit - reply_budget
    cost = lambda text: count_tokens(text) + per_message_overhead  # noqa: E731
    fixed = cost(question) + (cost(system_prompt) if system_prompt else 0)
    if fixed > budget:
        raise ValueError(_too_long(question, system_prompt, count_tokens, context_limit, reply_budget))
    left = budget - fixed

    block_cost = count_tokens(DOCS_HEADER) + (0 if system_prompt else per_message_overhead)
    entries = [cache.entry(tokenizer_key, doc) if cache else {} for doc in documents]
    picks, chunk_totals = _pick_documents(documents, question, count_tokens,
                                          int(left * doc_share) - block_cost, chunk_tokens, entries,
                                          max_whole_chars=context_limit * MAX_CHARS_PER_TOKEN)
    docs_cost = block_cost + sum(p.cost for p in picks) if any(p.pieces for p in picks) else 0
    turns = _group_turns(history)
    kept_from = _oldest_turn_that_fits(turns, cost, left - docs_cost)

    while True:  # token counts of joined text can exceed the sum of the parts
        messages = _build_messages(system_prompt, documents, picks, turns[kept_from:], question)
        prompt_tokens = sum(cost(m["content"]) for m in messages)
        if prompt_tokens <= budget:
            break
        if kept_from < len(turns):
            kept_from += 1
        elif picks:
            picks.pop()  # picks are in priority order: drop the least useful
        else:
            raise ValueError(_too_long(question, system_prompt, count_tokens,
                                       context_limit, reply_budget))

    report = {
        "prompt_tokens": prompt_tokens,
        "context_limit": context_limit,
        "reply_budget": reply_budget,
        "dropped_turns": kept_from,
        "dropped_message_ids": [m["id"] for turn in turns[:kept_from] for m in turn if "id" in m],
        **_files_report(documents, picks, chunk_totals),
    }
    return ContextResult(messages=messages, report=report)


def _too_long(question: str, system_prompt: str, count_tokens: CountTokens,
              context_limit: int, reply_budget: int) -> str:
    extra = (f" (plus {count_tokens(system_prompt)} for the system prompt)"
             if system_prompt else "")
    return (f"Your message is {count_tokens(question)} tokens{extra}; this model's context "
            f"is {context_limit} tokens with {reply_budget} kept for the reply. "
            "Shorten the message or lower the reply length.")


def _pick_documents(documents: list[ContextDocument], question: str, count_tokens: CountTokens,
                    budget: int, chunk_tokens: int, entries: list[dict],
                    max_whole_chars: int) -> tuple[list[_Pick], dict[int, int]]:
    """Choose whole documents (smallest first) then the best chunks of the rest.

    Returns the picks in priority order and, per chunked document, its number
    of chunks. ``entries`` (one dict per document) keep what is computed per
    document for the next call. A document over ``max_whole_chars`` is chunked
    without being tokenized whole.
    """
    sep = count_tokens("\n\n")
    picks: list[_Pick] = []
    whole: list[tuple[int, int, list[str]]] = []
    large = []
    for i, doc in enumerate(documents):
        entry = entries[i]
        if len(doc.text) > max_whole_chars:
            large.append(i)
            continue
        if "whole" not in entry:
            pieces = whole_pieces(doc.name, doc.text, doc.metadata or {})
            entry["whole"] = (pieces, sum(count_tokens(p) for p in pieces))
        pieces, cost = entry["whole"]
        whole.append((cost + sep * len(pieces), i, pieces))
    for doc_cost, i, pieces in sorted(whole):
        if doc_cost <= budget:
            picks.append(_Pick(i, -1, pieces, doc_cost))
            budget -= doc_cost
        else:
            large.append(i)

    chunked = []  # per chunked document: (its index, chunks, BM25 postings, token costs)
    for i in sorted(large):
        doc, entry = documents[i], entries[i]
        max_chars = max(MIN_CHUNK_CHARS, int(chunk_tokens * _chars_per_token(doc, entry, count_tokens)))
        kept = entry.get("chunked")  # (chunk size, chunks, their BM25 postings, their token costs)
        if kept is None or kept[0] != max_chars:
            doc_chunks = chunk_document(i, doc.name, doc.text, doc.metadata or {}, max_chars)
            kept = (max_chars, doc_chunks, Postings([tokenize(c.body) for c in doc_chunks]), [None] * len(doc_chunks))
            entry["chunked"] = kept  # one assignment: a turn running meanwhile sees all of it or none
        chunked.append((i, *kept[1:]))
    chunk_totals = {i: len(doc_chunks) for i, doc_chunks, _, _ in chunked}
    if chunked:
        scores = bm25_scores([postings for _, _, postings, _ in chunked], tokenize(question))
        # Best score first; ties (e.g. no shared terms) in document order (a stable sort keeps it).
        order = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)
        starts = list(itertools.accumulate([0] + [len(doc_chunks) for _, doc_chunks, _, _ in chunked]))
        misses = 0
        for k in order:
            slot = bisect.bisect_right(starts, k) - 1
            i, doc_chunks, _, doc_costs = chunked[slot]
            index = k - starts[slot]
            chunk = doc_chunks[index]
            if doc_costs[index] is None:
                doc_costs[index] = count_tokens(chunk.text)
            chunk_cost = doc_costs[index] + sep
            if chunk_cost <= budget:
                picks.append(_Pick(i, chunk.index, [chunk.text], chunk_cost))
                budget -= chunk_cost
                misses = 0
            else:
                misses += 1
                if misses >= MAX_MISSES:
                    break
    return picks, chunk_totals


def _chars_per_token(doc: ContextDocument, entry: dict, count_tokens: CountTokens) -> float:
    """Characters per token of `doc`: measured on the whole text when it was tokenized whole, else on its
    first SAMPLE_CHARS characters (kept in `entry`)."""
    if "whole" in entry:
        return len(doc.text) / max(1, entry["whole"][1])
    if "sample_ratio" not in entry:
        sample = doc.text[:SAMPLE_CHARS]
        entry["sample_ratio"] = len(sample) / max(1, count_tokens(sample))
    return entry["sample_ratio"]


def _group_turns(history: list[dict]) -> list[list[dict]]:
    """Split history into turns: each starts at a user message."""
    turns: list[list[dict]] = []
    for message in history:
        if message.get("role") == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return turns


def _oldest_turn_that_fits(turns: list[list[dict]], cost: CountTokens, budget: int) -> int:
    """Index of the oldest turn kept when filling ``budget`` newest-first."""
    kept_from = len(turns)
    for i in range(len(turns) - 1, -1, -1):
        turn_cost = sum(cost(m["content"]) for m in turns[i])
        if turn_cost > budget:
            break
        budget -= turn_cost
        kept_from = i
    return kept_from


def _build_messages(system_prompt: str, documents: list[ContextDocument], picks: list[_Pick],
                    turns: list[list[dict]], question: str) -> list[dict]:
    system = _system_content(system_prompt, picks)
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": m["role"], "content": m["content"]} for turn in turns for m in turn]
    messages.append({"role": "user", "content": question})
    return messages


def _system_content(system_prompt: str, picks: list[_Pick]) -> str:
    """The system prompt followed by the documents block, pieces in document order."""
    ordered = sorted(picks, key=lambda p: (p.doc_index, p.chunk_index))
    pieces = [piece for pick in ordered for piece in pick.pieces]
    parts = [system_prompt] if system_prompt else []
    if pieces:
        parts += [DOCS_HEADER, *pieces]
    return "\n\n".join(parts)


def _files_report(documents: list[ContextDocument], picks: list[_Pick],
                  chunk_totals: dict[int, int]) -> dict:
    used: dict[int, int] = {}
    for pick in picks:
        used[pick.doc_index] = used.get(pick.doc_index, 0) + 1
    included, partial, left_out = [], [], []
    for i, doc in enumerate(documents):
        if i in chunk_totals and used.get(i):
            partial.append({"name": doc.name, "chunks_used": used[i], "chunks_total": chunk_totals[i]})
        elif i in chunk_totals or (i not in used and doc.text.strip()):
            left_out.append(doc.name)
        else:
            included.append(doc.name)
    return {"files_included": included, "files_partial": partial, "files_left_out": left_out}
