"""Schema versions and named migrations for the store's TinyDB files.

Modelled on simonw/llm: each file records the names of the migrations already
applied (table ``_migrations``) and its schema version (table ``_meta``).
Opening a file runs the missing migrations in order, so files written by
older versions keep loading; a file from a newer version is refused rather
than rewritten.

A kill between a migration and its record reruns it on the next start, so
every migration must be idempotent (fill in what is missing, never toggle).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from tinydb import TinyDB

from .errors import StoreError
from .names import DEFAULT_TITLE, LOCAL_USER
from .storage import AtomicJSONStorage

log = logging.getLogger(__name__)

Migration = Callable[[TinyDB], None]


class Migrations:
    """An ordered registry of named migrations for one kind of file."""

    def __init__(self, kind: str):
        self.kind = kind
        self.steps: list[Migration] = []

    def register(self, fn: Migration) -> Migration:
        """Decorator: append ``fn`` (named by its function name) to the sequence."""
        if any(step.__name__ == fn.__name__ for step in self.steps):
            raise ValueError(f"Duplicate {self.kind} migration name: {fn.__name__}")
        self.steps.append(fn)
        return fn

    @property
    def schema_version(self) -> int:
        return len(self.steps)

    def apply(self, db: TinyDB) -> list[str]:
        """Run the migrations ``db`` has not seen yet; return their names."""
        done = {doc["name"] for doc in db.table("_migrations").all()}
        known = {step.__name__ for step in self.steps}
        stored = stored_schema_version(db)
        if stored > self.schema_version or done - known:
            raise StoreError(
                f"{db.storage.path} was written by a newer version of this app "
                f"(schema {stored}, this version knows up to {self.schema_version}); "
                "upgrade the app to open it."
            )
        ran = []
        for step in self.steps:
            if step.__name__ in done:
                continue
            step(db)
            db.table("_migrations").insert({"name": step.__name__, "applied_at": time.time()})
            ran.append(step.__name__)
        if ran or stored != self.schema_version:
            meta = db.table("_meta")
            meta.truncate()
            meta.insert({"schema_version": self.schema_version})
        return ran


def open_db(path: Path, migrations: Migrations) -> TinyDB:
    """Open a TinyDB file with atomic storage and bring its schema up to date."""
    db = TinyDB(path, storage=AtomicJSONStorage)
    fresh = db.storage.read() is None  # reading also moves an unreadable file aside
    ran = migrations.apply(db)
    if ran and not fresh:
        log.info("Migrated %s: %s", path, ", ".join(ran))
    return db


def stored_schema_version(db: TinyDB) -> int:
    """The schema version recorded in ``db`` (0 for a file that predates versions)."""
    docs = db.table("_meta").all()
    return int(docs[0].get("schema_version", 0)) if docs else 0


def _fill_missing(db: TinyDB, table: str, defaults: dict) -> None:
    """Give every document in ``table`` the keys of ``defaults`` it lacks."""
    def fill(doc: dict) -> None:
        for key, value in defaults.items():
            doc.setdefault(key, value() if callable(value) else value)

    tbl = db.table(table)
    if any(not defaults.keys() <= doc.keys() for doc in tbl.all()):
        tbl.update(fill)


# --- the index file: one record per session --------------------------------

index_migrations = Migrations("index")


@index_migrations.register
def m001_sessions_table(db: TinyDB) -> None:
    """Version 1: table ``sessions`` with id, title, model_id, created_at, updated_at."""


@index_migrations.register
def m002_owners_settings_counts(db: TinyDB) -> None:
    """Sessions from before multi-user support belong to the local user.

    Their message count is unknown here (messages live in other files): None
    tells the store to count them when it opens.
    """
    _fill_missing(db, "sessions", {
        "owner": LOCAL_USER, "model_id": "", "system_prompt": "",
        "settings": dict, "message_count": None, "title": DEFAULT_TITLE,
        "created_at": 0.0, "updated_at": 0.0,
    })


# --- a session file: its file records --------------------------------------

session_migrations = Migrations("session")


@session_migrations.register
def m001_files_table(db: TinyDB) -> None:
    """Version 1: table ``files`` (id, name, state, stored_name)."""


@session_migrations.register
def m002_file_counts(db: TinyDB) -> None:
    """Older file records lacked the error message and the size counts."""
    _fill_missing(db, "files", {"error": None, "chars": 0, "tokens": 0})


# --- a message segment: up to SEGMENT_SIZE messages of one session ----------

message_migrations = Migrations("messages")


@message_migrations.register
def m001_messages_table(db: TinyDB) -> None:
    """Version 1: table ``messages`` (id, role, content, extra metadata)."""


@message_migrations.register
def m002_message_times(db: TinyDB) -> None:
    """Older messages lacked a timestamp."""
    _fill_missing(db, "messages", {"created_at": 0.0})
