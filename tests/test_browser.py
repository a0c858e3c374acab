"""The web UI in a real browser: Debian's chromium driven by Playwright, against the real app.

One app per module (app_harness.running_app on a long-context tiny random llama, see
browser_harness.py); each test opens a new page on a chat it creates (the laptop tests share one
browser context for its cache, with localStorage cleared after each), so tests do not depend on
each other. The model writes gibberish: the tests look at how replies stream and stop,
not at what they say. Screenshots of the main states go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import pytest

from app_harness import counted_forwards, running_app
from browser_harness import (MODEL_ID, browser_app_config, find_chromium, launch_chromium,
                             leave_a_core_for_the_browser)

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python package) is not installed")
expect = sync_api.expect

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(find_chromium() is None,
                       reason="no chromium binary (apt-get install chromium, or set CHROMIUM_PATH)"),
]

OWNER = "local"
LAPTOP = {"width": 1366, "height": 850}
PHONE = {"width": 390, "height": 844}
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
WAIT_MS = 15_000  # default for every Playwright wait
REPLY_MS = 60_000  # a whole (short) reply, or a model load
# The tiny model's greedy reply to this prompt never picks the end token ("Write a very long story."
# does after 45 tokens), so max_tokens alone decides how long it runs.
LONG_PROMPT = "Tell me about the quick brown fox."
# Records the length of the last reply bubble at every change of the chat, inside the page: polling
# from Playwright (or a timer, which a busy page throttles) can miss the steps of a fast reply.
RECORD_REPLY_LENGTHS = """() => {
  window.replyLengths = [];
  window.replyObserver = new MutationObserver(() => {
    const bubbles = document.querySelectorAll('[data-testid=bot]');
    window.replyLengths.push(bubbles.length ? bubbles[bubbles.length - 1].innerText.length : 0);
  });
  window.replyObserver.observe(document.querySelector('#chatbot'),
                               {subtree: true, childList: true, characterData: true});
}"""


# ----- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory, model_cache, bundled_model):
    config = browser_app_config(tmp_path_factory.mktemp("browser-app"), model_cache, bundled_model)
    with leave_a_core_for_the_browser(), running_app(config) as app:
        app.service.load_model(MODEL_ID)  # the first reply then streams at once
        yield app


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def new_context(browser, viewport):
    context = browser.new_context(viewport=viewport, reduced_motion="reduce")  # no sliding sidebar
    context.set_default_timeout(WAIT_MS)
    return context


def new_page(context):
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    return page


@pytest.fixture(scope="module")
def laptop(browser):
    """One context for the laptop-sized tests: its HTTP cache makes each page load quicker."""
    context = new_context(browser, LAPTOP)
    yield context
    context.close()


@pytest.fixture
def page(laptop, running):
    page = new_page(laptop)
    yield page
    errors = page.js_errors
    if page.url.startswith(running.url):
        page.evaluate("() => localStorage.clear()")  # the next test starts on its own newest chat
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ----- helpers ----------------------------------------------------------------------------------
def shoot(page, name: str) -> None:
    """A screenshot for people to look at; a slow one is skipped, it is not what the test checks."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=str(SHOTS / f"{name}.png"), timeout=10_000)
    except sync_api.TimeoutError:
        warnings.warn(f"screenshot {name} timed out")


def open_chat(page, running, title: str, **settings) -> str:
    """Create a chat through the service and open the page on it (the newest chat is shown first)."""
    session_id = running.service.new_session(OWNER, title)["id"]
    if settings:
        running.service.update_session(OWNER, session_id, settings=settings)
    page.goto(running.url)
    expect_selected(page, session_id)
    return session_id


def expect_selected(page, session_id: str, timeout: int = WAIT_MS) -> None:
    expect(page.locator("#session-list input:checked")).to_have_value(session_id, timeout=timeout)


def session_label(page, title: str):
    return page.locator("#session-list label").filter(has_text=title)


def send(page, text: str) -> None:
    page.locator("#message-box textarea").fill(text)
    page.locator("#message-box textarea").press("Enter")


def last_reply(page) -> str:
    bubbles = page.locator("[data-testid=bot]")
    return bubbles.last.inner_text() if bubbles.count() else ""


def wait_reply_done(page, timeout: int = REPLY_MS) -> None:
    """Send is back (Stop hidden) and the status line shows the reply's figures."""
    expect(page.locator("#stop-btn")).to_be_hidden(timeout=timeout)
    expect(page.locator("#reply-stats")).to_contain_text("tok/s", timeout=WAIT_MS)


def type_into(locator, value: str) -> None:
    """Fill a field and make sure it keeps the value: a field that has just appeared (a tab or an
    accordion opened) can still receive its value from the server a moment later."""
    for _ in range(3):
        locator.fill(value)
        time.sleep(0.3)
        if locator.input_value() == value:
            return
    raise AssertionError(f"the field did not keep {value!r}")


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def choose(page, dropdown: str, value: str) -> None:
    """Pick `value` in a Gradio dropdown."""
    page.locator(f"{dropdown} input").click()
    page.locator(f"[role=option][aria-label='{value}']").click()
    expect(page.locator(f"{dropdown} input")).to_have_value(value)


def table_row(page, table: str, first_cell: str):
    """Rows of a Gradio Dataframe (a plain table, or divs with role=row once it virtualises)."""
    return page.locator(f"{table} [role=row]").filter(has_text=first_cell)


def expect_row(page, table: str, first_cell: str, contains, timeout: int = WAIT_MS) -> None:
    row = table_row(page, table, first_cell)
    expect(row).to_contain_text(contains, timeout=timeout)


def toast(page, text: str):
    return page.locator("[data-testid=toast-body]").filter(has_text=text)


def same_text(stored: str, shown: str) -> bool:
    """The page renders replies as Markdown, which eats spaces and some punctuation: compare the rest."""
    def letters(text):
        return re.sub(r"[^A-Za-z0-9]", "", text)
    return bool(letters(stored)) and letters(stored) == letters(shown)


def session_ids(running) -> list[str]:
    return [s["id"] for s in running.service.list_sessions(OWNER)]


def stored_reply(running, session_id: str) -> dict:
    return [m for m in running.service.messages(OWNER, session_id) if m["role"] == "assistant"][-1]


# ----- chat -------------------------------------------------------------------------------------
def test_reply_streams_into_the_page(page, running):
    session_id = open_chat(page, running, "Streaming", temperature=0, max_tokens=100)
    shoot(page, "laptop-empty-chat")
    page.evaluate(RECORD_REPLY_LENGTHS)
    # A tiny model can finish 100 tokens before the page's first update: pace it like a real one.
    with counted_forwards(running.service, MODEL_ID, delay_s=0.04):
        send(page, LONG_PROMPT)
        expect(page.locator("#stop-btn")).to_be_visible()
        expect(page.locator("#send-btn")).to_be_hidden()
        wait_reply_done(page)
    shoot(page, "laptop-replied")

    lengths = page.evaluate("() => { window.replyObserver.disconnect(); return window.replyLengths; }")
    steps = [n for before, n in zip(lengths, lengths[1:]) if n > before]
    assert len(steps) >= 3, f"the reply did not grow in steps: {lengths}"
    stored = stored_reply(running, session_id)
    assert same_text(stored["content"], last_reply(page))
    assert stored["stats"]["completion_tokens"] <= 100
    expect(page.locator("#model-status")).to_contain_text("loaded")
    expect(session_label(page, "Streaming")).to_be_visible()


def test_stop_ends_a_long_reply(page, running):
    session_id = open_chat(page, running, "Long reply")
    open_tab(page, "Settings")  # greedy decoding never picks the end token of the random model
    type_into(page.locator("#temperature input[type=number]"), "0")
    type_into(page.locator("#max-tokens input[type=number]"), "4000")
    page.locator("#max-tokens input[type=number]").press("Tab")
    page.locator("#save-settings").click()
    expect(toast(page, "Settings saved")).to_be_visible()
    settings = running.service.get_session(OWNER, session_id)["settings"]
    assert settings["max_tokens"] == 4000 and settings["temperature"] == 0

    send(page, LONG_PROMPT)
    page.wait_for_function("() => { const b = document.querySelectorAll('[data-testid=bot]');"
                           " return b.length && b[b.length - 1].innerText.length > 20; }", timeout=REPLY_MS)
    shoot(page, "laptop-streaming")
    page.locator("#stop-btn").dispatch_event("click")  # no scrolling into view while the page is busy
    wait_reply_done(page)
    shown = last_reply(page)
    time.sleep(1.0)
    assert last_reply(page) == shown, "the reply kept growing after Stop"
    expect(page.locator("#reply-stats")).to_contain_text("stopped")
    shoot(page, "laptop-stopped")

    stored = stored_reply(running, session_id)
    assert stored["stats"]["finish_reason"] == "cancelled"
    assert 0 < stored["stats"]["completion_tokens"] < 4000
    assert same_text(stored["content"], shown)


# ----- sessions ---------------------------------------------------------------------------------
def test_create_switch_rename_and_delete_chats(page, running):
    alpha = open_chat(page, running, "Alpha")
    page.locator("#new-chat").click()
    expect(page.locator("#session-list input:checked")).not_to_have_value(alpha)
    fresh = page.locator("#session-list input:checked").get_attribute("value")
    assert fresh in session_ids(running)

    page.get_by_text("Rename or delete").click()
    title_box = page.locator("#rename-box textarea, #rename-box input").first
    expect(title_box).to_have_value("New chat")  # the new chat's title has arrived
    type_into(title_box, "Beta")
    page.locator("#rename-btn").click()
    expect(session_label(page, "Beta")).to_be_visible()
    assert running.service.get_session(OWNER, fresh)["title"] == "Beta"

    session_label(page, "Alpha").click()
    expect_selected(page, alpha)
    expect(page.locator("#rename-box textarea, #rename-box input").first).to_have_value("Alpha")

    page.locator("#delete-btn").click()
    expect(page.locator("#confirm-delete")).to_be_visible()
    shoot(page, "laptop-confirm-delete")
    page.locator("#keep-chat").click()
    expect(page.locator("#confirm-delete")).to_be_hidden()
    assert alpha in session_ids(running)

    page.locator("#delete-btn").click()
    page.locator("#confirm-delete").click()
    expect(session_label(page, "Alpha")).to_have_count(0)
    expect(page.locator("#session-list input:checked")).not_to_have_value(alpha)
    assert alpha not in session_ids(running)


def test_reload_returns_to_the_same_chat(page, running):
    first = running.service.new_session(OWNER, "Remembered")["id"]
    running.service.store.add_message(OWNER, first, "user", "a message worth keeping")
    open_chat(page, running, "Newer chat")  # the newest chat is the one a fresh browser sees
    key = "local-llm-last-session"
    before = page.evaluate("key => localStorage.getItem(key)", key)
    session_label(page, "Remembered").click()
    expect_selected(page, first)
    expect(page.locator("[data-testid=user]").last).to_contain_text("a message worth keeping")
    page.wait_for_function("([key, before]) => localStorage.getItem(key) !== before", arg=[key, before])
    page.reload()
    expect_selected(page, first)
    expect(page.locator("[data-testid=user]").last).to_contain_text("a message worth keeping")


# ----- files ------------------------------------------------------------------------------------
def test_upload_a_file_then_remove_it(page, running, tmp_path):
    session_id = open_chat(page, running, "With a file")
    notes = tmp_path / "notes.txt"
    notes.write_text("The meeting is on Tuesday at ten.\n" * 20, encoding="utf-8")
    open_tab(page, "Files")
    page.locator("#uploader input[type=file]").set_input_files(str(notes))
    expect_row(page, "#files-table", "notes.txt", "ready")
    shoot(page, "laptop-file-ready")
    [record] = running.service.list_files(OWNER, session_id)
    assert record["state"] == "ready" and record["tokens"] > 0

    choose(page, "#remove-dd", "notes.txt")
    page.locator("#remove-btn").click()
    expect(table_row(page, "#files-table", "notes.txt")).to_have_count(0)
    assert running.service.list_files(OWNER, session_id) == []


def test_errors_show_in_the_page_and_it_keeps_working(page, running, tmp_path):
    session_id = open_chat(page, running, "Errors", temperature=0, max_tokens=4)
    open_tab(page, "Files")
    program = tmp_path / "setup.exe"
    program.write_bytes(b"MZ\x90\x00" * 64)
    page.locator("#uploader input[type=file]").set_input_files(str(program))
    message = toast(page, "setup.exe")
    expect(message).to_contain_text("unsupported file type")
    assert len(message.first.inner_text()) < 200, "the error message is too long to read"
    time.sleep(0.5)  # the toast fades in
    shoot(page, "laptop-upload-error")
    assert running.service.list_files(OWNER, session_id) == []

    page.locator("#remove-btn").click()  # no file picked
    expect(toast(page, "Pick a file to remove")).to_be_visible()

    send(page, "Still there?")
    wait_reply_done(page)
    assert same_text(stored_reply(running, session_id)["content"], last_reply(page))


# ----- models -----------------------------------------------------------------------------------
def test_unload_and_load_a_model_from_the_panel(page, running):
    open_chat(page, running, "Models")
    open_tab(page, "Models")
    expect_row(page, "#models-table", MODEL_ID, MODEL_ID)
    choose(page, "#manage-dd", MODEL_ID)

    page.locator("#unload-btn").click()
    expect_row(page, "#models-table", MODEL_ID, re.compile(r"\bunloaded\b"))
    assert running.service.model_record(MODEL_ID)["state"] == "unloaded"

    page.locator("#load-btn").click()
    expect_row(page, "#models-table", MODEL_ID, re.compile(r"\bloaded\b"), timeout=REPLY_MS)
    assert running.service.model_record(MODEL_ID)["state"] == "loaded"
    shoot(page, "laptop-models")


# ----- phone ------------------------------------------------------------------------------------
def test_phone_layout_keeps_every_panel_reachable(browser, running):
    context = new_context(browser, PHONE)
    page = new_page(context)
    try:
        session_id = open_chat(page, running, "On the phone", temperature=0, max_tokens=8)
        expect(page.locator(".sidebar.open")).to_have_count(0)  # the chat list starts folded away
        expect(page.locator("#message-box textarea")).to_be_in_viewport()
        send(page, "Hello from a phone")
        wait_reply_done(page)
        expect(page.locator("#model-status")).to_be_in_viewport()
        shoot(page, "phone-chat")

        for tab, shows in (("Files", "#uploader"), ("Settings", "#system-prompt"), ("Models", "#models-table")):
            page.get_by_role("tab", name=tab).scroll_into_view_if_needed()
            open_tab(page, tab)
            page.locator(shows).scroll_into_view_if_needed()
            expect(page.locator(shows)).to_be_in_viewport()
            assert page.locator(shows).bounding_box()["width"] <= PHONE["width"]
        shoot(page, "phone-models-tab")

        page.locator(".sidebar .toggle-button").click()
        expect(page.locator(".sidebar.open")).to_have_count(1)
        expect(session_label(page, "On the phone")).to_be_in_viewport()
        shoot(page, "phone-chat-list")
        page.locator("#new-chat").click()
        expect(page.locator(".sidebar.open")).to_have_count(0)
        expect(page.locator("#session-list input:checked")).not_to_have_value(session_id)
        assert not page.js_errors, page.js_errors
    finally:
        context.close()
