"""How long does appending one message take as a session's history grows?

Appends real messages (alternating user/assistant, realistic sizes) to one
session in a temporary data dir and prints the mean milliseconds per
``SessionStore.add_message`` (atomic write + fsync of the session file and the
index) around each checkpoint.

    python bench/sessions_bench.py [--messages 2000] [--chars 1200] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sessions import LOCAL_USER, SessionStore  # noqa: E402

WINDOW = 20  # appends averaged at each checkpoint


def run(total: int, chars: int, checkpoints: list[int]) -> dict[int, float]:
    """Append ``total + WINDOW`` messages; mean ms per append from each checkpoint."""
    timings: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Path(tmp))
        session_id = store.create(LOCAL_USER, "bench")["id"]
        for i in range(total + WINDOW):
            role = "user" if i % 2 == 0 else "assistant"
            size = chars // 6 if role == "user" else chars
            content = (f"message {i} " + "lorem ipsum dolor sit amet ") * (size // 27 + 1)
            start = time.perf_counter()
            store.add_message(LOCAL_USER, session_id, role, content[:size], model_id="bench", tokens=size // 4)
            timings.append((time.perf_counter() - start) * 1000)
        sizes = [f.stat().st_size for f in (Path(tmp) / "sessions" / session_id).glob("*.json")]
    print(f"session on disk at the end: {sum(sizes) / 1e6:.1f} MB in {len(sizes)} files, "
          f"largest {max(sizes) / 1e6:.2f} MB")
    return {n: statistics.mean(timings[n:n + WINDOW]) for n in checkpoints}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--chars", type=int, default=1200, help="assistant message size")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    checkpoints = [n for n in (0, 500, 1000, 2000) if n <= args.messages]
    result = run(args.messages, args.chars, checkpoints)
    for n, ms in result.items():
        print(f"{n:>5} messages: {ms:7.2f} ms per append")
    if args.json:
        args.json.write_text(json.dumps({"ms_per_append": {str(n): round(ms, 3) for n, ms in result.items()}}))


if __name__ == "__main__":
    main()
