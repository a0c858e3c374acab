"""Local LLM chat: the Gradio UI, the Gradio API and the /v1 routes, wired to one ChatService.

Run `python app.py --help` for the options. This module holds UI and wiring only; the work is
done by inference.service.ChatService.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import gradio as gr
from gradio import FileData

from inference.config import AppConfig, config_from_args
from inference.service import ChatService, ServiceError
from models.manager import format_bytes
from sessions import LOCAL_USER
from sessions.export import export_json, export_markdown, import_json

log = logging.getLogger("app")

STREAM_INTERVAL_S = 0.06  # UI updates at most ~16 per second, so the browser keeps up
CSS = """
#chat-column {min-width: 0}
#session-list label {width: 100%}
#reply-stats {font-size: 0.85em; opacity: 0.8; min-height: 1.5em}
#model-status {font-size: 0.85em}
footer {display: none !important}
@media (max-width: 768px) { #side-column {display: none} }
"""


# ----- errors -----------------------------------------------------------------------------------
def _message(error: Exception) -> str:
    if isinstance(error, KeyError):  # SessionNotFound & co. carry their message as args[0]
        return str(error.args[0]) if error.args else "not found"
    return str(error) or type(error).__name__


_EXPECTED = (ServiceError, ValueError, KeyError, RuntimeError, OSError)


def friendly(fn):
    """Turn expected failures into gr.Error with a readable message; log the unexpected."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except _EXPECTED as error:
            raise gr.Error(_message(error), print_exception=False) from None
        except Exception as error:  # pragma: no cover - a bug; keep the page alive
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Internal error ({type(error).__name__}); see the server log.") from None
    return wrapper


def friendly_stream(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except _EXPECTED as error:
            raise gr.Error(_message(error), print_exception=False) from None
        except Exception as error:  # pragma: no cover
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Internal error ({type(error).__name__}); see the server log.") from None
    return wrapper


def owner_of(request: gr.Request | None) -> str:
    return (getattr(request, "username", None) or LOCAL_USER) if request is not None else LOCAL_USER


# ----- the Gradio API (API.md) ------------------------------------------------------------------
def register_api(service: ChatService) -> None:
    """The named endpoints of API.md; the UI below calls the same service functions."""

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

    @friendly_stream
    def chat(session_id: str, message: str, model_id: str, settings: str, request: gr.Request) -> Iterator[str]:
        last = ""
        for update in service.chat(owner_of(request), session_id, message, model_id or "", settings or ""):
            last = update.text
            yield last
        yield last

    @friendly
    def stop(session_id: str, request: gr.Request) -> dict:
        return service.stop(owner_of(request), session_id)

    @friendly
    def upload_file(session_id: str, file: FileData, request: gr.Request) -> dict:
        path, name = _upload_path_and_name(file)
        try:
            return service.upload_file(owner_of(request), session_id, path, name)
        finally:
            _discard_gradio_copy(path)

    @friendly
    def list_files(session_id: str, request: gr.Request) -> list[dict]:
        return service.list_files(owner_of(request), session_id)

    @friendly
    def remove_file(session_id: str, file_id: str, request: gr.Request) -> dict:
        return service.remove_file(owner_of(request), session_id, file_id)

    chat_limit = service.config.max_concurrent_generations
    for fn in (list_models, load_model, unload_model, new_session, list_sessions, rename_session, delete_session,
               history, stop, upload_file, list_files, remove_file):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)
    gr.api(chat, api_name="chat", concurrency_limit=chat_limit, concurrency_id="generation")


def _upload_path_and_name(file) -> tuple[str, str]:
    if isinstance(file, dict):
        path, name = file.get("path"), file.get("orig_name")
    elif isinstance(file, (str, Path)):
        path, name = str(file), None
    else:
        path, name = getattr(file, "path", None), getattr(file, "orig_name", None)
    if not path or not Path(path).is_file():
        raise ServiceError("no file was received")
    return path, name or Path(path).name


def _discard_gradio_copy(path: str) -> None:
    """Gradio keeps uploads in its cache, served by its file route: ours live in the session folder."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


# ----- the UI -----------------------------------------------------------------------------------
def session_choices(service: ChatService, owner: str) -> list[tuple[str, str]]:
    choices = []
    for record in service.list_sessions(owner):
        when = time.strftime("%d %b %H:%M", time.localtime(record["updated_at"]))
        choices.append((f"{record['title']}  ·  {when}", record["id"]))
    return choices


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


def model_choices(service: ChatService) -> list[tuple[str, str]]:
    marks = {"loaded": "●", "loading": "◐", "error": "✕", "unloaded": "○"}
    return [(f"{marks.get(m['state'], '')} {m['name']}", m["id"]) for m in service.list_models()]


def models_table(service: ChatService) -> list[list]:
    rows = []
    for m in service.list_models():
        state = m["state"] + (f" {int((m['progress'] or 0) * 100)}%" if m["state"] == "loading" else "")
        rows.append([m["id"], state, m["architecture"] or ("hub" if not m["on_disk"] else "?"),
                     m["quantization"] or "", format_bytes(m["file_size_bytes"]) if m["file_size_bytes"] else "—",
                     format_bytes(m["memory_bytes"]) if m["memory_bytes"] else "—", "📌" if m["pinned"] else "",
                     m["error"] or ""])
    return rows


def memory_line(service: ChatService) -> str:
    status = service.memory_status()
    return f"Memory for models: **{format_bytes(status['used_bytes'])}** of {format_bytes(status['budget_bytes'])}"


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
    config = service.config
    with gr.Blocks(title="Local LLM", fill_height=True) as demo:
        last_session = gr.BrowserState(None, storage_key="local-llm-last-session")
        current = gr.State(None)

        with gr.Sidebar(label="Chats", open=True):
            new_btn = gr.Button("＋ New chat", variant="primary", elem_id="new-chat")
            sessions = gr.Radio(choices=[], show_label=False, elem_id="session-list", container=False)
            with gr.Accordion("Rename or delete", open=False, elem_id="session-actions"):
                title_box = gr.Textbox(label="Title", elem_id="rename-box", max_lines=1)
                rename_btn = gr.Button("Rename", elem_id="rename-btn", size="sm")
                delete_btn = gr.Button("Delete chat…", variant="stop", elem_id="delete-btn", size="sm")
                with gr.Row(visible=False) as confirm_row:
                    confirm_btn = gr.Button("Yes, delete", variant="stop", elem_id="confirm-delete", size="sm")
                    keep_btn = gr.Button("Keep", size="sm")
            with gr.Accordion("Export / import", open=False):
                export_md = gr.DownloadButton("Download Markdown", size="sm")
                export_js = gr.DownloadButton("Download JSON", size="sm")
                import_btn = gr.UploadButton("Import JSON", file_types=[".json"], size="sm")

        with gr.Row(equal_height=False):
            with gr.Column(scale=3, elem_id="chat-column"):
                with gr.Row():
                    model_dd = gr.Dropdown(label="Model", choices=model_choices(service), elem_id="model-dropdown",
                                           scale=3)
                    model_status = gr.Markdown(elem_id="model-status")
                chatbot = gr.Chatbot(elem_id="chatbot", height="58vh", buttons=["copy"], show_label=False,
                                     placeholder="Start a conversation: type a message below.",
                                     feedback_options=None)
                stats = gr.Markdown(elem_id="reply-stats")
                with gr.Row():
                    message = gr.Textbox(placeholder="Message… (Enter to send, Shift+Enter for a new line)",
                                         show_label=False, lines=1, max_lines=8, scale=8, elem_id="message-box",
                                         autofocus=True)
                    send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn", min_width=80)
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop-btn", min_width=80)
                with gr.Row():
                    regen_btn = gr.Button("↻ Regenerate", size="sm", elem_id="regen-btn")
                    clear_btn = gr.Button("Clear conversation", size="sm", elem_id="clear-btn")

            with gr.Column(scale=2, elem_id="side-column", min_width=280):
                with gr.Accordion("Files", open=True, elem_id="files-panel"):
                    uploader = gr.File(file_count="multiple", label="Add files (drag and drop)", elem_id="uploader",
                                       height=110)
                    files = gr.Dataframe(headers=["File", "State", "Tokens", "Error"], interactive=False,
                                         elem_id="files-table", wrap=True, value=[])
                    with gr.Row():
                        remove_dd = gr.Dropdown(label="File", choices=[], scale=3, elem_id="remove-dd")
                        remove_btn = gr.Button("Remove", size="sm", scale=1, elem_id="remove-btn")
                with gr.Accordion("Settings", open=False, elem_id="settings-panel"):
                    system_prompt = gr.Textbox(label="System prompt", lines=3, elem_id="system-prompt")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top p")
                    max_tokens = gr.Slider(16, config.max_tokens_limit, value=min(512, config.max_tokens_limit),
                                           step=16, label="Max tokens")
                    save_btn = gr.Button("Save settings", size="sm", elem_id="save-settings")
                with gr.Accordion("Models", open=False, elem_id="models-panel"):
                    memory = gr.Markdown(memory_line(service), elem_id="memory-line")
                    models = gr.Dataframe(headers=["Model", "State", "Arch", "Quant", "File", "Memory", "Pin", "Error"],
                                          interactive=False, elem_id="models-table", wrap=True,
                                          value=models_table(service))
                    with gr.Row():
                        manage_dd = gr.Dropdown(label="Model", choices=[m[1] for m in model_choices(service)],
                                                scale=3, elem_id="manage-dd")
                    with gr.Row():
                        load_btn = gr.Button("Load", size="sm", elem_id="load-btn")
                        unload_btn = gr.Button("Unload", size="sm", elem_id="unload-btn")
                        pin_btn = gr.Button("Pin / unpin", size="sm", elem_id="pin-btn")
        poll = gr.Timer(1.5)

        session_view = [current, last_session, sessions, title_box, chatbot, stats, files, remove_dd, model_dd,
                        system_prompt, temperature, top_p, max_tokens]
        private = {"api_visibility": "private"}

        def show_session(owner: str, session_id: str):
            session = service.get_session(owner, session_id)
            return (session_id, session_id, gr.update(choices=session_choices(service, owner), value=session_id),
                    session["title"], chatbot_messages(service, owner, session_id),
                    last_stats(service, owner, session_id), files_table(service, owner, session_id),
                    gr.update(choices=file_choices(service, owner, session_id), value=None),
                    gr.update(choices=model_choices(service), value=session.get("model_id") or config.default_model),
                    *settings_values(session, config))

        @friendly
        def on_load(remembered, request: gr.Request):
            owner = owner_of(request)
            known = {s["id"] for s in service.list_sessions(owner)}
            if remembered not in known:
                listed = service.list_sessions(owner)
                remembered = listed[0]["id"] if listed else service.new_session(owner)["id"]
            return show_session(owner, remembered)

        @friendly
        def on_new(request: gr.Request):
            owner = owner_of(request)
            return show_session(owner, service.new_session(owner)["id"])

        @friendly
        def on_switch(session_id, request: gr.Request):
            if not session_id:
                raise gr.Error("Pick a chat")
            return show_session(owner_of(request), session_id)

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
            return (*show_session(owner, next_id), gr.update(visible=False))

        demo.load(on_load, [last_session], session_view, **private)
        new_btn.click(on_new, None, session_view, **private)
        sessions.input(on_switch, [sessions], session_view, **private)
        rename_btn.click(on_rename, [current, title_box], [sessions], **private)
        delete_btn.click(lambda: gr.update(visible=True), None, [confirm_row], **private)
        keep_btn.click(lambda: gr.update(visible=False), None, [confirm_row], **private)
        confirm_btn.click(on_delete, [current], [*session_view, confirm_row], **private)

        # --- chat: one chain for Send, Enter and Regenerate ---
        def stream_reply(owner, session_id, text, model_id, settings, history, regenerate=False):
            history = list(history or [])
            if regenerate:
                while history and history[-1]["role"] == "assistant":
                    history.pop()
            else:
                history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": ""})
            yield history, "…", gr.update()
            shown_at, final = 0.0, None
            for update in service.chat(owner, session_id, text, model_id, settings, regenerate=regenerate):
                history[-1] = {"role": "assistant", "content": update.text}
                if update.done:
                    final = update
                elif time.monotonic() - shown_at >= STREAM_INTERVAL_S:
                    shown_at = time.monotonic()
                    yield history, "generating…", gr.update()
            note = describe_reply(final.stats, final.report) if final else ""
            yield history, note, gr.update(choices=session_choices(service, owner), value=session_id)

        @friendly_stream
        def on_send(session_id, text, model_id, history, request: gr.Request):
            if not (text or "").strip():
                return
            yield from stream_reply(owner_of(request), session_id, text, model_id, "", history)

        @friendly_stream
        def on_regenerate(session_id, model_id, history, request: gr.Request):
            yield from stream_reply(owner_of(request), session_id, "", model_id, "", history, regenerate=True)

        chat_out = [chatbot, stats, sessions]
        gen = {"concurrency_limit": config.max_concurrent_generations, "concurrency_id": "generation", **private}
        pending = gr.State("")  # the message being sent, moved out of the textbox at once
        for trigger in (send_btn.click, message.submit):
            trigger(lambda text: ("", text), [message], [message, pending], queue=False, **private).then(
                on_send, [current, pending, model_dd, chatbot], chat_out, **gen)
        regen_btn.click(on_regenerate, [current, model_dd, chatbot], chat_out, **gen)

        @friendly
        def on_stop(session_id, request: gr.Request):
            service.stop(owner_of(request), session_id)

        stop_btn.click(on_stop, [current], None, queue=False, **private)

        @friendly
        def on_clear(session_id, request: gr.Request):
            service.clear_history(owner_of(request), session_id)
            return [], ""

        clear_btn.click(on_clear, [current], [chatbot, stats], **private)

        # --- model for this session, loaded on demand with a progress bar ---
        @friendly
        def on_model(session_id, model_id, request: gr.Request, progress=gr.Progress()):
            if not model_id:
                return gr.update(), ""
            service.update_session(owner_of(request), session_id, model_id=model_id)
            record = service.load_model(model_id, progress=lambda f, m: progress(f, desc=m))
            return gr.update(choices=model_choices(service), value=model_id), _model_note(record)

        model_dd.input(on_model, [current, model_dd], [model_dd, model_status], **private)

        # --- settings ---
        @friendly
        def on_save(session_id, prompt, temp, p, tokens, request: gr.Request):
            service.update_session(owner_of(request), session_id, system_prompt=prompt,
                                   settings={"temperature": temp, "top_p": p, "max_tokens": int(tokens)})
            gr.Info("Settings saved for this chat")

        save_btn.click(on_save, [current, system_prompt, temperature, top_p, max_tokens], None, **private)

        # --- files ---
        @friendly
        def on_upload(session_id, uploads, request: gr.Request):
            owner = owner_of(request)
            problems = []
            for upload in uploads or []:
                path = upload if isinstance(upload, str) else getattr(upload, "name", upload)
                try:
                    service.upload_file(owner, session_id, path, Path(path).name)
                except _EXPECTED as error:
                    problems.append(f"{Path(path).name}: {_message(error)}")
                finally:
                    _discard_gradio_copy(path)
            if problems:
                gr.Warning("; ".join(problems))
            return None, files_table(service, owner, session_id), gr.update(
                choices=file_choices(service, owner, session_id), value=None)

        uploader.upload(on_upload, [current, uploader], [uploader, files, remove_dd], **private)

        @friendly
        def on_remove(session_id, file_id, request: gr.Request):
            owner = owner_of(request)
            if not file_id:
                raise gr.Error("Pick a file to remove")
            service.remove_file(owner, session_id, file_id)
            return files_table(service, owner, session_id), gr.update(
                choices=file_choices(service, owner, session_id), value=None)

        remove_btn.click(on_remove, [current, remove_dd], [files, remove_dd], **private)

        # --- model panel ---
        def refresh_models():
            return (models_table(service), memory_line(service),
                    gr.update(choices=[m[1] for m in model_choices(service)]))

        panel_out = [models, memory, manage_dd]

        @friendly
        def on_load_model(model_id, progress=gr.Progress()):
            if not model_id:
                raise gr.Error("Pick a model")
            service.load_model(model_id, progress=lambda f, m: progress(f, desc=m))
            return refresh_models()

        @friendly
        def on_unload_model(model_id):
            if not model_id:
                raise gr.Error("Pick a model")
            service.unload_model(model_id)
            return refresh_models()

        @friendly
        def on_pin(model_id):
            if not model_id:
                raise gr.Error("Pick a model")
            record = service.manager.record(model_id)
            service.pin_model(model_id, not record["pinned"])
            return refresh_models()

        load_btn.click(on_load_model, [manage_dd], panel_out, **private)
        unload_btn.click(on_unload_model, [manage_dd], panel_out, **private)
        pin_btn.click(on_pin, [manage_dd], panel_out, **private)

        # --- polling: file states while parsing, model states while loading ---
        def on_poll(session_id, request: gr.Request):
            owner = owner_of(request)
            try:
                table = files_table(service, owner, session_id)
            except _EXPECTED:
                table = gr.update()
            return (table, *refresh_models())

        poll.tick(on_poll, [current], [files, *panel_out], show_progress="hidden", **private)

        # --- export / import ---
        @friendly
        def on_export(session_id, kind, request: gr.Request):
            owner = owner_of(request)
            folder = Path(tempfile.mkdtemp(prefix="export-"))
            if kind == "md":
                path = folder / "chat.md"
                path.write_text(export_markdown(service.store, owner, session_id), encoding="utf-8")
            else:
                path = folder / "chat.json"
                path.write_text(json.dumps(export_json(service.store, owner, session_id), indent=2,
                                           ensure_ascii=False), encoding="utf-8")
            return str(path)

        def on_export_md(session_id, request: gr.Request):
            return on_export(session_id, "md", request)

        def on_export_json(session_id, request: gr.Request):
            return on_export(session_id, "json", request)

        export_md.click(on_export_md, [current], [export_md], **private)
        export_js.click(on_export_json, [current], [export_js], **private)

        @friendly
        def on_import(upload, request: gr.Request):
            owner = owner_of(request)
            path = upload if isinstance(upload, str) else upload.name
            record = import_json(service.store, owner, Path(path).read_bytes())
            return show_session(owner, record["id"])

        import_btn.upload(on_import, [import_btn], session_view, **private)

        register_api(service)
    return demo


def _model_note(record: dict) -> str:
    if record["state"] == "loaded":
        return f"loaded · {format_bytes(record['memory_bytes'])} · context {record['context_length']}"
    return record["error"] or record["state"]


# ----- the server -------------------------------------------------------------------------------
def queued_ui(service: ChatService) -> gr.Blocks:
    demo = build_ui(service)
    demo.queue(default_concurrency_limit=16, max_size=service.config.max_queue)
    return demo


def create_app(service: ChatService):
    """FastAPI app: /health and /v1 beside the Gradio UI, on one port."""
    from fastapi import FastAPI

    from inference.openai_api import create_router

    config = service.config
    app = FastAPI(title="Local LLM", docs_url=None, redoc_url=None)
    app.include_router(create_router(service, config.api_key))
    return gr.mount_gradio_app(app, queued_ui(service), path="", auth=config.auth or None, css=CSS,
                               theme=gr.themes.Soft(), show_error=True, max_file_size=config.max_upload_bytes,
                               footer_links=["api"])


def serve_shared(service: ChatService) -> None:
    """--share: Gradio's own launcher makes the public link; /health and /v1 join its app."""
    from inference.openai_api import create_router

    config = service.config
    demo = queued_ui(service)
    app, local_url, share_url = demo.launch(
        share=True, server_name=config.host, server_port=config.port, auth=config.auth or None, css=CSS,
        theme=gr.themes.Soft(), show_error=True, max_file_size=config.max_upload_bytes, prevent_thread_lock=True,
        footer_links=["api"])
    app.router.routes[0:0] = create_router(service, config.api_key).routes
    log.info("serving on %s (public link: %s)", local_url, share_url)
    try:
        demo.block_thread()
    finally:
        service.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(argv)
    service = ChatService(config)
    service.start()
    if config.share:
        return serve_shared(service)
    app = create_app(service)
    if config.host not in ("127.0.0.1", "localhost", "::1") and not (config.auth or config.api_key):
        log.warning("listening on %s without --auth or --api-key: anyone on the network can use the app",
                    config.host)
    import uvicorn

    log.info("serving on http://%s:%d", config.host, config.port)
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        service.close()


if __name__ == "__main__":
    main()
