"""Export a session as Markdown or JSON, and import a JSON export as a new session."""

from __future__ import annotations

import json
import time

from .errors import StoreError

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
