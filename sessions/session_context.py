"""Glue: a session's stored prompt, documents and history into assemble_context.

ChatService builds every turn's prompt with `session_context`. Reading everything
through the store with the session's owner and id is what keeps one session's
documents and history out of another session's prompt.
"""

from __future__ import annotations

from .context import ContextDocument, ContextResult, CountTokens, assemble_context
from .errors import FileNotFound


def session_documents(store, owner: str, session_id: str) -> list[ContextDocument]:
    """The session's files that are parsed and ready, in upload order."""
    docs = []
    for rec in store.list_files(owner, session_id):
        if rec["state"] != "ready":
            continue
        try:
            text, metadata = store.file_text(owner, session_id, rec["id"])
        except FileNotFound:  # removed meanwhile
            continue
        docs.append(ContextDocument(file_id=rec["id"], name=rec["name"], text=text, metadata=metadata))
    return docs


def session_context(store, owner: str, session_id: str, question: str, *, count_tokens: CountTokens,
                    context_limit: int, reply_budget: int, system_prompt: str | None = None,
                    before_message_id: str | None = None, **options) -> ContextResult:
    """Assemble the prompt for ``question`` in one session: what ChatService sends the model each turn.

    The history is the session's user and assistant messages, or those before ``before_message_id``
    (a regenerate answers that message again). ``system_prompt`` replaces the session's stored one
    when given. ``options`` go to :func:`assemble_context` (``per_message_overhead``, ``doc_share``).
    """
    session = store.get(owner, session_id)
    history = store.messages(owner, session_id)
    if before_message_id is not None:
        ids = [m["id"] for m in history]
        if before_message_id in ids:
            history = history[:ids.index(before_message_id)]
    return assemble_context(
        system_prompt=session["system_prompt"] if system_prompt is None else system_prompt,
        documents=session_documents(store, owner, session_id),
        history=[{"id": m["id"], "role": m["role"], "content": m["content"]}
                 for m in history if m["role"] in ("user", "assistant")],
        question=question, count_tokens=count_tokens,
        context_limit=context_limit, reply_budget=reply_budget, **options,
    )
