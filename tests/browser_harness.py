"""Browser side of the UI tests: Debian's chromium through Playwright, and the app set up for it.

    browser = launch_chromium(playwright)      # /usr/bin/chromium; None when it is not installed
    config = browser_app_config(tmp, model_cache, bundled_model)
    with running_app(config) as app: ...       # app_harness: the real app on a loopback port

`python tests/browser_harness.py` serves the same app by hand and prints its address.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic"]
MODEL_ID = "tiny-llama"
# A context of 4096 lets a greedy reply of the random tiny model run for thousands of tokens (tens of
# seconds), long enough to stop it by hand; the conftest's tiny models stop at 256.
MODEL_CONTEXT = 4096


def find_chromium() -> str | None:
    """The chromium binary to drive (env CHROMIUM_PATH first), or None."""
    for candidate in (os.environ.get("CHROMIUM_PATH"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def launch_chromium(playwright, executable: str | None = None):
    """A headless chromium, or None when no binary is installed."""
    executable = executable or find_chromium()
    if executable is None:
        return None
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)


def write_model(folder: Path) -> Path:
    """gguf_factory's tiny random llama with a long context, as <folder>/tiny-llama.gguf."""
    from gguf_factory import write_tiny_gguf

    return write_tiny_gguf(Path(folder) / f"{MODEL_ID}.gguf", "llama", context_length=MODEL_CONTEXT)


def browser_app_config(data_dir: Path, model_cache: Path, bundled_model: Path | None = None, **overrides):
    """app_harness's test config, serving only the long-context tiny llama (as "tiny-llama").

    torch's kernels on every CPU: the Stop test needs a greedy reply of the random model that never
    picks its end token, which holds with their numbers (the AVX2 kernel's ends after 82 tokens)."""
    from app_harness import app_config

    model = write_model(Path(data_dir) / "source")
    return app_config(Path(data_dir) / "app", {"llama": model}, model_cache, bundled_model,
                      max_context=MODEL_CONTEXT, **{"kernels": "torch", **overrides})


@contextlib.contextmanager
def leave_a_core_for_the_browser() -> Iterator[None]:
    """On a small machine torch's threads and chromium fight for the cores, and the page then skips
    most streaming updates; the tiny test model needs one thread. Restored on exit."""
    import torch

    before = torch.get_num_threads()
    if (os.cpu_count() or 1) <= 4:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":  # python tests/browser_harness.py [DATA_DIR]
    import sys
    import tempfile
    import time

    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here.parent), str(here)]
    from app_harness import running_app

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="browser-app-"))
    (folder / "cache").mkdir(parents=True, exist_ok=True)
    with running_app(browser_app_config(folder, folder / "cache")) as app:
        print(app.url, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
