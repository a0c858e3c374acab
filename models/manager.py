"""The model manager: one object that owns every loaded model.

- `use(model_id)` hands out a model for one generation, loading it on demand; while in use a
  model is never evicted, and an unload lets it finish on the weights it started with.
- A memory budget in bytes, checked against the dequantized size estimated from the GGUF tensor
  shapes *before* loading; least recently used, unpinned, idle models are evicted to make room.
- Idle unload, pinning, and per-model states `unloaded | loading | loaded | error`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from parsers.units import format_bytes

from .catalog import Catalog, ModelSpec, check_file
from .download import DownloadError, ensure_local
from .gguf_file import GGUFError
from .loader import (LoadedModel, LoadError, LoadOptions, bytes_per_param, load_model, pick_device, pick_dtype,
                     pick_weights)
from .progress import ProgressFn
from .templates import UnknownArchitecture

log = logging.getLogger(__name__)

STATES = ("unloaded", "loading", "loaded", "error")


class ModelError(RuntimeError):
    """A model operation failed; the message is meant for the person who asked."""


class UnknownModel(ModelError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ModelTooLarge(ModelError):
    pass


@dataclass
class _Entry:
    spec: ModelSpec
    state: str = "unloaded"
    loaded: LoadedModel | None = None
    error: str | None = None
    pinned: bool = False
    last_used: float = 0.0
    active: int = 0  # generations running on this model now
    reserved: int = 0  # bytes counted against the budget (estimate while loading, then measured)
    progress: tuple[float, str] = (0.0, "")
    load_finished: threading.Event = field(default_factory=threading.Event)  # set when a load ends, either way


def release_memory() -> None:
    """Return freed tensors to the system: collect cycles and empty the CUDA cache."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass
    try:  # glibc keeps freed small blocks; hand them back so RSS reflects the unload
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


class ModelManager:
    def __init__(self, catalog: Catalog, cache_root: Path, *, memory_budget: int, idle_unload_s: float | None = None,
                 options: LoadOptions = LoadOptions(), loader: Callable[..., LoadedModel] = load_model):
        self.catalog = catalog
        self.cache_root = cache_root
        self.memory_budget = int(memory_budget)
        self.idle_unload_s = idle_unload_s
        self.options = options
        self._loader = loader
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._stop = threading.Event()
        self._idle_thread: threading.Thread | None = None

    # ----- records -------------------------------------------------------------------------
    def records(self) -> list[dict]:
        """Every catalog model, loaded or not, as the README's model record (Gradio API section).

        A model whose file was removed while loaded stays listed (it still holds memory) until unloaded.
        """
        specs = self.catalog.specs()
        listed = {spec.id for spec in specs}
        with self._lock:
            orphans = [e for e in self._entries.values() if e.spec.id not in listed and e.loaded is not None]
        return [self._record(self._entry(spec.id, spec)) for spec in specs] + [self._record(e) for e in orphans]

    def record(self, model_id: str) -> dict:
        return self._record(self._entry(model_id))

    def loading(self) -> list[dict]:
        """The models loading now: `{"id", "progress", "message"}` each (progress from 0 to 1)."""
        with self._lock:
            return [{"id": model_id, "progress": entry.progress[0], "message": entry.progress[1]}
                    for model_id, entry in self._entries.items() if entry.state == "loading"]

    def memory_used(self) -> int:
        with self._lock:
            return sum(e.reserved for e in self._entries.values())

    def _record(self, entry: _Entry) -> dict:
        info = self.catalog.describe(entry.spec)
        with self._lock:
            state, error = entry.state, entry.error
            if state == "unloaded" and info["file_error"]:
                state, error = "error", info["file_error"]
            loaded = entry.loaded
            if loaded is not None and entry.spec.path is not None and not info["on_disk"]:
                error = f"{entry.spec.path.name} was removed from disk; the model stays loaded until unloaded"
            record = {
                "id": entry.spec.id, "name": entry.spec.name, "state": state,
                "architecture": info["architecture"], "quantization": info["quantization"],
                "file_size_bytes": info["file_size_bytes"],
                "memory_bytes": loaded.memory_bytes if loaded else self._estimate_or_zero(entry.spec),
                "pinned": entry.pinned, "error": error,
                "kind": info["kind"], "on_disk": info["on_disk"], "default": entry.spec.default,
                "context_length": loaded.context_length if loaded else info["context_length"],
                "progress": entry.progress[0] if state == "loading" else None,
                "progress_message": entry.progress[1] if state == "loading" else None,
                "active_generations": entry.active,
                "weights": loaded.weights if loaded else self._weights_mode(),
                "instruct": info["instruct"], "recommended": entry.spec.recommended,
                "download_bytes": entry.spec.size_bytes if entry.spec.hub_repo else None,
            }
        if entry.spec.remote:
            record.update(state="loaded" if state != "error" else state, memory_bytes=0, weights=None)
        return record

    def _weights_mode(self) -> str | None:
        """How a load with this manager's options holds the weights: "quantized" or "dense"."""
        try:
            return pick_weights(pick_device(self.options.device), self.options)
        except LoadError:
            return None

    def _estimate_or_zero(self, spec: ModelSpec) -> int:
        try:
            return self.estimate(spec)
        except (GGUFError, OSError):
            return 0

    def estimate(self, spec: ModelSpec) -> int:
        """Bytes the model will take once loaded, from its tensor shapes and the dtype it loads in."""
        header = self.catalog.header(spec)
        return 0 if header is None else self._estimate_header(header)

    def _estimate_header(self, header) -> int:
        device = pick_device(self.options.device)
        if pick_weights(device, self.options) == "quantized":
            return header.estimate_memory(None)
        dtype = pick_dtype(device, self.options.dtype)
        return header.estimate_memory(bytes_per_param(dtype, self.options.quantization))

    def _entry(self, model_id: str, spec: ModelSpec | None = None) -> _Entry:
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                return entry
        spec = spec or self.catalog.get(model_id)
        if spec is None:
            raise UnknownModel(f"Unknown model {model_id!r}. Known models: "
                               + ", ".join(s.id for s in self.catalog.specs()))
        with self._lock:
            return self._entries.setdefault(model_id, _Entry(spec))

    # ----- load / unload ---------------------------------------------------------------------
    def load(self, model_id: str, progress: ProgressFn | None = None) -> dict:
        """Load a model (waiting for a load already under way); raise `ModelError` on failure."""
        self._ensure_loaded(self._entry(model_id), progress)
        return self.record(model_id)

    def unload(self, model_id: str) -> dict:
        """Drop the manager's reference. Generations running on it finish first, then it is freed."""
        entry = self._entry(model_id)
        with self._lock:
            if entry.state == "loading":
                raise ModelError(f"{entry.spec.name} is loading; unload it once it has loaded")
            entry.loaded = None
            entry.state, entry.error, entry.reserved = "unloaded", None, 0
        release_memory()
        return self.record(model_id)

    def pin(self, model_id: str, pinned: bool = True) -> dict:
        """A pinned model is never evicted for room nor unloaded when idle."""
        entry = self._entry(model_id)
        with self._lock:
            entry.pinned = bool(pinned)
        return self.record(model_id)

    @contextmanager
    def use(self, model_id: str, progress: ProgressFn | None = None) -> Iterator[LoadedModel | ModelSpec]:
        """The model for one generation. Yields the `ModelSpec` itself for remote engines."""
        entry = self._entry(model_id)
        if entry.spec.remote:
            yield entry.spec
            return
        while True:
            self._ensure_loaded(entry, progress)
            with self._lock:
                if entry.state == "loaded" and entry.loaded is not None:
                    model = entry.loaded
                    entry.active += 1
                    entry.last_used = time.monotonic()
                    break
        try:
            yield model
        finally:
            with self._lock:
                entry.active -= 1
                entry.last_used = time.monotonic()

    def _ensure_loaded(self, entry: _Entry, progress: ProgressFn | None) -> None:
        with self._lock:
            if entry.spec.remote or entry.state == "loaded":
                return
            if entry.state == "loading":
                load_finished, owner = entry.load_finished, False
            else:
                entry.state, entry.error, entry.load_finished = "loading", None, threading.Event()
                entry.progress = (0.0, "starting")
                load_finished, owner = entry.load_finished, True
        if not owner:
            load_finished.wait()
            with self._lock:
                if entry.state == "error":
                    raise ModelError(entry.error)
                retry = entry.state != "loaded"
            if retry:  # unloaded in between: try again, outside the lock (a retry may wait or load)
                self._ensure_loaded(entry, progress)
            return
        try:
            loaded = self._load_entry(entry, progress)
        except Exception as error:
            message = _describe_failure(entry.spec, error)
            log.warning("loading %s failed: %s", entry.spec.id, message)
            with self._lock:
                entry.state, entry.error, entry.reserved, entry.loaded = "error", message, 0, None
                entry.load_finished.set()
            release_memory()
            if isinstance(error, ModelError):  # already says it (ModelTooLarge): keep its type for callers
                raise
            raise ModelError(message) from error
        with self._lock:
            entry.loaded, entry.state = loaded, "loaded"
            # keep the estimate's working margin (KV cache, activations) reserved: the weights alone
            # would let the budget admit models that cannot all generate at once
            entry.reserved = max(entry.reserved, loaded.memory_bytes)
            entry.last_used = time.monotonic()
            entry.load_finished.set()

    def _load_entry(self, entry: _Entry, progress: ProgressFn | None) -> LoadedModel:
        def report(fraction: float, message: str) -> None:
            entry.progress = (fraction, message)
            if progress:
                progress(fraction, message)

        path = ensure_local(entry.spec, lambda f, m: report(0.3 * f, m))
        header = self.catalog.header_at(path)
        problem = check_file(entry.spec, header)
        if problem:  # another model's file under this name: refuse it rather than serve it under a wrong name
            raise ModelError(problem)
        self._make_room(entry, self._estimate_header(header))
        return self._loader(path, self.cache_root, self.options, progress=report, header=header)

    def _make_room(self, entry: _Entry, needed: int) -> None:
        """Reserve `needed` bytes for `entry`, evicting LRU idle unpinned models; refuse if impossible."""
        with self._lock:
            if needed > self.memory_budget:
                raise ModelTooLarge(
                    f"{entry.spec.name} needs about {format_bytes(needed)}, more than the whole memory budget "
                    f"of {format_bytes(self.memory_budget)} (raise it with --memory-budget)")
            others = [e for e in self._entries.values() if e is not entry and e.reserved]
            free = self.memory_budget - sum(e.reserved for e in others)
            evictable = sorted((e for e in others if e.state == "loaded" and not e.pinned and e.active == 0),
                               key=lambda e: e.last_used)
            victims = []
            while free < needed and evictable:
                victim = evictable.pop(0)
                victims.append(victim)
                free += victim.reserved
            if free < needed:
                held = ", ".join(f"{e.spec.id} ({format_bytes(e.reserved)}"
                                 f"{', pinned' if e.pinned else ''}{', busy' if e.active else ''})" for e in others)
                raise ModelTooLarge(
                    f"{entry.spec.name} needs about {format_bytes(needed)} but only {format_bytes(free)} of the "
                    f"{format_bytes(self.memory_budget)} budget can be freed; in use: {held}")
            for victim in victims:
                log.info("evicting %s to make room for %s", victim.spec.id, entry.spec.id)
                victim.loaded, victim.state, victim.reserved = None, "unloaded", 0
            entry.reserved = needed
        if victims:
            release_memory()

    # ----- idle unload -------------------------------------------------------------------------
    def sweep_idle(self, now: float | None = None) -> list[str]:
        """Unload every unpinned model idle for longer than `idle_unload_s`; return their ids."""
        if not self.idle_unload_s:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [e for e in self._entries.values() if e.state == "loaded" and not e.pinned and e.active == 0
                    and now - e.last_used > self.idle_unload_s]
            for entry in idle:
                entry.loaded, entry.state, entry.reserved = None, "unloaded", 0
        if idle:
            release_memory()
            log.info("unloaded idle models: %s", ", ".join(e.spec.id for e in idle))
        return [e.spec.id for e in idle]

    def start_idle_timer(self, interval_s: float = 30.0) -> None:
        if not self.idle_unload_s or self._idle_thread:
            return

        def run() -> None:
            while not self._stop.wait(min(interval_s, self.idle_unload_s)):
                self.sweep_idle()

        self._idle_thread = threading.Thread(target=run, name="idle-unload", daemon=True)
        self._idle_thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for entry in self._entries.values():
                entry.loaded, entry.reserved = None, 0
                if entry.state == "loaded":
                    entry.state = "unloaded"
        release_memory()


def _describe_failure(spec: ModelSpec, error: Exception) -> str:
    if isinstance(error, (ModelError, DownloadError, LoadError, GGUFError, UnknownArchitecture)):
        return str(error)
    if isinstance(error, MemoryError):
        return f"{spec.name} ran out of memory while loading"
    return f"{spec.name} failed to load: {type(error).__name__}: {error}"
