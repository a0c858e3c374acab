"""Glue: a session's stored prompt, documents and history into assemble_context.

Reading everything through the store with the session's owner and id is what
keeps one session's documents and history out of another session's prompt.
"""

from __future__ import annotations

from .context import ContextDocument, ContextResult, CountTokens, assemble_context
from .errors import FileNotFound


def session_documents(store, owner: str, sid: str) -> list[ContextDocument]:
    """The session's files that are parsed and ready, in upload order."""
    docs = []
    for rec in store.list_files(owner, sid):
        if rec["state"] != "ready":
            continue
        try:
            text, metadata = store.file_text(owner, sid, rec["id"])
        except FileNotFound:  # removed meanwhile
            continue
        docs.append(ContextDocument(file_id=rec["id"], name=rec["name"], text=text, metadata=metadata))
    return docs


def session_context(store, owner: str, sid: str, question: str, *, count_tokens: CountTokens,
                    context_limit: int, reply_budget: int, before_message_id: str | None = None,
                    **options) -> ContextResult:
    """Assemble the prompt for ``question`` in session ``sid``.

    The history is every stored message, or those before ``before_message_id``
    when the question itself was already stored (pass its id). ``options``
    go to :func:`assemble_context` (``per_message_overhead``, ``doc_share``).
    """
    session = store.get(owner, sid)
    history = store.messages(owner, sid)
    if before_message_id is not None:
        ids = [m["id"] for m in history]
        if before_message_id in ids:
            history = history[:ids.index(before_message_id)]
    return assemble_context(
        system_prompt=session["system_prompt"],
        documents=session_documents(store, owner, sid),
        history=[{"id": m["id"], "role": m["role"], "content": m["content"]} for m in history],
        question=question, count_tokens=count_tokens,
        context_limit=context_limit, reply_budget=reply_budget, **options,
    )
