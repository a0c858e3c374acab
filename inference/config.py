"""AppConfig: the command line and environment, parsed once in `main()` and passed down."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
_TIME_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str) -> int:
    """'8GiB', '512MB', '1.5g', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 8GiB, 512MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float | None:
    """'30m', '2h', '90s', '0' or 'off' -> seconds (None = never)."""
    if str(text).strip().lower() in ("0", "off", "never", "none", ""):
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _TIME_UNITS:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 30m, 2h, 90s, off)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2).lower()]


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = str(text).partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth wants USER:PASS")
    if user == "local":  # the owner of every session without --auth, and the user /v1 acts for without a key
        raise argparse.ArgumentTypeError("--auth: the user name 'local' is reserved; pick another")
    return user, password


def check_remote(text: str) -> str:
    """`--remote ID=URL[,model=NAME][,key=KEY]`, checked now so a typo is a usage error, not a traceback."""
    from models.catalog import parse_remote_option

    try:
        parse_remote_option(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def default_memory_budget() -> int:
    """70% of the memory available now (of the GPU's when CUDA is present)."""
    try:
        import torch

        if torch.cuda.is_available():
            free, _total = torch.cuda.mem_get_info()
            return int(free * 0.9)
    except Exception:  # pragma: no cover - torch import problems leave the CPU default
        pass
    import psutil

    return int(psutil.virtual_memory().available * 0.7)


@dataclass
class AppConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = Path("./data")
    memory_budget: int | None = None  # None: default_memory_budget() at start
    idle_unload_s: float | None = 30 * 60
    auth: list[tuple[str, str]] = field(default_factory=list)
    api_key: str | None = None
    share: bool = False
    remotes: list[str] = field(default_factory=list)
    default_model: str = "gemma-3-270m"
    preload: bool = True  # load the default model in the background at start
    # limits that protect the machine
    max_concurrent_generations: int = 8
    max_queue: int = 64
    max_prompt_chars: int = 100_000
    max_tokens_limit: int = 4096
    max_upload_bytes: int = 50 * 1024 * 1024
    max_files_per_session: int = 50
    parse_timeout_s: float = 120.0
    parse_workers: int = 2
    max_context: int = 8192
    batching: bool = True  # continuous batching of concurrent generations per model
    prefix_cache: bool = True  # reuse a session's KV cache across turns
    prefix_cache_bytes: int = 256 * 2**20
    weights: str = "auto"  # "auto" | "quantized" | "dense": how GGUF weights are held (models/loader.py)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body on every route but file uploads: room for a `max_prompt_chars`
        prompt with every character JSON-escaped (6 bytes), and never under 4 MiB."""
        return max(4 * 2**20, 6 * self.max_prompt_chars + 2**20)

    @property
    def max_upload_body_bytes(self) -> int:
        """The largest upload request: the largest file and 1 MiB for the multipart framing."""
        return self.max_upload_bytes + 2**20

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="Local LLM inference service: GGUF models, streaming chat UI, sessions, files, and an "
                    "OpenAI-compatible API, in one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=env.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (env GRADIO_SERVER_NAME); 0.0.0.0 exposes the app to the network")
    parser.add_argument("--port", type=int, default=int(env.get("GRADIO_SERVER_PORT", "7860")),
                        help="port for the UI, the Gradio API and /v1 (env GRADIO_SERVER_PORT)")
    parser.add_argument("--data-dir", type=Path, default=Path(env.get("LLM_DATA_DIR", "./data")),
                        help="where models, sessions, uploads and caches live (env LLM_DATA_DIR)")
    parser.add_argument("--memory-budget", type=parse_size, default=env.get("LLM_MEMORY_BUDGET"),
                        help="memory for loaded models, e.g. 8GiB (env LLM_MEMORY_BUDGET; default: 70%% of "
                             "available RAM, or 90%% of free GPU memory)")
    parser.add_argument("--idle-unload", type=parse_duration, default="30m",
                        help="unload unpinned models idle this long, e.g. 30m, 2h, off")
    parser.add_argument("--auth", type=parse_auth, action="append", default=[], metavar="USER:PASS",
                        help="require a login; repeat for several users; each user sees only their sessions")
    parser.add_argument("--api-key", default=env.get("LLM_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on the /v1 routes (env LLM_API_KEY)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    parser.add_argument("--remote", type=check_remote, action="append", default=[],
                        metavar="ID=URL[,model=NAME][,key=KEY]",
                        help="add a remote OpenAI-compatible engine to the catalog, e.g. "
                             "vllm=http://gpu-box:8000/v1,model=meta-llama/Llama-3.1-8B-Instruct")
    parser.add_argument("--no-preload", dest="preload", action="store_false",
                        help="do not load the default model in the background at start")
    parser.add_argument("--max-concurrent", type=int, default=8, help="generations running at once")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="generations waiting for a slot before 'busy' answers (/v1: 429); the UI and the "
                             "Gradio API wait in Gradio's queue, which shows their place")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-chars", type=int, default=100_000,
                        help="longest message (UI, Gradio API) or whole conversation (/v1) a request may send")
    parser.add_argument("--max-upload", type=parse_size, default="50MB", help="largest uploaded file")
    parser.add_argument("--max-files", type=int, default=50, help="files per session")
    parser.add_argument("--parse-timeout", type=parse_duration, default="120s", help="time limit to parse one file")
    parser.add_argument("--no-batching", dest="batching", action="store_false",
                        help="run each generation on its own instead of batching concurrent ones")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="do not reuse a session's KV cache across turns")
    parser.add_argument("--max-context", type=int, default=8192,
                        help="cap on the context window served, in tokens (bounds KV-cache memory)")
    parser.add_argument("--weights", choices=("auto", "quantized", "dense"), default=env.get("LLM_WEIGHTS", "auto"),
                        help="quantized: keep the GGUF's 4-8 bit blocks in memory and multiply with int4/int8 "
                             "CPU kernels; dense: dequantize to bfloat16/float16 (the exact path; CUDA always); "
                             "auto: quantized on the CPU, dense on CUDA (env LLM_WEIGHTS)")
    return parser


def config_from_args(argv: list[str] | None = None) -> AppConfig:
    args = build_parser().parse_args(argv)
    budget = args.memory_budget
    if isinstance(budget, str):  # the environment default arrives unparsed
        budget = parse_size(budget)
    return AppConfig(
        host=args.host, port=args.port, data_dir=args.data_dir, memory_budget=budget,
        idle_unload_s=args.idle_unload, auth=list(args.auth), api_key=args.api_key or None, share=args.share,
        remotes=list(args.remote), preload=args.preload, max_concurrent_generations=max(1, args.max_concurrent),
        max_queue=max(0, args.max_queue), max_tokens_limit=max(1, args.max_tokens_limit),
        max_prompt_chars=max(1, args.max_prompt_chars),
        max_upload_bytes=args.max_upload, max_files_per_session=max(1, args.max_files),
        parse_timeout_s=args.parse_timeout or 120.0, max_context=max(256, args.max_context),
        batching=args.batching, prefix_cache=args.prefix_cache, weights=args.weights,
    )
