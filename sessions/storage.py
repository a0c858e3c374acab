"""A crash-safe JSON storage for TinyDB.

TinyDB's own ``JSONStorage`` rewrites its file in place, so a process killed
mid-write leaves half a JSON document behind. :class:`AtomicJSONStorage`
instead writes a temporary file next to the real one, fsyncs it, renames it
over the old file and fsyncs the directory: at every instant the path holds
either the old complete document or the new one.

It also keeps the parsed document in memory (this process is the only
writer), so reads cost nothing and only writes touch the disk.

A file that cannot be parsed when first read is moved aside to
``<name>.corrupt-<timestamp>`` with a warning, and the storage starts empty.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from tinydb.storages import Storage

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves old or new, never half.

    The temporary file lives in the same directory (a rename is only atomic
    within one filesystem) and is removed if anything fails before the rename.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temp_files(path: Path) -> None:
    """Delete temporary files a killed writer left next to ``path``."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


def quarantine(path: Path, reason: str) -> Path:
    """Move an unreadable file aside to ``<name>.corrupt-<timestamp>`` and log it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    fsync_dir(path.parent)
    log.warning(
        "Session store file %s could not be read (%s); moved it to %s and "
        "started with an empty store. Its data is still in that file.",
        path, reason, target,
    )
    return target


def _check_shape(data: Any) -> None:
    if not isinstance(data, dict) or not all(isinstance(t, dict) for t in data.values()):
        raise ValueError("not a TinyDB document (expected an object of tables)")


def load_json_document(path: Path) -> dict | None:
    """Read a TinyDB JSON file; ``None`` if absent or empty; quarantine if unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if not raw.strip():
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
        _check_shape(data)
    except (UnicodeDecodeError, ValueError) as exc:
        quarantine(path, f"{type(exc).__name__}: {exc}")
        return None
    return data


class AtomicJSONStorage(Storage):
    """TinyDB storage: atomic whole-file writes, in-memory reads.

    ``TinyDB(path, storage=AtomicJSONStorage)``. Not safe for several
    processes writing one file; the session store serialises threads itself.
    """

    def __init__(self, path: str | os.PathLike, **_ignored: Any):
        super().__init__()
        self.path = Path(path)
        self._data: dict | None = None
        self._loaded = False
        remove_stale_temp_files(self.path)

    def read(self) -> dict | None:
        if not self._loaded:
            self._data = load_json_document(self.path)
            self._loaded = True
        return self._data

    def write(self, data: dict) -> None:
        payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        try:
            atomic_write_bytes(self.path, payload.encode("utf-8"))
        except BaseException:
            # TinyDB mutated our cached dict before calling write(); the disk
            # still holds the previous state, so forget the cache and reread.
            self._data, self._loaded = None, False
            raise
        self._data, self._loaded = data, True

    def close(self) -> None:
        self._data, self._loaded = None, False
