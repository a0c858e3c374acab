"""Export a session as Markdown or JSON, import a JSON export as a new session, and keep the export files
handed out for download (ExportFiles)."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from .errors import StoreError
from .names import new_id

log = logging.getLogger(__name__)

EXPORT_FORMAT = "local-llm-session"
EXPORT_VERSION = 1
MAX_IMPORT_MESSAGES = 20_000


def export_json(store, owner: str, session_id: str) -> dict:
    """Everything a session says: title, settings, messages (files are listed, not embedded)."""
    session = store.get(owner, session_id)
    return {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_at": time.time(),
        "session": {k: session.get(k) for k in ("title", "model_id", "system_prompt", "settings", "created_at")},
        "messages": [{k: m.get(k) for k in ("role", "content", "created_at", "model_id", "tokens")}
                     for m in store.messages(owner, session_id)],
        "files": [{"name": f["name"], "state": f["state"]} for f in store.list_files(owner, session_id)],
    }


def export_markdown(store, owner: str, session_id: str) -> str:
    session = store.get(owner, session_id)
    lines = [f"# {session['title']}", ""]
    if session.get("system_prompt"):
        lines += [f"> System: {session['system_prompt']}", ""]
    for message in store.messages(owner, session_id):
        who = {"user": "You", "assistant": "Assistant"}.get(message["role"], message["role"].title())
        model = f" ({message['model_id']})" if message.get("model_id") else ""
        lines += [f"**{who}{model}:**", "", message["content"], ""]
    return "\n".join(lines)


def import_json(store, owner: str, data: dict | str | bytes) -> dict:
    """Create a new session from an export; raise `StoreError` with a clear message if it is not one."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise StoreError(f"the file is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise StoreError("the file is not a session export of this app (missing \"format\": \"local-llm-session\")")
    if not isinstance(data.get("version"), int) or data["version"] > EXPORT_VERSION:
        raise StoreError(f"unsupported export version {data.get('version')!r}")
    info = data.get("session") if isinstance(data.get("session"), dict) else {}
    messages = data.get("messages") if isinstance(data.get("messages"), list) else []
    if len(messages) > MAX_IMPORT_MESSAGES:
        raise StoreError(f"the export has {len(messages)} messages; at most {MAX_IMPORT_MESSAGES} can be imported")
    clean = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant", "system") \
                or not isinstance(message.get("content"), str):
            raise StoreError(f"message {index + 1} of the export needs a role (user/assistant) and text content")
        clean.append(message)
    settings = info.get("settings") if isinstance(info.get("settings"), dict) else None
    record = store.create(
        owner, title=str(info.get("title") or "Imported chat")[:200], model_id=str(info.get("model_id") or ""),
        system_prompt=str(info.get("system_prompt") or ""), settings=settings,
    )
    for message in clean:
        meta = {k: message[k] for k in ("model_id", "tokens") if message.get(k) is not None}
        store.add_message(owner, record["id"], message["role"], message["content"], **meta)
    return store.get(owner, record["id"])


EXPORT_MAX_AGE_S = 3600.0  # an export waits this long for its download, then it is removed


class ExportFiles:
    """Export files handed out for download, each known with its owner and session.

    Each export gets a fresh folder with a 128-bit random name under ``root``, so its path cannot be guessed
    and no two exports share one. An export is removed with its session (:meth:`forget_session`) and once
    it is older than ``max_age_s`` (:meth:`remove_expired`, run by :meth:`start_timer`). Folders under
    ``root`` that no live export owns (a previous run's) go once they are that old too.
    """

    def __init__(self, root: Path, max_age_s: float = EXPORT_MAX_AGE_S):
        self.root = Path(root).resolve()
        self.max_age_s = max_age_s
        self._exports: dict[Path, tuple[str, str, float]] = {}  # path -> (owner, session id, created)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def write(self, owner: str, session_id: str, filename: str, text: str) -> Path:
        """Write an export of `session_id` for `owner`; return its path."""
        folder = self.root / new_id()
        folder.mkdir(parents=True)
        path = folder / filename
        path.write_text(text, encoding="utf-8")
        with self._lock:
            self._exports[path] = (owner, session_id, time.time())
        return path

    def owner_of(self, path) -> str | None:
        """The owner of the live export at `path`; None for anything else."""
        with self._lock:
            entry = self._exports.get(_resolved(path))
        return entry[0] if entry else None

    def holds(self, path) -> bool:
        """True for a path inside the export area (a live export or not): never a user's upload."""
        resolved = _resolved(path)
        return resolved is not None and resolved.is_relative_to(self.root)

    def forget_session(self, session_id: str) -> None:
        """Remove every export of a deleted session."""
        with self._lock:
            gone = [path for path, entry in self._exports.items() if entry[1] == session_id]
            for path in gone:
                del self._exports[path]
        for path in gone:
            shutil.rmtree(path.parent, ignore_errors=True)

    def remove_expired(self, now: float | None = None) -> int:
        """Remove exports older than `max_age_s`, and stale folders no live export owns; return how many."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [path for path, entry in self._exports.items() if now - entry[2] > self.max_age_s]
            for path in gone:
                del self._exports[path]
            live = {path.parent for path in self._exports}
        for path in gone:
            shutil.rmtree(path.parent, ignore_errors=True)
        stale = 0
        for folder in self.root.iterdir() if self.root.is_dir() else []:
            try:
                old = now - folder.stat().st_mtime > self.max_age_s
            except OSError:
                continue
            if folder not in live and old:
                shutil.rmtree(folder, ignore_errors=True)
                stale += 1
        return len(gone) + stale

    def start_timer(self, interval_s: float = 60.0) -> None:
        """Run :meth:`remove_expired` every `interval_s` seconds on a daemon thread, until :meth:`close`."""
        if self._timer is not None:
            return

        def run():
            while not self._stop.wait(interval_s):
                try:
                    self.remove_expired()
                except OSError as error:  # a full or read-only disk: try again next time
                    log.warning("could not remove old exports: %s", error)

        self._timer = threading.Thread(target=run, name="export-sweeper", daemon=True)
        self._timer.start()

    def close(self) -> None:
        """Stop the timer and remove every export this instance handed out."""
        self._stop.set()
        with self._lock:
            paths, self._exports = list(self._exports), {}
        for path in paths:
            shutil.rmtree(path.parent, ignore_errors=True)


def _resolved(path) -> Path | None:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError, TypeError):
        return None
