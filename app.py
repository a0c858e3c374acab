"""Local LLM chat: the Gradio UI, the Gradio API and the /v1 routes, wired to one ChatService.

Run `python app.py --help` for the options. This module holds UI and wiring only; the work is
done by inference.service.ChatService.

Gradio is imported by `import_gradio`, not with this module: `python app.py` serves /health, /v1 and /api
as soon as the model service has started, and mounts the web UI on the same port once Gradio (~6 s here)
has loaded and the UI is built (README, "Starting up"; inference/http/late_mount.py holds the slot it is
mounted in). Every function below that uses `gr` runs after it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from inference.config import AppConfig, config_from_args, exposure_warning, log_level
from inference.service import ChatService, ServiceError
from models.catalog import BASE_MODEL_NOTE
from sessions import LOCAL_USER
from parsers.units import format_bytes

log = logging.getLogger("app")

gr = FileData = FnIndexInferError = None  # set by import_gradio()


def import_gradio() -> None:
    """Import Gradio (once; its analytics off first: a local app makes no calls home)."""
    global gr, FileData, FnIndexInferError
    if gr is None:
        _no_telemetry()
        import gradio
        from gradio import FileData as file_data
        from gradio.route_utils import FnIndexInferError as unknown_endpoint

        FileData, FnIndexInferError = file_data, unknown_endpoint
        gr = gradio

STREAM_INTERVAL_S = 0.1  # UI updates at most 10 per second: each one re-renders the whole reply
CSS = """
.gradio-container {--font: ui-sans-serif, system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue",
                   "Noto Sans", "Liberation Sans", Arial, sans-serif}
footer {display: none !important}
#chat-column {min-width: 0}
#chat-header {align-items: center}
#model-status {font-size: 0.85em; opacity: 0.8}
#chat-tools {align-items: center; flex-wrap: nowrap}
#reply-stats {font-size: 0.85em; opacity: 0.75; min-height: 1.4em}
.chat-placeholder {text-align: center; opacity: 0.75}
#session-list label {width: 100%}
#remove-row, #manage-row {align-items: flex-end}
#files-table, #models-table {--font-mono: var(--font); --input-text-size: var(--text-sm)}
#confirm-delete-box {gap: var(--spacing-md)}
#stop-btn, #confirm-delete {background: #dc2626; border-color: #dc2626; color: white}
#stop-btn:hover, #confirm-delete:hover {background: #b91c1c}
#delete-btn {color: #b91c1c}
.hint {font-size: 0.85em; opacity: 0.75}
@media (max-width: 768px) {
  #chatbot {height: 60dvh !important}
  #chat-header {flex-wrap: wrap}
  #model-status {flex-basis: 100%}
  #chat-tools {flex-wrap: wrap}
  #reply-stats {flex-basis: 100%; order: 2}
}
"""


# ----- errors -----------------------------------------------------------------------------------
MAX_ERROR_CHARS = 500  # messages quote what was sent (an id, a name): never echo a huge argument back whole


def _message(error: Exception) -> str:
    if isinstance(error, KeyError):  # SessionNotFound & co. carry their message as args[0]
        text = str(error.args[0]) if error.args else "not found"
    else:
        text = str(error) or type(error).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "…"


_EXPECTED = (ServiceError, ValueError, KeyError, RuntimeError, OSError)


def friendly(fn):
    """Turn expected failures into gr.Error with a readable message; log the unexpected.

    Works on plain handlers and on generator handlers (streams) alike.
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream_wrapper(*args, **kwargs):
            with _friendly_errors(fn):
                yield from fn(*args, **kwargs)
        return stream_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _friendly_errors(fn):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _friendly_errors(fn):
    try:
        yield
    except gr.Error:
        raise
    except _EXPECTED as error:
        raise gr.Error(_message(error), print_exception=False) from None
    except Exception as error:  # pragma: no cover - a bug; keep the page alive
        log.exception("unexpected error in %s", fn.__name__)
        raise gr.Error(f"Internal error ({type(error).__name__}); see the server log.") from None


def owner_of(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or LOCAL_USER) if request is not None else LOCAL_USER


# ----- the Gradio API (README) -------------------------------------------------------------------
def register_api(service: ChatService) -> None:
    """The named endpoints of the README's Gradio API section; the UI below calls the same service functions."""

    @friendly
    def list_models() -> list[dict]:
        return service.list_models()

    @friendly
    def load_model(model_id: str) -> dict:
        return service.load_model(model_id)

    @friendly
    def unload_model(model_id: str) -> dict:
        return service.unload_model(model_id)

    @friendly
    def new_session(title: str, request: gr.Request) -> dict:
        return service.new_session(owner_of(request), title or "")

    @friendly
    def list_sessions(request: gr.Request) -> list[dict]:
        return service.list_sessions(owner_of(request))

    @friendly
    def rename_session(session_id: str, title: str, request: gr.Request) -> dict:
        return service.rename_session(owner_of(request), session_id, title)

    @friendly
    def delete_session(session_id: str, request: gr.Request) -> dict:
        return service.delete_session(owner_of(request), session_id)

    @friendly
    def history(session_id: str, request: gr.Request) -> list[dict]:
        return service.history(owner_of(request), session_id)

    @friendly
    def chat(session_id: str, message: str, model_id: str, settings: str, request: gr.Request) -> Iterator[str]:
        last = ""
        updates = service.chat(owner_of(request), session_id, message, model_id or "", settings or "")
        try:
            for update in updates:
                last = update.text
                yield last
        finally:
            updates.close()  # a client that went away: the service stops and stores the partial reply
        yield last

    @friendly
    def stop(session_id: str, request: gr.Request) -> dict:
        return service.stop(owner_of(request), session_id)

    @friendly
    def upload_file(session_id: str, file: FileData, request: gr.Request) -> dict:
        path, name = _upload_path_and_name(file, service)
        try:
            return service.upload_file(owner_of(request), session_id, path, name)
        finally:
            _discard_gradio_copy(path, service)

    @friendly
    def list_files(session_id: str, request: gr.Request) -> list[dict]:
        return service.list_files(owner_of(request), session_id)

    @friendly
    def remove_file(session_id: str, file_id: str, request: gr.Request) -> dict:
        return service.remove_file(owner_of(request), session_id, file_id)

    @friendly
    def last_reply(session_id: str, request: gr.Request) -> dict:
        return service.last_reply(owner_of(request), session_id)

    chat_limit = service.config.max_concurrent_generations
    for fn in (list_models, load_model, unload_model, new_session, list_sessions, rename_session, delete_session,
               history, stop, upload_file, list_files, remove_file, last_reply):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    gr.api(chat, api_name="chat", concurrency_limit=chat_limit, concurrency_id="generation")


def _upload_path_and_name(file, service: ChatService) -> tuple[str, str]:
    if isinstance(file, dict):
        path, name = file.get("path"), file.get("orig_name")
    elif isinstance(file, (str, Path)):
        path, name = str(file), None
    else:
        path, name = getattr(file, "path", None), getattr(file, "orig_name", None)
    if not path or not _is_client_upload(path, service):
        # Only what Gradio's upload route wrote: a client names the path, and it may name any file on the server
        # (or someone's export, which lives in the same folder).
        raise ServiceError("no uploaded file was received; upload the file first (gradio_client's handle_file)")
    return path, name or Path(path).name


def _in_upload_folder(path) -> bool:
    """True for a file inside Gradio's upload folder (where its upload route puts what clients send)."""
    from gradio.utils import get_upload_folder

    try:
        resolved = Path(path).resolve()
        return resolved.is_relative_to(Path(get_upload_folder()).resolve()) and resolved.is_file()
    except (OSError, RuntimeError, ValueError):
        return False


def _is_client_upload(path, service: ChatService) -> bool:
    """A file Gradio's upload route wrote: in its upload folder, and not an export the app wrote there."""
    return bool(path) and _in_upload_folder(path) and not service.is_export_path(path)


def _discard_gradio_copy(path: str, service: ChatService) -> None:
    """Gradio keeps uploads in its cache, served by its file route: ours live in the session folder."""
    if not _is_client_upload(path, service):  # never remove a file that Gradio's upload route did not write
        return
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


# ----- the UI -----------------------------------------------------------------------------------
FILE_HINT = ("PDF, Word (.docx), text, Markdown, CSV, JSON, HTML and source code. Files are read in the "
             "background; once *ready*, their text goes into this chat's context.")
# Gradio's sidebar covers the whole screen on a phone: start it closed there, and close it after a pick.
CLOSE_SIDEBAR_ON_PHONE = """() => {
  if (!window.matchMedia('(max-width: 768px)').matches) return;
  const toggle = document.querySelector('.sidebar.open .toggle-button');
  if (toggle) toggle.click();
}"""


def session_choices(service: ChatService, owner: str) -> list[tuple[str, str]]:
    return [(f"{record['title']}  ·  {short_time(record['updated_at'])}", record["id"])
            for record in service.list_sessions(owner)]


def short_time(timestamp: float, now: float | None = None) -> str:
    """'14:27' today, '25 Nov' this year, '25 Nov 2024' before."""
    when, today = time.localtime(timestamp), time.localtime(now if now is not None else time.time())
    if when[:3] == today[:3]:
        return time.strftime("%H:%M", when)
    return time.strftime("%d %b" if when.tm_year == today.tm_year else "%d %b %Y", when).lstrip("0")


def chatbot_messages(service: ChatService, owner: str, session_id: str) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in service.messages(owner, session_id)
            if m["role"] in ("user", "assistant")]


def last_stats(service: ChatService, owner: str, session_id: str) -> str:
    replies = [m for m in service.messages(owner, session_id) if m["role"] == "assistant"]
    return describe_reply(replies[-1].get("stats") or {}, replies[-1].get("context_report") or {}) if replies else ""


def describe_reply(stats: dict, report: dict) -> str:
    if not stats:
        return ""
    parts = [f"{stats.get('completion_tokens', 0)} tokens",
             f"{stats.get('tokens_per_second', 0):.1f} tok/s",
             f"first token {stats.get('ttft_s', 0):.2f} s"]
    if report:
        parts.append(f"prompt {report.get('prompt_tokens', '?')}/{report.get('context_limit', '?')} tokens")
        left = []
        if report.get("dropped_turns"):
            left.append(f"{report['dropped_turns']} oldest turn(s)")
        left += [f"{name} (not included)" for name in report.get("files_left_out", [])]
        left += [f"{p['name']} ({p['chunks_used']}/{p['chunks_total']} chunks)" for p in report.get("files_partial", [])]
        if left:
            parts.append("left out: " + ", ".join(left))
    if stats.get("finish_reason") == "cancelled":
        parts.append("stopped")
    return " · ".join(parts)


STATE_MARKS = {"loaded": "●", "loading": "◐", "error": "✕", "unloaded": "○"}


def model_choices(service: ChatService) -> list[tuple[str, str]]:
    return [(f"{STATE_MARKS.get(m['state'], '')} {m['name']}" + ("" if m["instruct"] else " · base model"), m["id"])
            for m in service.list_models()]


def models_table(service: ChatService) -> list[list]:
    """One row per catalog model; narrow enough for the side panel (errors go in the State cell)."""
    rows = []
    for m in service.list_models():
        state = m["state"] + (f" {int((m['progress'] or 0) * 100)}%" if m["state"] == "loading" else "")
        state += f": {m['error']}" if m["error"] else ""
        kind = " ".join(part for part in (m["architecture"] or ("hub" if not m["on_disk"] else "?"),
                                          m["quantization"] or "") if part)
        kind += "" if m["instruct"] else f" · base: {BASE_MODEL_NOTE}"
        size = m["memory_bytes"] or m["file_size_bytes"]
        rows.append([m["id"] + (" (pinned)" if m["pinned"] else ""), state, kind, format_bytes(size) if size else "—"])
    return rows


MODEL_HEADERS = ["Model", "State", "Type", "Memory"]


def memory_line(service: ChatService) -> str:
    status = service.memory_status()
    return f"Memory for models: **{format_bytes(status['used_bytes'])}** of {format_bytes(status['budget_bytes'])}"


def model_note(record: dict) -> str:
    """One line under the model picker: is it loaded, how big, how much context; a base model says so."""
    note = _state_note(record)
    return note if record.get("instruct", True) else f"{note} · **base model**: {BASE_MODEL_NOTE}"


def _state_note(record: dict) -> str:
    if record["state"] == "loaded":
        parts = ["● loaded"]
        if record.get("memory_bytes"):
            parts.append(format_bytes(record["memory_bytes"]))
        if record.get("context_length"):
            parts.append(f"context {record['context_length']:,} tokens")
        return " · ".join(parts)
    if record["state"] == "loading":
        return f"◐ loading {int((record.get('progress') or 0) * 100)}%"
    if record["state"] == "error":
        return f"✕ {record.get('error') or 'failed to load'}"
    return "○ not loaded yet: it loads with the first message"


def shorten(text: str, limit: int = 160) -> str:
    """A message short enough for a toast: its first clause, or its first `limit` characters.

    (An unsupported-type message, which lists the common types, is cut at a word; the uploader's hint
    says which types work.)
    """
    if len(text) <= limit:
        return text
    first = text.split("; ", 1)[0]
    return first if len(first) <= limit else text[:limit].rsplit(" ", 1)[0].rstrip(",;") + " …"


def files_table(service: ChatService, owner: str, session_id: str | None) -> list[list]:
    if not session_id:
        return []
    return [[f["name"], f["state"], f["tokens"] or "", f["error"] or ""]
            for f in service.list_files(owner, session_id)]


def file_choices(service: ChatService, owner: str, session_id: str | None) -> list[tuple[str, str]]:
    if not session_id:
        return []
    return [(f["name"], f["id"]) for f in service.list_files(owner, session_id)]


def settings_values(session: dict, config: AppConfig) -> tuple:
    settings = session.get("settings") or {}
    return (session.get("system_prompt") or "", settings.get("temperature", 0.7), settings.get("top_p", 0.95),
            settings.get("max_tokens", min(512, config.max_tokens_limit)))


def build_ui(service: ChatService) -> gr.Blocks:
    """The page: chats in the sidebar, the conversation, and Files / Settings / Models tabs beside it."""
    import_gradio()
    with gr.Blocks(title="Local LLM", fill_height=True, fill_width=True) as demo:
        ui = SimpleNamespace(last_session=gr.BrowserState(None, storage_key="local-llm-last-session"),
                             current=gr.State(None))
        _sidebar(ui)
        with gr.Row(equal_height=False, elem_id="main-row"):
            _chat_column(ui, service)
            with gr.Column(scale=2, min_width=300, elem_id="side-column"):
                with gr.Tabs(elem_id="side-tabs"):
                    _files_tab(ui)
                    _settings_tab(ui, service.config)
                    _models_tab(ui, service)
        ui.poll = gr.Timer(1.5)
        _wire_sessions(demo, ui, service)
        _wire_chat(ui, service)
        _wire_settings(ui, service)
        _wire_files(ui, service)
        _wire_models(ui, service)
        _wire_export(ui, service)
        register_api(service)
    return demo


# --- layout ---
def _sidebar(ui) -> None:
    with gr.Sidebar(label="Chats", open=True, elem_id="chats-sidebar"):
        ui.new_btn = gr.Button("+ New chat", variant="primary", elem_id="new-chat")
        ui.sessions = gr.Radio(choices=[], show_label=False, elem_id="session-list", container=False)
        with gr.Accordion("Rename or delete", open=False, elem_id="session-actions"):
            ui.title_box = gr.Textbox(label="Title", elem_id="rename-box", max_lines=1)
            with gr.Row():
                ui.rename_btn = gr.Button("Rename", elem_id="rename-btn", size="sm")
                ui.delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete-btn", size="sm")
            with gr.Column(visible=False, variant="panel", elem_id="confirm-delete-box") as ui.confirm_box:
                gr.Markdown("**Delete this chat?** Its messages and files go too; this cannot be undone.",
                            elem_id="confirm-text")
                with gr.Row():
                    ui.confirm_btn = gr.Button("Yes, delete", variant="stop", elem_id="confirm-delete", size="sm")
                    ui.keep_btn = gr.Button("Keep it", elem_id="keep-chat", size="sm")
        with gr.Accordion("Export / import", open=False, elem_id="export-panel"):
            ui.export_md = gr.DownloadButton("Download Markdown", size="sm", elem_id="export-md")
            ui.export_js = gr.DownloadButton("Download JSON", size="sm", elem_id="export-json")
            ui.import_btn = gr.UploadButton("Import JSON…", file_types=[".json"], size="sm", elem_id="import-json")


def _chat_column(ui, service: ChatService) -> None:
    with gr.Column(scale=3, min_width=320, elem_id="chat-column"):
        with gr.Row(elem_id="chat-header"):
            ui.model_dd = gr.Dropdown(label="Model", show_label=False, container=False, choices=model_choices(service),
                                      elem_id="model-dropdown", scale=2, min_width=200)
            ui.model_status = gr.Markdown(elem_id="model-status", container=False, min_width=160)
        ui.chatbot = gr.Chatbot(elem_id="chatbot", height="calc(100dvh - 230px)", min_height=320,
                                buttons=["copy"], show_label=False, feedback_options=None,
                                placeholder='<div class="chat-placeholder"><h3>Start a conversation</h3>'
                                            '<p>Type a message below. Files you add in the <em>Files</em> tab '
                                            'become part of the context.</p></div>')
        with gr.Row(elem_id="composer"):
            ui.message = gr.Textbox(placeholder="Message (Enter to send, Shift+Enter for a new line)",
                                    show_label=False, lines=1, max_lines=8, scale=1, elem_id="message-box",
                                    autofocus=True, container=False)
            ui.send_btn = gr.Button("Send", variant="primary", scale=0, min_width=88, elem_id="send-btn")
            ui.stop_btn = gr.Button("Stop", variant="stop", scale=0, min_width=88, elem_id="stop-btn",
                                    visible=False)
        with gr.Row(elem_id="chat-tools"):
            ui.stats = gr.Markdown(elem_id="reply-stats", container=False)
            ui.regen_btn = gr.Button("↻ Regenerate", size="sm", scale=0, min_width=110, elem_id="regen-btn")
            ui.clear_btn = gr.Button("Clear", size="sm", scale=0, min_width=70, elem_id="clear-btn")


def _files_tab(ui) -> None:
    with gr.Tab("Files", id="files", elem_id="files-tab"):
        ui.uploader = gr.File(file_count="multiple", label="Add files to this chat", elem_id="uploader", height=120)
        gr.Markdown(FILE_HINT, elem_classes=["hint"])
        ui.files = gr.Dataframe(headers=["File", "State", "Tokens", "Error"], interactive=False,
                                elem_id="files-table", wrap=True, value=[], buttons=[], show_label=False,
                                column_widths=["36%", "18%", "18%", "28%"])
        with gr.Row(elem_id="remove-row"):
            ui.remove_dd = gr.Dropdown(label="Remove a file", choices=[], scale=3, elem_id="remove-dd")
            ui.remove_btn = gr.Button("Remove", size="sm", scale=1, min_width=80, elem_id="remove-btn")


def _settings_tab(ui, config: AppConfig) -> None:
    with gr.Tab("Settings", id="settings", elem_id="settings-tab"):
        gr.Markdown("For this chat only; saved with it.", elem_classes=["hint"])
        ui.system_prompt = gr.Textbox(label="System prompt", lines=3, elem_id="system-prompt",
                                      placeholder="e.g. You are a concise assistant.")
        ui.temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature",
                                   info="0 = always the most likely word; higher = more varied")
        ui.top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top p", elem_id="top-p")
        ui.max_tokens = gr.Slider(1, max(2, config.max_tokens_limit), value=min(512, config.max_tokens_limit), step=1,
                                  label="Max tokens", elem_id="max-tokens", info="longest reply")
        ui.save_btn = gr.Button("Save settings", variant="primary", size="sm", elem_id="save-settings")


def _models_tab(ui, service: ChatService) -> None:
    with gr.Tab("Models", id="models", elem_id="models-tab"):
        ui.memory = gr.Markdown(memory_line(service), elem_id="memory-line")
        ui.models = gr.Dataframe(headers=MODEL_HEADERS, interactive=False, elem_id="models-table", wrap=True,
                                 value=models_table(service), buttons=[], show_label=False,
                                 column_widths=["31%", "25%", "22%", "22%"])
        ui.manage_dd = gr.Dropdown(label="Model to load or unload", choices=[m[1] for m in model_choices(service)],
                                   elem_id="manage-dd")
        with gr.Row(elem_id="manage-row"):
            ui.load_btn = gr.Button("Load", variant="primary", size="sm", min_width=70, elem_id="load-btn")
            ui.unload_btn = gr.Button("Unload", size="sm", min_width=70, elem_id="unload-btn")
            ui.pin_btn = gr.Button("Pin / unpin", size="sm", min_width=70, elem_id="pin-btn")
        gr.Markdown("Loaded models stay in memory until unloaded, idle for a while, or pushed out by another "
                    "model. A pinned model is never unloaded on its own.", elem_classes=["hint"])
        recommended = service.recommended_model()
        ui.use_recommended = None
        if recommended:
            gr.Markdown(recommended_hint(recommended), elem_id="recommended-hint")
            ui.use_recommended = gr.Button(f"Download and use {recommended['name']}", size="sm",
                                           elem_id="use-recommended")


def recommended_hint(record: dict) -> str:
    size = f" ({format_bytes(record['download_bytes'])}, downloaded once)" if record.get("download_bytes") else ""
    return (f"**For chat, use an instruct model.** A *base model* (such as the bundled Gemma 3 270M) "
            f"{BASE_MODEL_NOTE}. {record['name']}{size} is a good first one: this loads it and makes it this "
            "chat's model.")


PRIVATE = {"api_visibility": "private"}  # UI events stay out of the public API (the README lists that)


# --- sessions ---
def _session_view(ui) -> list:
    return [ui.current, ui.last_session, ui.sessions, ui.title_box, ui.chatbot, ui.stats, ui.files, ui.remove_dd,
            ui.model_dd, ui.model_status, ui.system_prompt, ui.temperature, ui.top_p, ui.max_tokens]


def show_session(service: ChatService, owner: str, session_id: str) -> tuple:
    """Everything the page shows for one session, in _session_view's order."""
    config = service.config
    session = service.get_session(owner, session_id)
    model_id = session.get("model_id") or config.default_model
    try:
        note = model_note(service.model_record(model_id))
    except _EXPECTED:
        note = ""
    return (session_id, session_id, gr.update(choices=session_choices(service, owner), value=session_id),
            session["title"], chatbot_messages(service, owner, session_id),
            last_stats(service, owner, session_id), files_table(service, owner, session_id),
            gr.update(choices=file_choices(service, owner, session_id), value=None),
            gr.update(choices=model_choices(service), value=model_id), note,
            *settings_values(session, config))


def _wire_sessions(demo: gr.Blocks, ui, service: ChatService) -> None:
    view = _session_view(ui)

    @friendly
    def on_load(remembered, request: gr.Request):
        owner = owner_of(request)
        listed = service.list_sessions(owner)
        if remembered not in {s["id"] for s in listed}:
            remembered = listed[0]["id"] if listed else service.new_session(owner)["id"]
        return show_session(service, owner, remembered)

    @friendly
    def on_new(request: gr.Request):
        owner = owner_of(request)
        return show_session(service, owner, service.new_session(owner)["id"])

    @friendly
    def on_switch(session_id, request: gr.Request):
        if not session_id:
            raise gr.Error("Pick a chat")
        return show_session(service, owner_of(request), session_id)

    @friendly
    def on_rename(session_id, title, request: gr.Request):
        owner = owner_of(request)
        service.rename_session(owner, session_id, title)
        return gr.update(choices=session_choices(service, owner), value=session_id)

    @friendly
    def on_delete(session_id, request: gr.Request):
        owner = owner_of(request)
        service.delete_session(owner, session_id)
        listed = service.list_sessions(owner)
        next_id = listed[0]["id"] if listed else service.new_session(owner)["id"]
        return (*show_session(service, owner, next_id), gr.update(visible=False))

    demo.load(on_load, [ui.last_session], view, **PRIVATE)
    demo.load(None, None, None, js=CLOSE_SIDEBAR_ON_PHONE)
    ui.new_btn.click(on_new, None, view, **PRIVATE)
    ui.sessions.input(on_switch, [ui.sessions], view, **PRIVATE)
    for event in (ui.new_btn.click, ui.sessions.input):
        event(None, None, None, js=CLOSE_SIDEBAR_ON_PHONE)
    for event in (ui.rename_btn.click, ui.title_box.submit):
        event(on_rename, [ui.current, ui.title_box], [ui.sessions], **PRIVATE)
    ui.delete_btn.click(lambda: gr.update(visible=True), None, [ui.confirm_box], queue=False, **PRIVATE)
    ui.keep_btn.click(lambda: gr.update(visible=False), None, [ui.confirm_box], queue=False, **PRIVATE)
    ui.confirm_btn.click(on_delete, [ui.current], [*view, ui.confirm_box], **PRIVATE)


# --- chat: one chain for Send, Enter and Regenerate ---
def stream_reply(service: ChatService, owner, session_id, text, model_id, history, regenerate=False):
    """Yield (chat history, status line, session list, model note) while the reply streams in."""
    history = list(history or [])
    if regenerate:
        while history and history[-1]["role"] == "assistant":
            history.pop()
    else:
        history.append({"role": "user", "content": text})
    history.append({"role": "assistant", "content": "…"})  # until the first words arrive
    yield history, "waiting for the model…", gr.update(), gr.update()
    shown_at, final = 0.0, None
    for update in service.chat(owner, session_id, text, model_id, "", regenerate=regenerate):
        if update.text or update.done:
            history[-1] = {"role": "assistant", "content": update.text}
        if update.done:
            final = update
        elif time.monotonic() - shown_at >= STREAM_INTERVAL_S:
            shown_at = time.monotonic()
            yield history, "generating…", gr.update(), gr.update()
    note = describe_reply(final.stats, final.report) if final else ""
    yield (history, note, gr.update(choices=session_choices(service, owner), value=session_id),
           model_note(service.model_record(model_id or service.get_session(owner, session_id)["model_id"])))


def _wire_chat(ui, service: ChatService) -> None:
    config = service.config

    @friendly
    def on_send(session_id, text, model_id, history, request: gr.Request):
        if not (text or "").strip():
            return
        yield from stream_reply(service, owner_of(request), session_id, text, model_id, history)

    @friendly
    def on_regenerate(session_id, model_id, history, request: gr.Request):
        yield from stream_reply(service, owner_of(request), session_id, "", model_id, history, regenerate=True)

    # While a reply streams, Stop takes Send's place, and what would swap the chat under it waits.
    locked = [ui.sessions, ui.new_btn, ui.regen_btn, ui.clear_btn, ui.confirm_btn, ui.import_btn]
    toggled = [ui.send_btn, ui.stop_btn, *locked]

    def busy(flag: bool) -> list:
        return [gr.update(visible=not flag), gr.update(visible=flag), *[gr.update(interactive=not flag)] * len(locked)]

    chat_out = [ui.chatbot, ui.stats, ui.sessions, ui.model_status]
    gen = {"concurrency_limit": config.max_concurrent_generations, "concurrency_id": "generation", **PRIVATE}
    fast = {"queue": False, **PRIVATE}
    pending = gr.State("")  # the message being sent, moved out of the textbox at once
    for trigger in (ui.send_btn.click, ui.message.submit):
        trigger(lambda text: ("", text, *busy(bool(text.strip()))), [ui.message], [ui.message, pending, *toggled],
                **fast).then(on_send, [ui.current, pending, ui.model_dd, ui.chatbot], chat_out, **gen).then(
            lambda: busy(False), None, toggled, **fast)
    ui.regen_btn.click(lambda: busy(True), None, toggled, **fast).then(
        on_regenerate, [ui.current, ui.model_dd, ui.chatbot], chat_out, **gen).then(
        lambda: busy(False), None, toggled, **fast)

    @friendly
    def on_stop(session_id, request: gr.Request):
        service.stop(owner_of(request), session_id)

    ui.stop_btn.click(on_stop, [ui.current], None, **fast)

    @friendly
    def on_clear(session_id, request: gr.Request):
        service.clear_history(owner_of(request), session_id)
        return [], ""

    ui.clear_btn.click(on_clear, [ui.current], [ui.chatbot, ui.stats], **PRIVATE)


# --- this chat's model and settings ---
def _wire_settings(ui, service: ChatService) -> None:
    @friendly
    def on_model(session_id, model_id, request: gr.Request, progress=gr.Progress()):
        """Picking a model makes it this chat's model and loads it now, with a progress bar."""
        if not model_id:
            return gr.update(), ""
        service.update_session(owner_of(request), session_id, model_id=model_id)
        record = service.load_model(model_id, progress=lambda f, m: progress(f, desc=m))
        return gr.update(choices=model_choices(service), value=model_id), model_note(record)

    ui.model_dd.input(on_model, [ui.current, ui.model_dd], [ui.model_dd, ui.model_status], **PRIVATE)

    @friendly
    def on_save(session_id, prompt, temp, p, tokens, request: gr.Request):
        service.update_session(owner_of(request), session_id, system_prompt=prompt,
                               settings={"temperature": temp, "top_p": p, "max_tokens": int(tokens)})
        gr.Info("Settings saved for this chat")

    ui.save_btn.click(on_save, [ui.current, ui.system_prompt, ui.temperature, ui.top_p, ui.max_tokens], None,
                      **PRIVATE)


# --- files ---
def _wire_files(ui, service: ChatService) -> None:
    @friendly
    def on_upload(session_id, uploads, request: gr.Request):
        owner = owner_of(request)
        problems = []
        for upload in uploads or []:
            path = upload if isinstance(upload, str) else getattr(upload, "name", upload)
            try:
                if not _is_client_upload(path, service):
                    raise ServiceError("no uploaded file was received")
                service.upload_file(owner, session_id, path, Path(path).name)
            except _EXPECTED as error:
                problems.append(shorten(_message(error)))
            finally:
                _discard_gradio_copy(path, service)
        if problems:
            gr.Warning("; ".join(problems))
        return None, files_table(service, owner, session_id), gr.update(
            choices=file_choices(service, owner, session_id), value=None)

    ui.uploader.upload(on_upload, [ui.current, ui.uploader], [ui.uploader, ui.files, ui.remove_dd], **PRIVATE)

    @friendly
    def on_remove(session_id, file_id, request: gr.Request):
        owner = owner_of(request)
        if not file_id:
            raise gr.Error("Pick a file to remove")
        service.remove_file(owner, session_id, file_id)
        return files_table(service, owner, session_id), gr.update(
            choices=file_choices(service, owner, session_id), value=None)

    ui.remove_btn.click(on_remove, [ui.current, ui.remove_dd], [ui.files, ui.remove_dd], **PRIVATE)


# --- model panel, and the timer that shows file and model states as they change ---
def _wire_models(ui, service: ChatService) -> None:
    def refresh_models():
        return (models_table(service), memory_line(service),
                gr.update(choices=[m[1] for m in model_choices(service)]))

    panel_out = [ui.models, ui.memory, ui.manage_dd]

    def required(model_id: str) -> str:
        if not model_id:
            raise gr.Error("Pick a model first")
        return model_id

    @friendly
    def on_load_model(model_id, progress=gr.Progress()):
        service.load_model(required(model_id), progress=lambda f, m: progress(f, desc=m))
        return refresh_models()

    @friendly
    def on_unload_model(model_id):
        service.unload_model(required(model_id))
        return refresh_models()

    @friendly
    def on_pin(model_id):
        record = service.model_record(required(model_id))
        service.pin_model(model_id, not record["pinned"])
        return refresh_models()

    ui.load_btn.click(on_load_model, [ui.manage_dd], panel_out, **PRIVATE)

    @friendly
    def on_use_recommended(session_id, request: gr.Request, progress=gr.Progress()):
        model_id = service.recommended_model()["id"]
        record = service.use_model(owner_of(request), session_id, model_id, lambda f, m: progress(f, desc=m))
        return (gr.update(choices=model_choices(service), value=model_id), model_note(record), *refresh_models())

    if ui.use_recommended is not None:
        ui.use_recommended.click(on_use_recommended, [ui.current], [ui.model_dd, ui.model_status, *panel_out],
                                 **PRIVATE)
    ui.unload_btn.click(on_unload_model, [ui.manage_dd], panel_out, **PRIVATE)
    ui.pin_btn.click(on_pin, [ui.manage_dd], panel_out, **PRIVATE)

    def on_poll(session_id, request: gr.Request):
        try:
            table = files_table(service, owner_of(request), session_id)
        except _EXPECTED:  # the session was deleted in another tab
            table = gr.update()
        return table, models_table(service), memory_line(service)

    ui.poll.tick(on_poll, [ui.current], [ui.files, ui.models, ui.memory], show_progress="hidden", **PRIVATE)


# --- export / import ---
def _wire_export(ui, service: ChatService) -> None:
    @friendly
    def export(session_id, kind, request: gr.Request):
        # A file of its own under a random folder in Gradio's cache, known with its owner: ExportGuard serves
        # it to nobody else, an upload call cannot name it, and it goes with its session or after an hour.
        return str(service.export_file(owner_of(request), session_id, kind))

    def on_export_md(session_id, request: gr.Request):
        return export(session_id, "md", request)

    def on_export_json(session_id, request: gr.Request):
        return export(session_id, "json", request)

    ui.export_md.click(on_export_md, [ui.current], [ui.export_md], **PRIVATE)
    ui.export_js.click(on_export_json, [ui.current], [ui.export_js], **PRIVATE)

    @friendly
    def on_import(upload, request: gr.Request):
        owner = owner_of(request)
        path = upload if isinstance(upload, str) else upload.name
        if not _is_client_upload(path, service):
            raise ServiceError("no uploaded file was received")
        try:
            record = service.import_session(owner, Path(path).read_bytes())
        finally:
            _discard_gradio_copy(path, service)
        return show_session(service, owner, record["id"])

    ui.import_btn.upload(on_import, [ui.import_btn], _session_view(ui), **PRIVATE)


EXPORT_FOLDER = "exports"  # under Gradio's upload folder, which its file route serves


def exports_folder() -> Path:
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()) / EXPORT_FOLDER


class ExportGuard:
    """Gradio's file route serves any file in its cache to any logged-in user who has the path. In front
    of it, a path in the export area is served only to the export's owner; anyone else, and an export
    that is gone, gets the 404 of a file that does not exist."""

    FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/")

    def __init__(self, app, service: ChatService, ui):
        self.app, self.service, self.ui = app, service, ui

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            target = next((path[len(p):] for p in self.FILE_ROUTES if path.startswith(p)), None)
            if target is not None and self.service.is_export_path(target):
                owner = self.service.export_owner(target)
                if owner is None or owner != self._user(scope):
                    from starlette.responses import PlainTextResponse

                    return await PlainTextResponse("File not found", status_code=404)(scope, receive, send)
        await self.app(scope, receive, send)

    def _user(self, scope) -> str | None:
        """Who is logged in, as Gradio's own /gradio_api/user tells it (its session cookie)."""
        from starlette.requests import HTTPConnection

        gradio_app = self.ui.mounted
        if gradio_app is None:
            return None
        if getattr(gradio_app, "auth", None) is None and getattr(gradio_app, "auth_dependency", None) is None:
            return LOCAL_USER
        cookies = HTTPConnection(scope).cookies
        cookie_id = getattr(gradio_app, "cookie_id", "")
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return getattr(gradio_app, "tokens", {}).get(token)


# ----- the server -------------------------------------------------------------------------------
def queued_ui(service: ChatService) -> gr.Blocks:
    demo = build_ui(service)
    # No max_size: Gradio counts every waiting event against it, /stop and list calls included (gradio_client
    # queues them all), so a queue full of waiting chats would refuse the /stop that frees it, and 0 refused
    # everything. Chats wait their turn here (the UI shows the position); the engine's gate bounds generations.
    demo.queue(default_concurrency_limit=16, max_size=None)
    return demo


def create_app(service: ChatService, ui: bool = True):
    """FastAPI app: /health, /v1 and /api beside the Gradio UI, on one port.

    `ui=False` leaves the UI to `start_ui`, once the server runs: `serve` answers the HTTP API while Gradio
    loads. Until the UI is mounted every other path answers 503 with a page that reloads itself
    (inference/http/late_mount.py).
    """
    from fastapi import FastAPI

    from inference.http import create_router
    from inference.http.late_mount import LateMount

    config = service.config
    app = FastAPI(title="Local LLM", docs_url=None, redoc_url=None)
    app.state.ui = slot = LateMount(app, "The chat UI")
    app.include_router(create_router(service, config.api_key, health=lambda: {"ui": slot.status}))
    app.add_middleware(ExportGuard, service=service, ui=slot)
    add_body_limits(app, config)  # added last, so it runs first: nothing is read before it
    if ui:
        mount_ui(app, build_gradio_app(service))
    return app


def build_gradio_app(service: ChatService):
    """The Gradio UI and API as an ASGI app of their own (imports Gradio; ~6 s the first time here)."""
    from fastapi import FastAPI

    import_gradio()
    config = service.config
    demo = queued_ui(service)
    # Mounted in a FastAPI of its own, then in ours by `mount_ui` (which starts it as this would). No
    # server-side rendering: it starts a Node server (and signal handlers, main thread only) for nothing.
    holder = gr.mount_gradio_app(FastAPI(), demo, path="", auth=config.auth or None, css=CSS,
                                 theme=gr.themes.Soft(), show_error=True, max_file_size=config.max_upload_bytes,
                                 footer_links=["api"], ssr_mode=False)
    # Gradio checks that a file input names a file its upload route wrote (not any path on the server) only
    # once the app "has launched"; launch() sets that, mount_gradio_app does not. Set it as launch() would.
    demo.has_launched = True
    gradio_app = mounted_gradio_apps(holder)[0]
    gradio_app.add_exception_handler(FnIndexInferError, _unknown_endpoint)  # an unknown api_name is a 404
    service.keep_exports_in(exports_folder())
    return gradio_app


def mount_ui(app, gradio_app) -> None:
    """Mount `gradio_app` at the root of `app`, its lifespan and queue started as `gr.mount_gradio_app`
    starts them (with the server's start-up, or at once on a running server)."""

    @contextlib.asynccontextmanager
    async def started():
        async with gradio_app.router.lifespan_context(gradio_app):
            blocks = gradio_app.get_blocks()
            blocks.run_startup_events()
            await blocks.run_extra_startup_events()
            yield

    app.state.ui.mount(gradio_app, started)


def start_ui(app, service: ChatService, server, stopped: threading.Event) -> None:
    """Build and mount the UI once `server` listens, the default model's preload has settled and the
    engine has had nothing to do for `UI_AFTER_IDLE_S` (importing Gradio takes both cores' share of the
    interpreter for seconds: the first requests, and the model they need, go first; `UI_WAIT_S` at most).
    Gives up quietly if the server stops first. Runs on its own thread; whatever fails, the UI's state
    says so ("failed") and the HTTP API keeps serving."""
    try:
        if not _wait_to_build_ui(service, server, stopped):
            return
        began = time.perf_counter()
        gradio_app = build_gradio_app(service)
        if stopped.is_set():  # the server stopped while Gradio loaded
            return
        mount_ui(app, gradio_app)
    except Exception as error:
        app.state.ui.fail(f"{type(error).__name__}: {error}")
        if not stopped.is_set():
            log.exception("the chat UI could not start; the HTTP API keeps serving")
        return
    log.info("chat UI ready on http://%s:%d (Gradio loaded and the UI built in %.1f s)",
             service.config.host, service.config.port, time.perf_counter() - began)


def _wait_to_build_ui(service: ChatService, server, stopped: threading.Event) -> bool:
    """Until the server listens and the service has been idle `UI_AFTER_IDLE_S` (at most `UI_WAIT_S`);
    False if the server stopped first."""
    while not getattr(server, "started", False):
        if stopped.wait(0.05) or getattr(server, "should_exit", False):
            return False
    deadline, quiet_since = time.monotonic() + UI_WAIT_S, None
    while time.monotonic() < deadline:
        if service.busy():
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= UI_AFTER_IDLE_S:
            break
        if stopped.wait(0.05):
            return False
    return True


UI_AFTER_IDLE_S = 0.3  # the UI starts building once the engine and the model loads have been idle this long
UI_WAIT_S = 60.0  # ... or this long after the server started listening, whatever they do


UPLOAD_ROUTES = ("/gradio_api/upload",)  # Gradio's upload route: the only one that takes files


def add_body_limits(app, config: AppConfig) -> None:
    """Every request body is bounded before it is read and before any login check: a few MiB (sized from
    --max-prompt-chars) everywhere, --max-upload on the upload route. A huge POST gets 413, not read."""
    from inference.http import BodySizeLimit

    app.add_middleware(BodySizeLimit, **_body_limit_options(config))


def _body_limit_options(config: AppConfig) -> dict:
    return {"max_bytes": config.max_body_bytes,
            "larger": {path: config.max_upload_body_bytes for path in UPLOAD_ROUTES}}


def _no_telemetry() -> None:
    """A local app makes no calls home: Gradio's analytics and version check stay off unless asked for."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _unknown_endpoint(request, error):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"{str(error)[:200]}; see /gradio_api/info for the endpoints"}, status_code=404)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=log_level(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv)
    warning = exposure_warning(config)
    if warning:
        log.warning(warning)
    _no_telemetry()
    service = ChatService(config)
    service.start()
    serve(service)


def serve(service: ChatService, open_tunnel=None) -> None:
    """Serve `create_app`'s app with `make_server` until Ctrl-C or SIGTERM, then close the service.

    The HTTP API answers as soon as the server listens; the UI is built on a thread meanwhile and mounted
    when ready (`start_ui`). --share takes the same path: the same app (middleware, limits, handlers) on the
    same server, and once the UI is up, Gradio's share tunnel to its port (`open_tunnel(host, port, demo)`
    returns the public URL; tests pass their own, since the real one needs the internet).
    """
    config = service.config
    app = create_app(service, ui=False)
    server = make_server(app, config.host, config.port)
    stopped = threading.Event()
    threading.Thread(target=start_ui, args=(app, service, server, stopped), name="ui-start", daemon=True).start()
    if config.share:
        _share_when_started(server, app, config, open_tunnel or open_share_tunnel)
    log.info("serving the HTTP API on http://%s:%d; the chat UI follows there once Gradio has loaded",
             config.host, config.port)
    try:
        with _sigterm_ends_cleanly():
            server.run()
    finally:
        stopped.set()
        service.close()
        log.info("closed: the server stopped and the service shut down")


@contextlib.contextmanager
def _sigterm_ends_cleanly():
    """uvicorn shuts down in order on SIGTERM, then raises the signal again for the handler it found: make
    that handler end the process with status 0 through the `finally` blocks (the service's close), instead
    of the default one that kills it on the spot."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_cleanly(signum, frame):
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, exit_cleanly)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _share_when_started(server, app, config: AppConfig, open_tunnel) -> None:
    """Open the public link once `server` listens and the UI is mounted (on a thread: the server runs on
    this one)."""
    state = app.state.ui

    def share():
        while not (server.started and state.status != "starting") and not server.should_exit:
            time.sleep(0.05)
        if server.should_exit:
            return
        if state.status != "ready":
            log.error("no share link: the chat UI did not start (%s)", state.error)
            return
        demos = [gradio_app.get_blocks() for gradio_app in mounted_gradio_apps(app)]
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
        try:
            url = open_tunnel(host, config.port, demos[0])
        except Exception as error:  # no internet, a blocked download: the app keeps serving locally
            log.error("could not create the share link (%s); serving locally only", error)
            return
        for demo in demos:
            demo.share, demo.share_url = True, url
        log.info("public link: %s", url)

    threading.Thread(target=share, name="share-tunnel", daemon=True).start()


def open_share_tunnel(host: str, port: int, demo) -> str:
    """Gradio's share tunnel (its FRP client, downloaded once) to host:port; returns the public URL.
    The tunnel closes when the process exits."""
    from gradio import networking

    return networking.setup_tunnel(local_host=host, local_port=port, share_token=demo.share_token,
                                   share_server_address=None, share_server_tls_certificate=None)


def make_server(app, host: str, port: int, **options):
    """A uvicorn server for `app` that ends Gradio's open-ended streams when it shuts down.

    Every open browser tab (and gradio_client) holds a session heartbeat stream that only ends
    when the Gradio app's stop event is set; `gr.mount_gradio_app` leaves that to us, and without
    it Ctrl-C waits for every tab to close.
    """
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            for gradio_app in mounted_gradio_apps(app):
                gradio_app.stop_event.set()
            await super().shutdown(sockets)

    options = {"log_level": "warning", "timeout_graceful_shutdown": 10, **options}
    return Server(uvicorn.Config(app, host=host, port=port, **options))


def mounted_gradio_apps(app) -> list:
    """The Gradio apps mounted in `app` (none, without importing Gradio, before it is imported)."""
    App = getattr(sys.modules.get("gradio.routes"), "App", None)  # (a Gradio still importing has none mounted)
    if App is None:
        return []
    return [route.app for route in getattr(app, "routes", []) if isinstance(getattr(route, "app", None), App)]


if __name__ == "__main__":
    main()
