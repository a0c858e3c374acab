"""Chat sessions: a crash-safe TinyDB store and per-turn context assembly.

Imports only the standard library and TinyDB (no Gradio, no torch), so
importing it is instant.
"""

from .context import ContextDocument, ContextResult, DocumentCache, assemble_context
from .errors import FileNotFound, MessageNotFound, SessionNotFound, StoreError, TooManySessions
from .names import LOCAL_USER
from .session_context import session_context, session_documents
from .store import SessionStore

__all__ = [
    "TooManySessions",
    "LOCAL_USER", "SessionStore", "SessionNotFound", "FileNotFound", "MessageNotFound",
    "StoreError", "assemble_context", "ContextDocument", "ContextResult", "DocumentCache",
    "session_context", "session_documents",
]
