"""The session store: sessions, their messages and their files, on TinyDB.

Layout under ``data_dir/sessions``::

    index.json                  one record per session (owner, title, settings, ...)
    <session_id>/messages-000000.json  its messages, in segments (see sessions.messages)
    <session_id>/session.json          its file records
    <session_id>/files/                uploaded bytes, under random names
    <session_id>/parsed/<fid>.json     parsed text and metadata of each file

Every one of these is written whole and atomically (see
:mod:`sessions.storage`). The index stays small, so listing sessions never
reads messages, and an append rewrites only the index and the session's last
message segment, so writes stay fast as history grows. Deleting a session
removes its folder.

Every access holds one re-entrant lock: Gradio runs handlers in a thread pool
and TinyDB does no locking of its own. One process owns the data dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from tinydb import TinyDB, where
from tinydb.table import Document

from . import records
from .errors import MessageNotFound, SessionNotFound, TooManySessions
from .files import FileMethods
from .messages import MessageLog
from .migrations import index_migrations, open_db, session_migrations
from .names import DEFAULT_TITLE, clean_title, is_valid_id, new_id, title_from_message
from .storage import fsync_dir

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
SESSION_FILE = "session.json"
TRASH_PREFIX = ".trash-"
MAX_OPEN_SESSIONS = 16


class _OpenSession:
    """The opened files of one session: file records and message log (lazy)."""

    def __init__(self) -> None:
        self.db: TinyDB | None = None
        self.log: MessageLog | None = None

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
        if self.log is not None:
            self.log.close()


class SessionStore(FileMethods):
    """Sessions of every owner, persisted under ``data_dir/sessions``.

    An id that does not exist and an id owned by someone else both raise
    :class:`SessionNotFound`, so ids leak nothing across users.
    ``on_delete`` holds callables taking a session id, run after a delete
    (e.g. to drop cached model state for it).
    """

    def __init__(self, data_dir: Path, max_sessions_per_owner: int | None = None):
        self.max_sessions_per_owner = max_sessions_per_owner  # None: no cap
        self.root = Path(data_dir) / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_delete: list[Callable[[str], None]] = []
        self._lock = threading.RLock()
        self._last_time = 0.0
        self._open: OrderedDict[str, _OpenSession] = OrderedDict()
        self._empty_trash()
        self._index = open_db(self.root / INDEX_FILE, index_migrations)
        self._sessions = self._index.table("sessions")
        for rec in self._sessions.search(where("message_count") == None):  # noqa: E711
            if is_valid_id(rec.get("id")):
                self._message_log(rec["id"])  # counts them (a migration left None)

    # --- sessions -------------------------------------------------------

    def create(self, owner: str, title: str = "", model_id: str = "",
               system_prompt: str = "", settings: dict | None = None) -> dict:
        """Create a session; an empty title becomes "New chat"."""
        if not isinstance(owner, str) or not owner:
            raise ValueError("A session owner must be a non-empty string.")
        rec = {
            "id": new_id(), "owner": owner,
            "title": clean_title(title) or DEFAULT_TITLE,
            "model_id": records.check_text(model_id, "A model id"),
            "system_prompt": records.check_text(system_prompt, "A system prompt"),
            "settings": records.check_settings(settings),
            "message_count": 0,
        }
        with self._lock:
            cap = self.max_sessions_per_owner
            if cap is not None and self._sessions.count(where("owner") == owner) >= cap:
                raise TooManySessions(f"you have {cap:,} chats, the most this server keeps per user; "
                                      "delete some to start new ones")
            rec["created_at"] = rec["updated_at"] = self._now()
            self._sessions.insert(rec)
        return records.public_session(rec)

    def list(self, owner: str) -> list[dict]:
        """The owner's sessions, most recently updated first."""
        with self._lock:
            docs = self._sessions.search(where("owner") == owner)
            docs.sort(key=lambda d: (d["updated_at"], d.doc_id), reverse=True)
            return [records.public_session(d) for d in docs]

    def get(self, owner: str, session_id: str) -> dict:
        """The session record plus ``system_prompt``, ``settings`` and ``owner``."""
        with self._lock:
            self._require(owner, session_id)
            self._message_log(session_id)  # opening it first corrects a stale count
            return records.detailed_session(self._require(owner, session_id))  # re-read

    def owner_of(self, session_id: str) -> str | None:
        """Who owns ``session_id``, or None if no such session."""
        with self._lock:
            rec = self._find(session_id)
            return rec["owner"] if rec else None

    def rename(self, owner: str, session_id: str, title: str) -> dict:
        """Set the title (one line, trimmed, at most 200 characters)."""
        title = clean_title(title)
        if not title:
            raise ValueError("A session title cannot be empty.")
        with self._lock:
            rec = self._require(owner, session_id)
            return records.public_session(self._touch(rec, title=title))

    def update(self, owner: str, session_id: str, *, model_id: str | None = None,
               system_prompt: str | None = None, settings: dict | None = None) -> dict:
        """Change the model, system prompt or settings (``None`` leaves one as is)."""
        changes: dict = {}
        if model_id is not None:
            changes["model_id"] = records.check_text(model_id, "A model id")
        if system_prompt is not None:
            changes["system_prompt"] = records.check_text(system_prompt, "A system prompt")
        if settings is not None:
            changes["settings"] = records.check_settings(settings)
        with self._lock:
            rec = self._require(owner, session_id)
            if changes:
                rec = self._touch(rec, **changes)
            return records.detailed_session(rec)

    def delete(self, owner: str, session_id: str) -> None:
        """Remove the session, its messages, files and parsed text; then run ``on_delete``."""
        with self._lock:
            rec = self._require(owner, session_id)
            self._close_session_db(session_id)
            trash = self._move_to_trash(session_id)
            self._sessions.remove(doc_ids=[rec.doc_id])
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for hook in list(self.on_delete):
            try:
                hook(session_id)
            except Exception:  # the session is gone; one bad hook must not stop the rest
                log.exception("on_delete hook %r failed for session %s", hook, session_id)

    # --- messages -------------------------------------------------------

    def add_message(self, owner: str, session_id: str, role: str, content: str, **meta) -> dict:
        """Append a message; it is on disk when this returns.

        ``meta`` holds extra JSON fields (model_id, tokens, context_report, ...).
        The first user message names a session still called "New chat".
        """
        with self._lock:
            rec = self._require(owner, session_id)
            msg = records.new_message(new_id(), role, content, self._now(), meta)
            log_ = self._message_log(session_id)
            log_.append(msg)
            changes = {"message_count": len(log_)}
            if role == "user" and rec["title"] == DEFAULT_TITLE:
                changes["title"] = title_from_message(content)
            self._touch(rec, when=msg["created_at"], **changes)
            return records.message_out(msg)

    def messages(self, owner: str, session_id: str) -> list[dict]:
        """All messages, oldest first."""
        with self._lock:
            self._require(owner, session_id)
            return [records.message_out(d) for d in self._message_log(session_id).all()]

    def history(self, owner: str, session_id: str) -> list[dict]:
        """``[{"role", "content"}]``, oldest first (README: the Gradio API's ``/history``)."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages(owner, session_id)]

    def delete_messages_from(self, owner: str, session_id: str, message_id: str) -> int:
        """Drop that message and every later one (to regenerate); return how many."""
        with self._lock:
            rec = self._require(owner, session_id)
            log_ = self._message_log(session_id)
            ids = [d["id"] for d in log_.all()]
            if message_id not in ids:
                raise MessageNotFound(f"Unknown message id: {message_id}")
            removed = log_.truncate_from(ids.index(message_id))
            self._touch(rec, message_count=len(log_))
            return removed

    def clear_messages(self, owner: str, session_id: str) -> None:
        """Remove every message of the session (its files stay)."""
        with self._lock:
            rec = self._require(owner, session_id)
            self._message_log(session_id).truncate_from(0)
            self._touch(rec, message_count=0)

    def close(self) -> None:
        """Release open files (the store is unusable afterwards)."""
        with self._lock:
            for session_id in list(self._open):
                self._close_session_db(session_id)
            self._index.close()

    # --- internals ------------------------------------------------------

    def _now(self) -> float:
        """Wall-clock time, strictly increasing so "newest first" has no ties."""
        now = max(time.time(), self._last_time + 1e-6)
        self._last_time = now
        return now

    def _find(self, session_id: str) -> Document | None:
        if not is_valid_id(session_id):
            return None
        return self._sessions.get(where("id") == session_id)

    def _require(self, owner: str, session_id: str) -> Document:
        """The session record, if ``owner`` owns it; else SessionNotFound."""
        rec = self._find(session_id)
        if rec is None or rec["owner"] != owner:
            raise SessionNotFound(session_id)
        return rec

    def _touch(self, rec: Document, when: float | None = None, **changes) -> Document:
        """Apply ``changes`` to a session record and bump its ``updated_at``."""
        changes["updated_at"] = when if when is not None else self._now()
        self._sessions.update(changes, doc_ids=[rec.doc_id])
        rec.update(changes)
        return rec

    def _session_dir(self, session_id: str) -> Path:
        if not is_valid_id(session_id):  # never join an unchecked string into a path
            raise SessionNotFound(session_id)
        return self.root / session_id

    def _opened(self, session_id: str) -> _OpenSession:
        """The session's open-file holder, kept in a small LRU."""
        handle = self._open.get(session_id)
        if handle is None:
            self._session_dir(session_id)  # validates the id before any path use
            handle = self._open[session_id] = _OpenSession()
            while len(self._open) > MAX_OPEN_SESSIONS:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(session_id)
        return handle

    def _session_db(self, session_id: str, create: bool) -> TinyDB | None:
        """The session's file-records TinyDB; None if absent and not ``create``."""
        handle = self._opened(session_id)
        if handle.db is None:
            path = self._session_dir(session_id) / SESSION_FILE
            if not create and not path.exists():
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
            handle.db = open_db(path, session_migrations)
        return handle.db

    def _message_log(self, session_id: str) -> MessageLog:
        handle = self._opened(session_id)
        if handle.log is None:
            handle.log = MessageLog(self._session_dir(session_id))
            self._sync_count(session_id, len(handle.log))
        return handle.log

    def _sync_count(self, session_id: str, count: int) -> None:
        """Correct a stale ``message_count`` (a kill between the message and index writes)."""
        rec = self._find(session_id)
        if rec is not None and rec.get("message_count") != count:
            self._sessions.update({"message_count": count}, doc_ids=[rec.doc_id])

    def _close_session_db(self, session_id: str) -> None:
        handle = self._open.pop(session_id, None)
        if handle is not None:
            handle.close()

    def _move_to_trash(self, session_id: str) -> Path | None:
        """Rename the session folder out of reach (atomic); the caller deletes it."""
        folder = self._session_dir(session_id)
        if not folder.exists():
            return None
        trash = self.root / f"{TRASH_PREFIX}{session_id}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(folder, trash)
        fsync_dir(self.root)
        return trash

    def _empty_trash(self) -> None:
        """Finish deletes a crash interrupted."""
        for trash in self.root.glob(f"{TRASH_PREFIX}*"):
            shutil.rmtree(trash, ignore_errors=True)
