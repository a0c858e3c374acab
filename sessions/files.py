"""Uploaded files of a session: stored bytes, parsed text and their records.

A mixin of :class:`sessions.store.SessionStore`, kept apart so each module
has one job. Uploads live in ``<session_id>/files/`` under random names (the user's
file name is only a display label); parsed text lives in
``<session_id>/parsed/<fid>.json``, written atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tinydb import where

from . import records
from .errors import FileNotFound
from .names import display_file_name, is_valid_id, new_id, safe_extension
from .storage import atomic_write_bytes

log = logging.getLogger(__name__)

INTERRUPTED = "Interrupted by a restart; upload the file again."


class TooManyFiles(ValueError):
    """The session already holds the most files it may."""


class TooMuchText(ValueError):
    """The session's ready files would hold more text than it may."""


class FileMethods:
    """File operations; relies on the store's lock and session helpers."""

    def files_dir(self, owner: str, session_id: str) -> Path:
        """Where the session's uploads are stored (created on demand)."""
        with self._lock:
            self._require(owner, session_id)
            folder = self._session_dir(session_id) / "files"
            folder.mkdir(parents=True, exist_ok=True)
            return folder

    def safe_upload_path(self, owner: str, session_id: str, original_name: str) -> Path:
        """A fresh random path inside ``files_dir`` keeping a sanitized extension."""
        return self.files_dir(owner, session_id) / (new_id() + safe_extension(original_name))

    def add_file(self, owner: str, session_id: str, name: str, stored_path: str,
                 max_files: int | None = None) -> dict:
        """Record an upload in state "parsing".

        ``name`` is a display label only. ``stored_path`` should come from
        :meth:`safe_upload_path`; a file elsewhere (e.g. Gradio's temp dir) is
        copied in, so the store owns and can delete every byte it lists.
        With ``max_files``, a session that already holds that many files is
        refused (checked under the lock, so concurrent uploads cannot overshoot).
        """
        folder = self.files_dir(owner, session_id)
        stored = Path(stored_path)
        copied = None
        if stored.resolve().parent != folder.resolve():
            if not stored.is_file():
                raise ValueError(f"Uploaded file not found: {stored.name}")
            copied = stored = self.safe_upload_path(owner, session_id, name)
            shutil.copyfile(stored_path, stored)
        with self._lock:
            try:
                rec = self._require(owner, session_id)  # it may have been deleted during the copy
                db = self._session_db(session_id, create=True)
                if max_files is not None and len(db.table("files")) >= max_files:
                    raise TooManyFiles(f"this session already has {max_files} files; remove one first")
            except (KeyError, TooManyFiles):
                if copied is not None:
                    copied.unlink(missing_ok=True)
                raise
            doc = records.new_file(new_id(), display_file_name(name), stored.name, self._now())
            db.table("files").insert(doc)
            self._touch(rec, when=doc["created_at"])
            return records.public_file(doc)

    def set_file_ready(self, owner: str, session_id: str, fid: str, text: str,
                       metadata: dict, tokens: int, max_session_chars: int | None = None) -> dict:
        """Store the parsed text and metadata; the file becomes "ready".

        With ``max_session_chars``, :class:`TooMuchText` is raised (and nothing stored) when the session's
        other ready files and this text would together pass it; checked under the lock, so files that
        finish parsing at once cannot overshoot.
        """
        records.check_text(text, "Parsed text")
        records.require_json(metadata, "File metadata")
        payload = json.dumps({"text": text, "metadata": metadata}, ensure_ascii=False)
        with self._lock:
            doc = self._file_doc(owner, session_id, fid)
            if max_session_chars is not None:
                others = sum(d.get("chars") or 0 for d in self._session_db(session_id, create=False).table("files")
                             if d["state"] == "ready" and d["id"] != fid)
                if others + len(text) > max_session_chars:
                    raise TooMuchText(
                        f"'{doc['name']}' holds {len(text):,} characters of text and this chat's other files "
                        f"{others:,}; together they would pass the limit of {max_session_chars:,} characters "
                        "per chat. Remove a file, or start a new chat for it.")
            path = self._parsed_path(session_id, fid)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, payload.encode("utf-8"))
            return self._set_file(session_id, fid, state="ready", error=None,
                                  chars=len(text), tokens=int(tokens))

    def set_file_error(self, owner: str, session_id: str, fid: str, message: str) -> dict:
        """Mark the file as failed with a message for the user."""
        with self._lock:
            self._file_doc(owner, session_id, fid)
            self._parsed_path(session_id, fid).unlink(missing_ok=True)
            return self._set_file(session_id, fid, state="error", chars=0, tokens=0,
                                  error=str(message)[:records.MAX_ERROR_CHARS])

    def list_files(self, owner: str, session_id: str) -> list[dict]:
        """The session's file records in upload order."""
        with self._lock:
            self._require(owner, session_id)
            db = self._session_db(session_id, create=False)
            docs = sorted(db.table("files").all(), key=lambda d: d.doc_id) if db is not None else []
            return [records.public_file(d) for d in docs]

    def file_text(self, owner: str, session_id: str, fid: str) -> tuple[str, dict]:
        """Parsed text and metadata of a "ready" file."""
        with self._lock:
            doc = self._file_doc(owner, session_id, fid)
            if doc["state"] != "ready":
                raise FileNotFound(f"File {doc['name']} has no parsed text (state: {doc['state']})")
            try:
                data = json.loads(self._parsed_path(session_id, fid).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise FileNotFound(f"Parsed text of {doc['name']} is missing; upload it again") from None
            return data["text"], data["metadata"]

    def remove_file(self, owner: str, session_id: str, fid: str) -> None:
        """Remove the record, the stored bytes and the parsed text."""
        with self._lock:
            doc = self._file_doc(owner, session_id, fid)
            self._session_db(session_id, create=False).table("files").remove(doc_ids=[doc.doc_id])
            self._touch(self._require(owner, session_id))
            (self._session_dir(session_id) / "files" / doc["stored_name"]).unlink(missing_ok=True)
            self._parsed_path(session_id, fid).unlink(missing_ok=True)

    def mark_interrupted_uploads(self) -> int:
        """At start: uploads a crash left in "parsing" become "error"; return how many.

        Bytes a crash left without a record (killed between the copy and the record) and
        half-written parsed text are removed: the store lists every byte it keeps.
        """
        count = 0
        with self._lock:
            for rec in self._sessions.all():
                if not is_valid_id(rec.get("id")) or not (self.root / rec["id"] / "files").is_dir():
                    continue  # no upload ever started in this session
                db = self._session_db(rec["id"], create=False)
                if db is not None:
                    count += len(db.table("files").update(
                        {"state": "error", "error": INTERRUPTED}, where("state") == "parsing"))
                self._remove_unlisted(rec["id"], db.table("files").all() if db is not None else [])
        return count

    def _remove_unlisted(self, session_id: str, docs: list) -> None:
        """Delete upload bytes and parsed text that no file record refers to."""
        keep = {d["stored_name"] for d in docs} | {f"{d['id']}.json" for d in docs if d["state"] == "ready"}
        for folder in (self._session_dir(session_id) / "files", self._session_dir(session_id) / "parsed"):
            for path in folder.iterdir() if folder.is_dir() else []:
                if path.is_file() and path.name not in keep:
                    log.warning("removing %s: an upload interrupted by a restart", path)
                    path.unlink(missing_ok=True)

    # --- internals ------------------------------------------------------

    def _file_doc(self, owner: str, session_id: str, fid: str):
        self._require(owner, session_id)
        db = self._session_db(session_id, create=False)
        doc = db.table("files").get(where("id") == fid) if db is not None and is_valid_id(fid) else None
        if doc is None:
            raise FileNotFound(f"Unknown file id: {fid}")
        return doc

    def _set_file(self, session_id: str, fid: str, **changes) -> dict:
        table = self._session_db(session_id, create=False).table("files")
        table.update(changes, where("id") == fid)
        return records.public_file(table.get(where("id") == fid))

    def _parsed_path(self, session_id: str, fid: str) -> Path:
        return self._session_dir(session_id) / "parsed" / f"{fid}.json"
