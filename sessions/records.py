"""Record shapes: what is stored and what callers get back (README, "Gradio API")."""

from __future__ import annotations

import copy
import json
from typing import Any

SESSION_FIELDS = ("id", "title", "model_id", "created_at", "updated_at", "message_count")
FILE_FIELDS = ("id", "name", "state", "error", "chars", "tokens")
MESSAGE_ROLES = ("user", "assistant", "system")
RESERVED_MESSAGE_KEYS = frozenset({"id", "role", "content", "created_at"})
FILE_STATES = ("parsing", "ready", "error")
MAX_ERROR_CHARS = 1000


def public_session(rec: dict) -> dict:
    """The session record of the README's Gradio API section."""
    return {key: rec[key] for key in SESSION_FIELDS}


def detailed_session(rec: dict) -> dict:
    """The public record plus system prompt, settings and owner (for ``get``)."""
    out = public_session(rec)
    out.update(system_prompt=rec["system_prompt"], settings=copy.deepcopy(rec["settings"]),
               owner=rec["owner"])
    return out


def public_file(rec: dict) -> dict:
    """The file record of the README's Gradio API section (the stored file name stays internal)."""
    return {key: rec.get(key) for key in FILE_FIELDS}


def message_out(doc: dict) -> dict:
    """A copy of a stored message that callers may mutate freely."""
    return copy.deepcopy(dict(doc))


def require_json(value: Any, what: str) -> None:
    """Raise ValueError unless ``value`` survives JSON (it is stored as JSON).

    NaN and infinity are let through (Python's json reads them back): a
    metric such as tokens per second must never cost a reply its storage.
    """
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from None


def check_settings(settings: Any) -> dict:
    """Settings are a JSON object; ``None`` means none."""
    if settings is None:
        return {}
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise ValueError("Session settings must be a dict with string keys.")
    require_json(settings, "Session settings")
    return copy.deepcopy(settings)


def check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, not {type(value).__name__}.")
    return value


def new_message(mid: str, role: str, content: str, created_at: float, meta: dict) -> dict:
    """Validate and build a message document."""
    if role not in MESSAGE_ROLES:
        raise ValueError(f"Unknown message role {role!r}; expected one of {', '.join(MESSAGE_ROLES)}.")
    check_text(content, "Message content")
    clash = RESERVED_MESSAGE_KEYS & meta.keys()
    if clash:
        raise ValueError(f"Message metadata cannot set {', '.join(sorted(clash))}.")
    require_json(meta, "Message metadata")
    return {"id": mid, "role": role, "content": content, "created_at": created_at,
            **copy.deepcopy(meta)}


def new_file(fid: str, name: str, stored_name: str, created_at: float) -> dict:
    return {"id": fid, "name": name, "state": "parsing", "error": None, "chars": 0,
            "tokens": 0, "stored_name": stored_name, "created_at": created_at}
