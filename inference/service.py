"""ChatService: the one set of functions behind the UI, the Gradio API and the /v1 routes.

It wires the model manager, the engine, the session store and the parse pool together, and
owns per-request state (cancel events). It knows nothing of Gradio components or HTTP.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from models.catalog import Catalog, ModelSpec, assemble_default_model, parse_remote_option, slug
from models.download import DownloadError, ensure_local, hub_unreachable, is_offline
from models.loader import LoadOptions, import_model_code, prepare_kernels
from models.manager import ModelError, ModelManager
from parsers import ParseError, ParseLimits, describe_supported, is_supported
from parsers.pool import ParsePool
from sessions import (ContextDocument, DocumentCache, SessionStore, assemble_context, session_context,
                      session_documents)
from sessions.export import ExportFiles, export_json, export_markdown, import_json
from sessions.files import TooMuchText
from parsers.units import format_bytes

from .config import AppConfig, default_memory_budget
from .engine import Busy, Engine
from .generate import Chunk, PromptTooLong
from .params import GenerationParams, InvalidParams, parse_settings, split_settings
from .peers import approx_tokens

log = logging.getLogger(__name__)

SESSION_TEXT_PER_FILE_LIMIT = 2  # a session's files together hold at most this many times one file's text limit


class ServiceError(ValueError):
    """A request the service refuses; the message is for the person who sent it."""


@dataclass
class ChatUpdate:
    """The reply so far, as the UI and /chat stream it."""

    text: str  # the whole reply so far
    delta: str = ""
    done: bool = False
    finish_reason: str | None = None
    report: dict = field(default_factory=dict)  # context report: tokens, what was left out
    stats: dict = field(default_factory=dict)  # tokens, tokens_per_second, ttft


_frozen = False


def freeze_imports() -> None:
    """Once per process: what it imported so far lives as long as it does, so after one collection it is
    moved out of the collector's way (`gc.freeze`): a full collection no longer walks its ~170k objects
    (~0.1 s inside a model load, most of an unload's time)."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


class ChatService:
    def __init__(self, config: AppConfig):
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        extra = [parse_remote_option(value) for value in config.remotes]
        self.catalog = Catalog(config.data_dir, extra=extra)
        budget = config.memory_budget or default_memory_budget()
        self.manager = ModelManager(
            self.catalog, config.cache_dir, memory_budget=budget, idle_unload_s=config.idle_unload_s,
            options=LoadOptions(max_context=config.max_context, weights=config.weights, kernels=config.kernels),
        )
        self.engine = Engine(max_concurrent=config.max_concurrent_generations, max_queue=config.max_queue,
                             batching=config.batching,
                             prefix_cache_bytes=config.prefix_cache_bytes if config.prefix_cache else 0)
        self.store = SessionStore(config.data_dir, max_sessions_per_owner=config.max_sessions_per_user)
        self.store.on_delete.append(self.engine.forget_session)
        limits = ParseLimits.for_uploads(config.max_upload_bytes, timeout_s=config.parse_timeout_s)
        self.parse_pool = ParsePool(max_workers=config.parse_workers, limits=limits)
        # The text of a session's ready files together: twice what one file may hold. Every turn reads it.
        self.max_session_chars = SESSION_TEXT_PER_FILE_LIMIT * limits.max_chars
        self._cancels: dict[str, threading.Event] = {}
        self._cancels_lock = threading.Lock()
        self.documents = DocumentCache()  # token counts, chunks and BM25 postings per file and model, across turns
        self.exports: ExportFiles | None = None  # set by keep_exports_in: where export files are handed out

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Get ready to serve: kernels, bundled model, interrupted uploads, model code, timers, preload."""
        prepare_kernels(self.config.cache_dir, self.manager.options)
        try:
            assemble_default_model(self.config.models_dir)
        except Exception as error:  # the app still serves other models and sessions
            log.error("could not assemble the bundled default model: %s", error)
        recovered = self.store.mark_interrupted_uploads()
        if recovered:
            log.warning("%d upload(s) were interrupted by a restart and are marked as failed", recovered)
        self.manager.start_idle_timer()
        log.info("imported the model code in %.1f s", import_model_code(self.manager.options))
        freeze_imports()
        if self.config.preload:
            threading.Thread(target=self._preload, name="preload", daemon=True).start()

    def _preload(self) -> None:
        try:
            self.manager.load(self.config.default_model)
        except ModelError as error:
            log.warning("preloading %s failed: %s", self.config.default_model, error)

    def close(self) -> None:
        if self.exports is not None:
            self.exports.close()
        self.parse_pool.shutdown()
        self.manager.close()

    # ----- models ------------------------------------------------------------------------------
    def list_models(self) -> list[dict]:
        return self.manager.records()

    def load_model(self, model_id: str, progress=None) -> dict:
        return self.manager.load(_required(model_id, "model_id"), progress)

    def unload_model(self, model_id: str) -> dict:
        return self.manager.unload(_required(model_id, "model_id"))

    def pin_model(self, model_id: str, pinned: bool) -> dict:
        return self.manager.pin(_required(model_id, "model_id"), pinned)

    def model_record(self, model_id: str) -> dict:
        """One model's record (state, size, context length); an unknown id raises ModelError."""
        return self.manager.record(_required(model_id, "model_id"))

    def model_details(self, model_id: str) -> dict:
        """A model's record with what its GGUF header says besides: `parameter_count`, `chat_template`
        (the file's own, or None), and `modified_at` (the file's mtime; None when not on disk)."""
        record = self.model_record(model_id)
        details = {**record, "parameter_count": None, "chat_template": None, "modified_at": None}
        spec = self.catalog.get(record["id"])
        if spec is None or spec.path is None or not record["on_disk"]:
            return details
        try:
            header = self.catalog.header(spec)
            details["modified_at"] = spec.path.stat().st_mtime
        except (OSError, ValueError):  # unreadable or removed meanwhile: the record already says so
            return details
        if header is not None:
            details.update(parameter_count=header.n_parameters, chat_template=header.chat_template)
        return details

    def pull_target(self, name: str) -> ModelSpec:
        """What a pull of `name` fetches: a catalog model, or `hf.co/OWNER/REPO/FILE.gguf` /
        `hf.co/OWNER/REPO:QUANT` (the repository's GGUF whose name has QUANT) from the Hugging Face hub.

        Raises `UnknownModel` for a name that is neither, `DownloadError` when the file is missing and
        the hub cannot be reached (offline), `ServiceError` for a hub name that names no GGUF file.
        """
        name = _required(name, "model")
        if not name.startswith(("hf.co/", "huggingface.co/")):
            self.manager.record(name)  # UnknownModel for an id the catalog lacks
            spec = self.catalog.get(name)
            if spec is None:  # loaded, then dropped from the catalog: nothing to fetch
                raise ServiceError(f"{name} is no longer in the catalog")
            if spec.hub_repo and not spec.path.exists():
                _check_online(f"{spec.name} is not on disk and")
            return spec
        reference, _, quant = name.split("/", 1)[1].partition(":")
        parts = reference.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ServiceError(f"{name!r}: expected hf.co/OWNER/REPO:QUANT or hf.co/OWNER/REPO/FILE.gguf")
        repo_id, file_name = "/".join(parts[:2]), parts[2] if len(parts) == 3 else ""
        if not file_name:
            file_name = self._hub_gguf(repo_id, quant or "Q4_K_M")
        if "/" in file_name or not file_name.lower().endswith(".gguf"):
            raise ServiceError(f"{name!r}: the file must be a .gguf at the top of the repository")
        path = self.config.models_dir / file_name
        return ModelSpec(slug(path.stem), path.stem, path, hub_repo=repo_id, hub_file=file_name)

    def _hub_gguf(self, repo_id: str, quant: str) -> str:
        """The name of the GGUF file in hub repository `repo_id` whose name has `quant` (e.g. Q4_K_M)."""
        _check_online(f"cannot look up {repo_id} on the Hugging Face hub (download its .gguf file into "
                      f"{self.config.models_dir}/ instead):")
        from huggingface_hub import list_repo_files

        try:
            files = list_repo_files(repo_id)
        except Exception as error:  # no such repository, no access, network: one clear message
            raise DownloadError(f"could not list {repo_id} on the Hugging Face hub ({type(error).__name__}: "
                                f"{error})") from error
        matches = [f for f in files if f.lower().endswith(".gguf") and quant.lower() in f.lower() and "/" not in f]
        if not matches:
            raise ServiceError(f"{repo_id} has no .gguf file named with {quant!r} at its top level")
        return sorted(matches, key=len)[0]

    def pull(self, spec: ModelSpec, progress=None) -> dict:
        """Make sure `spec`'s file is on disk (downloading it with `progress(fraction, message)` if not,
        as a first load would) without loading it; return its model record."""
        if spec.path is not None and not spec.remote:
            ensure_local(spec, progress)
        return self.model_record(spec.id)

    def memory_status(self) -> dict:
        return {"used_bytes": self.manager.memory_used(), "budget_bytes": self.manager.memory_budget}

    def recommended_model(self) -> dict | None:
        """The record of the catalog's recommended first download for chat (an instruct model), if any."""
        return next((m for m in self.list_models() if m.get("recommended")), None)

    def use_model(self, owner: str, session_id: str, model_id: str, progress=None) -> dict:
        """Load a model (downloading it first if needed), then make it the session's model."""
        record = self.load_model(model_id, progress)
        self.update_session(owner, session_id, model_id=model_id)
        return record

    def busy(self) -> bool:
        """Whether a model is loading or a generation runs or waits (cheap: no catalog scan)."""
        return bool(self.manager.loading()) or not self.engine.idle

    def health(self) -> dict:
        """What /health reports: whether a model can answer now, and which are loading (with progress)."""
        models = self.list_models()
        loading = self.manager.loading()
        return {
            "ready": any(m["state"] == "loaded" for m in models),  # a loaded local model, or a remote engine
            "loading": [m["id"] for m in loading],
            "loading_progress": {m["id"]: {"progress": m["progress"], "message": m["message"]} for m in loading},
            "default_model": self.config.default_model,
            "models_loaded": sum(m["state"] == "loaded" and m["kind"] == "local" for m in models),
            "memory": self.memory_status(),
        }

    # ----- sessions ----------------------------------------------------------------------------
    def new_session(self, owner: str, title: str = "", model_id: str = "") -> dict:
        model_id = model_id or self.config.default_model
        self.manager.record(model_id)  # unknown ids fail here, not at the first message
        return self.store.create(owner, title=title or "", model_id=model_id)

    def list_sessions(self, owner: str) -> list[dict]:
        return self.store.list(owner)

    def get_session(self, owner: str, session_id: str) -> dict:
        return self.store.get(owner, _required(session_id, "session_id"))

    def session_owner(self, session_id: str) -> str | None:
        """Who owns a session, or None for an unknown id (the /v1 router binds a session by id alone)."""
        return self.store.owner_of(session_id)

    def rename_session(self, owner: str, session_id: str, title: str) -> dict:
        return self.store.rename(owner, _required(session_id, "session_id"), title)

    def update_session(self, owner: str, session_id: str, *, model_id: str | None = None,
                       settings: dict | None = None, system_prompt: str | None = None) -> dict:
        if model_id:
            self.manager.record(model_id)
        if settings is not None:
            settings = parse_settings(settings)
        return self.store.update(owner, session_id, model_id=model_id or None, settings=settings,
                                 system_prompt=system_prompt)

    def delete_session(self, owner: str, session_id: str) -> dict:
        self.stop(owner, session_id)
        self.store.delete(owner, _required(session_id, "session_id"))
        return {"deleted": session_id}

    def history(self, owner: str, session_id: str) -> list[dict]:
        return self.store.history(owner, _required(session_id, "session_id"))

    def messages(self, owner: str, session_id: str) -> list[dict]:
        return self.store.messages(owner, session_id)

    def clear_history(self, owner: str, session_id: str) -> None:
        self.store.clear_messages(owner, session_id)

    def export_session(self, owner: str, session_id: str, kind: str) -> str:
        """The session as text: Markdown (`kind` "md") or the JSON export that `import_session` reads back."""
        session_id = _required(session_id, "session_id")
        if kind == "md":
            return export_markdown(self.store, owner, session_id)
        return json.dumps(export_json(self.store, owner, session_id), indent=2, ensure_ascii=False)

    def keep_exports_in(self, folder: Path) -> None:
        """Hand export files out from `folder` (the app's file route serves it): each goes with its session,
        and after EXPORT_MAX_AGE_S on a timer. Only the first folder given counts."""
        if self.exports is None:
            self.exports = ExportFiles(folder)
            self.store.on_delete.append(self.exports.forget_session)
            self.exports.start_timer()

    def export_file(self, owner: str, session_id: str, kind: str) -> Path:
        """The session's export (`kind` as in `export_session`) as a file of its own, known with its owner."""
        if self.exports is None:
            raise ServiceError("exports are not set up (keep_exports_in)")
        text = self.export_session(owner, session_id, kind)
        return self.exports.write(owner, session_id.strip(), "chat.md" if kind == "md" else "chat.json", text)

    def export_owner(self, path) -> str | None:
        """Who may download the export at `path`; None for a path that is not a live export."""
        return self.exports.owner_of(path) if self.exports is not None else None

    def is_export_path(self, path) -> bool:
        """True for any path in the export area: never a client's upload, whoever names it."""
        return self.exports is not None and self.exports.holds(path)

    def import_session(self, owner: str, data: str | bytes) -> dict:
        """A new session from a JSON export; raises StoreError (a ValueError) if `data` is not one."""
        return import_json(self.store, owner, data)

    # ----- chat --------------------------------------------------------------------------------
    def chat(self, owner: str, session_id: str, message: str, model_id: str = "",
             settings: str | dict | None = "", regenerate: bool = False,
             cancel_event: threading.Event | None = None, admission=None) -> Iterator[ChatUpdate]:
        """Stream the assistant's reply to `message` in a session, storing both turns.

        With `regenerate`, the last assistant reply is dropped and the last user message is answered
        again (`message` is then ignored). `admission`: a generation slot the caller already holds
        (see `Engine.stream_chat`); without one, the turn waits for a slot.
        """
        session = self.store.get(owner, _required(session_id, "session_id"))
        for name, value in (("message", message), ("model_id", model_id)):
            if value is not None and not isinstance(value, str):  # the Gradio API passes JSON values through
                raise ServiceError(f"{name} must be text, not {type(value).__name__}")
        merged = {**(session.get("settings") or {}), **parse_settings(settings)}
        params, system_prompt = split_settings(merged, max_tokens_limit=self.config.max_tokens_limit)
        system_prompt = system_prompt if system_prompt is not None else session.get("system_prompt") or ""
        model_id = model_id or session.get("model_id") or self.config.default_model
        self.manager.record(model_id)  # an unknown model fails before anything is stored or dropped
        replace_from = None  # regenerate: the id of the last user message, dropped once the engine admits us
        if regenerate:
            replace_from, message = self._last_user_message(owner, session_id)
        message = (message or "").strip()
        if not message:
            raise ServiceError("the message is empty")
        if len(message) > self.config.max_prompt_chars:
            raise ServiceError(f"the message is {len(message):,} characters; the limit is "
                               f"{self.config.max_prompt_chars:,}")
        cancel = self._new_cancel(session_id, cancel_event)
        try:
            yield from self._chat_turn(owner, session, message, model_id, params, system_prompt, cancel,
                                       replace_from, admission)
        finally:
            self._drop_cancel(session_id, cancel)

    def _chat_turn(self, owner, session, message, model_id, params, system_prompt, cancel, replace_from=None,
                   admission=None):
        session_id = session["id"]
        with self.manager.use(model_id) as lm:
            context = self.engine.context_limit(lm)
            try:
                assembled = session_context(
                    self.store, owner, session_id, message, system_prompt=system_prompt,
                    before_message_id=replace_from, count_tokens=self.engine.token_counter(lm),
                    context_limit=context, reply_budget=min(params.max_tokens, max(16, context // 4)),
                    cache=self.documents, tokenizer_key=model_id,
                )
            except ValueError as error:
                raise ServiceError(str(error)) from error
            stream = self.engine.stream_chat(lm, assembled.messages, params, cancel, session_id=session_id,
                                             admission=admission)
            # Admission (Busy) and prompt checks happen at the first chunk: take it before storing anything,
            # so a refused request leaves the history exactly as it was.
            first = next(stream, None)
            if replace_from is not None:
                self.store.delete_messages_from(owner, session_id, replace_from)
            self.store.add_message(owner, session_id, "user", message)
            if session.get("model_id") != model_id:
                self.store.update(owner, session_id, model_id=model_id)
            text, last = "", Chunk()
            try:
                yield ChatUpdate(text="", report=assembled.report)
                for chunk in itertools.chain([first] if first is not None else [], stream):
                    text += chunk.text
                    last = chunk
                    if chunk.finish_reason is None:
                        yield ChatUpdate(text=text, delta=chunk.text, report=assembled.report)
            except GeneratorExit:
                # The caller went away (a closed tab, a dropped /v1 client): stop at once, keep what was written.
                cancel.set()
                stream.close()
                self._store_partial(owner, session_id, model_id, text, last, assembled.report, "cancelled")
                raise
            except Exception:
                # The generation failed part-way: store what it wrote, so the user turn is not left unanswered.
                self._store_partial(owner, session_id, model_id, text, last, assembled.report, "error")
                raise
        report, stats = self._store_reply(owner, session_id, model_id, text, last, assembled.report)
        yield ChatUpdate(text=text, delta=last.text, done=True, finish_reason=last.finish_reason,
                         report=report, stats=stats)

    def _store_reply(self, owner, session_id, model_id, text, last: Chunk, report: dict) -> tuple[dict, dict]:
        """Store the assistant's reply with its context report and stats; return both."""
        report = {**report, "prompt_tokens": last.prompt_tokens or report.get("prompt_tokens")}
        stats = {"completion_tokens": last.completion_tokens, "prompt_tokens": last.prompt_tokens,
                 "finish_reason": last.finish_reason, **{k: round(v, 3) for k, v in last.timings.items()}}
        self.store.add_message(owner, session_id, "assistant", text, model_id=model_id,
                               tokens=last.completion_tokens, context_report=report, stats=stats)
        return report, stats

    def _store_partial(self, owner, session_id, model_id, text, last: Chunk, report: dict, reason: str) -> None:
        """Store a reply cut short, marked with `reason`, unless its session was deleted meanwhile."""
        try:
            self._store_reply(owner, session_id, model_id, text, dataclasses.replace(last, finish_reason=reason),
                              report)
        except KeyError:
            pass

    def _last_user_message(self, owner: str, session_id: str) -> tuple[str, str]:
        """(id, content) of the last user message: what a regenerate answers again."""
        users = [m for m in self.store.messages(owner, session_id) if m["role"] == "user"]
        if not users:
            raise ServiceError("there is no message to regenerate a reply for")
        return users[-1]["id"], users[-1]["content"]

    def last_reply(self, owner: str, session_id: str) -> dict:
        """The last reply's context report (what went into the prompt, what was left out) and stats."""
        replies = [m for m in self.store.messages(owner, _required(session_id, "session_id"))
                   if m["role"] == "assistant"]
        if not replies:
            return {"context_report": None, "stats": None, "model_id": None}
        last = replies[-1]
        return {"context_report": last.get("context_report"), "stats": last.get("stats"),
                "model_id": last.get("model_id")}

    def stop(self, owner: str, session_id: str) -> dict:
        """Stop the session's running generation, if any; the forward loop ends within one token."""
        self.store.get(owner, _required(session_id, "session_id"))
        with self._cancels_lock:
            event = self._cancels.get(session_id)
        if event is None:
            return {"stopped": False}
        event.set()
        return {"stopped": True}

    def _new_cancel(self, session_id: str, event: threading.Event | None = None) -> threading.Event:
        event = event or threading.Event()
        with self._cancels_lock:
            previous = self._cancels.get(session_id)
            if previous is not None:  # one generation per session: a new message stops the old one
                previous.set()
            self._cancels[session_id] = event
        return event

    def _drop_cancel(self, session_id: str, event: threading.Event) -> None:
        with self._cancels_lock:
            if self._cancels.get(session_id) is event:
                del self._cancels[session_id]

    # ----- files -------------------------------------------------------------------------------
    def upload_file(self, owner: str, session_id: str, source: str | Path, name: str | None = None) -> dict:
        """Store an upload in the session and parse it in the background; returns at once."""
        self.store.get(owner, _required(session_id, "session_id"))
        source = Path(source)
        name = name or source.name
        if not is_supported(name):
            raise ServiceError(f"{name}: unsupported file type. {describe_supported()}")
        if len(self.store.list_files(owner, session_id)) >= self.config.max_files_per_session:
            raise ServiceError(f"this session already has {self.config.max_files_per_session} files; "
                               "remove one first")
        size = source.stat().st_size
        if size > self.config.max_upload_bytes:
            raise ServiceError(f"{name} is {format_bytes(size)}; the limit is "
                               f"{format_bytes(self.config.max_upload_bytes)}")
        target = self.store.safe_upload_path(owner, session_id, name)
        try:
            shutil.copyfile(source, target)
            # the limit again, under the store's lock: concurrent uploads all passed the check above
            record = self.store.add_file(owner, session_id, name, str(target),
                                         max_files=self.config.max_files_per_session)
        except BaseException:
            target.unlink(missing_ok=True)  # refused or failed: leave no unlisted bytes behind
            raise
        future = self.parse_pool.submit(target, name=name)
        future.add_done_callback(lambda f: self._parsed(owner, session_id, record["id"], target, f))
        return record

    def _parsed(self, owner: str, session_id: str, file_id: str, stored: Path, future) -> None:
        try:
            document = future.result()
        except ParseError as error:
            self._set_file_state(owner, session_id, file_id, error=str(error))
            return
        except Exception as error:  # the pool turns failures into ParseError; this is a last guard
            self._set_file_state(owner, session_id, file_id, error=f"parsing failed: {error}")
            return
        self._set_file_state(owner, session_id, file_id, document=document)

    def _set_file_state(self, owner, session_id, file_id, document=None, error=None) -> None:
        try:
            if document is not None:
                tokens = self._count_tokens_approx(document.text)
                files = self.store.list_files(owner, session_id)
                others = sum(f["chars"] or 0 for f in files if f["state"] == "ready" and f["id"] != file_id)
                if others + len(document.text) <= self.max_session_chars:  # else refused just below
                    name = next((f["name"] for f in files if f["id"] == file_id), "")
                    self._prepare_documents(owner, session_id, ContextDocument(file_id, name, document.text,
                                                                               document.metadata))
                try:
                    self.store.set_file_ready(owner, session_id, file_id, document.text, document.metadata, tokens,
                                              max_session_chars=self.max_session_chars)
                except TooMuchText as too_much:
                    self.store.set_file_error(owner, session_id, file_id, str(too_much))
                    return
            else:
                self.store.set_file_error(owner, session_id, file_id, error)
        except KeyError:
            pass  # the file or its session was removed while it parsed

    def _prepare_documents(self, owner: str, session_id: str, document: ContextDocument) -> None:
        """At parse time, before the file is ready, rather than at the next turn: what assembling a prompt
        computes per document (chunks, their BM25 index, the token counts it needs) for the session's model,
        when that model is loaded; kept in `documents` for the turns. (A model loaded later does this at
        its first turn.)"""
        try:
            model_id = self.store.get(owner, session_id).get("model_id") or self.config.default_model
            if self.manager.record(model_id)["state"] != "loaded":
                return
            with self.manager.use(model_id) as lm:
                context = self.engine.context_limit(lm)
                assemble_context(system_prompt="", documents=[*session_documents(self.store, owner, session_id),
                                                              document],
                                 history=[], question="?", count_tokens=self.engine.token_counter(lm),
                                 context_limit=context, reply_budget=max(16, context // 4), cache=self.documents,
                                 tokenizer_key=model_id)
        except (KeyError, ValueError, ModelError) as error:  # gone meanwhile, or a failing model: the turn will say
            log.debug("documents of session %s not prepared: %s", session_id, error)

    def _count_tokens_approx(self, text: str) -> int:
        """About four characters a token: the file list's estimate. Prompts are counted exactly, with the
        model's own tokenizer, when they are assembled."""
        return approx_tokens(text)

    def list_files(self, owner: str, session_id: str) -> list[dict]:
        return self.store.list_files(owner, _required(session_id, "session_id"))

    def remove_file(self, owner: str, session_id: str, file_id: str) -> dict:
        self.store.remove_file(owner, _required(session_id, "session_id"), _required(file_id, "file_id"))
        self.documents.forget(file_id)
        return {"removed": file_id}

    # ----- one-shot completions (the /v1 API) ----------------------------------------------------
    def complete(self, model_id: str, messages, params: GenerationParams,
                 cancel: threading.Event | None = None, admission=None) -> Iterator[Chunk]:
        """Stream a reply to OpenAI-style `messages` with no session attached (`admission`: as in `chat`);
        a string instead of messages is a raw prompt, given to the model without its chat template; a
        `peers.FillIn`, a raw prompt with a hole for a code model to fill."""
        if not model_id:
            raise ServiceError("model is required")
        with self.manager.use(model_id) as lm:
            yield from self.engine.stream_chat(lm, messages, params, cancel or threading.Event(),
                                               admission=admission)


def _check_online(what: str) -> None:
    """Raise `DownloadError` ("<what> the app is offline (why)") when the hub cannot be reached."""
    why = "HF_HUB_OFFLINE=1" if is_offline() else hub_unreachable()
    if why:
        raise DownloadError(f"{what} the app is offline ({why})")


def _required(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ServiceError(f"{name} is required")
    return value.strip()


__all__ = ["ChatService", "ChatUpdate", "ServiceError", "Busy", "InvalidParams", "PromptTooLong", "ModelError"]
