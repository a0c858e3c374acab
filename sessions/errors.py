"""Exceptions raised by the session store.

The ``*NotFound`` errors subclass :class:`KeyError` so callers can catch a
missing key the usual way, but they print their message as written (a plain
``KeyError`` wraps it in quotes).
"""


class StoreError(Exception):
    """The store cannot be used as asked (e.g. a file from a newer version)."""


class TooManySessions(StoreError, ValueError):
    """The owner already has as many sessions as the store allows."""


class _NotFound(KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SessionNotFound(_NotFound):
    """No session with this id for this owner (someone else's is unknown too)."""

    def __init__(self, session_id: object):
        super().__init__(f"Unknown session id: {session_id}")


class FileNotFound(_NotFound):
    """No file with this id in the session, or it has no parsed text yet."""


class MessageNotFound(_NotFound):
    """No message with this id in the session."""
