"""A session's messages, kept in segment files of a bounded size.

Each write to a TinyDB file rewrites the whole file (that is what makes it
atomic), so one file holding a long history would make every append slower
than the last. Messages therefore live in ``messages-000000.json``,
``messages-000001.json``, ... of at most ``SEGMENT_SIZE`` messages each; an
append rewrites only the last segment, so its cost stays flat however long
the history grows.

Removing messages (regenerate, clear) works from the newest segment
backwards, so a crash part-way leaves a shorter history, never a gap.
"""

from __future__ import annotations

from pathlib import Path

from tinydb import TinyDB
from tinydb.table import Document

from .migrations import message_migrations, open_db
from .storage import fsync_dir

SEGMENT_SIZE = 200
SEGMENT_PATTERN = "messages-*.json"


class MessageLog:
    """Append-mostly list of message dicts over segment TinyDB files."""

    def __init__(self, folder: Path, segment_size: int | None = None):
        self.folder = folder
        self.segment_size = segment_size or SEGMENT_SIZE
        paths = sorted(folder.glob(SEGMENT_PATTERN)) if folder.is_dir() else []
        self._segments: list[TinyDB] = [open_db(p, message_migrations) for p in paths]

    def __len__(self) -> int:
        return sum(len(seg.table("messages")) for seg in self._segments)

    def all(self) -> list[Document]:
        """Every message, oldest first (the stored documents: copy before handing out)."""
        out: list[Document] = []
        for seg in self._segments:
            out.extend(sorted(seg.table("messages").all(), key=lambda d: d.doc_id))
        return out

    def append(self, message: dict) -> None:
        """Add a message at the end; durable when this returns."""
        if not self._segments or len(self._segments[-1].table("messages")) >= self.segment_size:
            self._segments.append(self._new_segment())
        self._segments[-1].table("messages").insert(message)

    def truncate_from(self, index: int) -> int:
        """Remove messages ``[index:]``; return how many went."""
        removed = 0
        start = len(self)
        while self._segments:
            table = self._segments[-1].table("messages")
            start -= len(table)
            if start >= index:  # the whole segment goes
                removed += len(table)
                self._drop_last_segment()
                continue
            doomed = sorted(d.doc_id for d in table.all())[index - start:]
            if doomed:
                table.remove(doc_ids=doomed)
                removed += len(doomed)
            break
        return removed

    def close(self) -> None:
        for seg in self._segments:
            seg.close()

    def _new_segment(self) -> TinyDB:
        number = int(self._segments[-1].storage.path.stem.split("-")[1]) + 1 if self._segments else 0
        self.folder.mkdir(parents=True, exist_ok=True)
        return open_db(self.folder / f"messages-{number:06d}.json", message_migrations)

    def _drop_last_segment(self) -> None:
        seg = self._segments.pop()
        seg.close()
        seg.storage.path.unlink(missing_ok=True)
        fsync_dir(self.folder)
