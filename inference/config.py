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
    """90% of the free GPU memory when CUDA is present, else 70% of the RAM available now."""
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
    max_sessions_per_user: int = 1000
    parse_timeout_s: float = 120.0
    parse_workers: int = 2
    max_context: int = 8192
    batching: bool = True  # continuous batching of concurrent generations per model
    prefix_cache: bool = True  # reuse a session's KV cache across turns
    prefix_cache_bytes: int = 256 * 2**20
    weights: str = "auto"  # "auto" | "quantized" | "dense": how GGUF weights are held (models/loader.py)
    kernels: str = "auto"  # "auto" | "torch" | "native": CPU kernels of quantized weights (models/loader.py)

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


def parse_bool(text: str) -> bool:
    """'1', 'true', 'yes', 'on' -> True; '0', 'false', 'no', 'off' -> False."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a yes/no value: {text!r} (use 1 or 0, true or false)")


def parse_auth_list(text: str) -> list[tuple[str, str]]:
    """LLM_AUTH: 'alice:pw1,bob:pw2', the same as `--auth alice:pw1 --auth bob:pw2`."""
    logins = [parse_auth(part.strip()) for part in str(text).split(",") if part.strip()]
    if not logins:
        raise argparse.ArgumentTypeError("wants USER:PASS[,USER:PASS...]")
    return logins


def parse_remote_list(text: str) -> list[str]:
    """LLM_REMOTE: `--remote` values separated by ';' (a value holds commas itself)."""
    return [check_remote(part.strip()) for part in str(text).split(";") if part.strip()]


def parse_weights(text: str) -> str:
    if text not in WEIGHTS:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(WEIGHTS)}: {text!r}")
    return text


def parse_kernels(text: str) -> str:
    if text not in KERNELS:
        raise argparse.ArgumentTypeError(f"not one of {', '.join(KERNELS)}: {text!r}")
    return text


WEIGHTS = ("auto", "quantized", "dense")
KERNELS = ("auto", "torch", "native")

# Every option's environment variable, and how its text is read: a Space (or a container) starts
# `python app.py` with no arguments, so each setting must be reachable from the environment.
# The command line wins over the environment.
ENVIRONMENT = {  # argparse dest -> (variable, parser)
    "host": ("GRADIO_SERVER_NAME", str),
    "port": ("GRADIO_SERVER_PORT", int),
    "data_dir": ("LLM_DATA_DIR", Path),
    "memory_budget": ("LLM_MEMORY_BUDGET", parse_size),
    "idle_unload": ("LLM_IDLE_UNLOAD", parse_duration),
    "auth": ("LLM_AUTH", parse_auth_list),
    "api_key": ("LLM_API_KEY", str),
    "share": ("LLM_SHARE", parse_bool),
    "remote": ("LLM_REMOTE", parse_remote_list),
    "preload": ("LLM_PRELOAD", parse_bool),
    "max_concurrent": ("LLM_MAX_CONCURRENT", int),
    "max_queue": ("LLM_MAX_QUEUE", int),
    "max_tokens_limit": ("LLM_MAX_TOKENS_LIMIT", int),
    "max_prompt_chars": ("LLM_MAX_PROMPT_CHARS", int),
    "max_upload": ("LLM_MAX_UPLOAD", parse_size),
    "max_files": ("LLM_MAX_FILES", int),
    "max_sessions": ("LLM_MAX_SESSIONS", int),
    "parse_timeout": ("LLM_PARSE_TIMEOUT", parse_duration),
    "batching": ("LLM_BATCHING", parse_bool),
    "prefix_cache": ("LLM_PREFIX_CACHE", parse_bool),
    "max_context": ("LLM_MAX_CONTEXT", int),
    "weights": ("LLM_WEIGHTS", parse_weights),
    "cpu_kernels": ("LLM_CPU_KERNELS", parse_kernels),
}

EPILOG = """Every option can also be set in the environment (named above); the command line wins.
Also read: LOG_LEVEL (DEBUG, INFO, WARNING or ERROR; default INFO), and HF_HUB_OFFLINE=1 (never
try the network: a hub model that is not on disk fails at once with where to put its file).
Stop the app with Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    """The command line. Options not given are absent from the result (the environment or AppConfig fills them)."""
    parser = argparse.ArgumentParser(
        prog="python app.py", epilog=EPILOG, argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Local LLM inference service: GGUF models, a streaming chat UI, sessions, files,\n"
                    "and an OpenAI-compatible API, in one process.",
    )

    def option(*flags, dest: str, default: str, help: str, env_form: str = "", **kwargs) -> None:
        """`help`, then the real default and the environment variable, each said once."""
        variable = ENVIRONMENT[dest][0]
        parser.add_argument(*flags, dest=dest, help=f"{help} (default: {default}; env {variable}{env_form})",
                            **kwargs)

    option("--host", dest="host", default="127.0.0.1, this machine only",
           help="address to bind; 0.0.0.0 serves every network interface")
    option("--port", dest="port", type=int, default="7860",
           help="one port for the UI, the Gradio API, /health, /v1 and /api (Ollama)")
    option("--data-dir", dest="data_dir", type=Path, default="./data",
           help="where models, sessions, uploads and caches live")
    option("--memory-budget", dest="memory_budget", type=parse_size, metavar="SIZE",
           default="70%% of the RAM available at start, or 90%% of free GPU memory with CUDA",
           help="memory for loaded models, e.g. 8GiB or 512MB; the least recently used idle model is unloaded "
                "to make room")
    option("--idle-unload", dest="idle_unload", type=parse_duration, metavar="DURATION", default="30m",
           help="unload unpinned models idle this long, e.g. 30m, 2h, or off")
    option("--auth", dest="auth", type=parse_auth, action="append", metavar="USER:PASS", default="no login",
           help="require a login; repeat for several users; each user sees only their own sessions",
           env_form="=alice:pw1,bob:pw2")
    option("--api-key", dest="api_key", metavar="KEY", default="none, /v1 and /api are open",
           help="require 'Authorization: Bearer KEY' on the /v1 and /api routes")
    option("--share", dest="share", action="store_true", default="off", env_form="=1",
           help="also serve through a public Gradio share link, which needs internet")
    option("--remote", dest="remote", type=check_remote, action="append", metavar="ID=URL[,model=NAME][,key=KEY]",
           default="none",
           help="add a remote OpenAI-compatible engine to the catalog, e.g. vllm=http://gpu-box:8000/v1,model="
                "meta-llama/Llama-3.1-8B-Instruct; repeat for several", env_form=", several separated by ';'")
    option("--no-preload", dest="preload", action="store_false", env_form="=0",
           default="the default model loads in the background at start",
           help="do not load the default model at start; it then loads with the first message")
    option("--max-concurrent", dest="max_concurrent", type=int, metavar="N", default="8",
           help="generations running at once")
    option("--max-queue", dest="max_queue", type=int, metavar="N", default="64",
           help="generations waiting for a slot before 'busy' answers (/v1, /api: 429); the UI and the Gradio API "
                "wait in Gradio's queue, which shows their place")
    option("--max-tokens-limit", dest="max_tokens_limit", type=int, metavar="N", default="4096",
           help="largest max_tokens a request may ask")
    option("--max-prompt-chars", dest="max_prompt_chars", type=int, metavar="N", default="100000",
           help="longest message (UI, Gradio API) or whole conversation (/v1) a request may send")
    option("--max-upload", dest="max_upload", type=parse_size, metavar="SIZE", default="50MiB",
           help="largest uploaded file")
    option("--max-files", dest="max_files", type=int, metavar="N", default="50", help="files per session")
    option("--max-sessions", dest="max_sessions", type=int, metavar="N", default="1000",
           help="chats each user may keep; a new one past it is refused until some are deleted")
    option("--parse-timeout", dest="parse_timeout", type=parse_duration, metavar="DURATION", default="120s",
           help="time limit to parse one file")
    option("--no-batching", dest="batching", action="store_false", env_form="=0",
           default="concurrent generations on one model share each decode step",
           help="run each generation on its own, not batched with others")
    option("--no-prefix-cache", dest="prefix_cache", action="store_false", env_form="=0",
           default="each session keeps its last turn's KV cache",
           help="recompute the whole prompt at every turn")
    option("--max-context", dest="max_context", type=int, metavar="TOKENS", default="8192",
           help="cap on the context window served (bounds KV-cache memory)")
    option("--weights", dest="weights", type=parse_weights, metavar="|".join(WEIGHTS),
           default="auto: quantized on the CPU, dense on CUDA",
           help="quantized: keep the GGUF's 4-8 bit blocks in memory and multiply with int4/int8 CPU kernels; "
                "dense: dequantize to bfloat16/float16 (the exact path; CUDA always)")
    option("--cpu-kernels", dest="cpu_kernels", type=parse_kernels, metavar="|".join(KERNELS),
           default="auto: native on AVX2 CPUs without native bfloat16 when it builds, else torch",
           help="what multiplies quantized weights in decode steps: native = small AVX2 C kernels with int8 "
                "activations, built with the system's C compiler on first use; torch = torch's int4/int8 kernels")
    return parser


def environment_values(parser: argparse.ArgumentParser, env) -> dict:
    """The options set in `env`, parsed; a bad value ends the program with a usage error naming the variable."""
    values = {}
    for dest, (variable, parse) in ENVIRONMENT.items():
        text = env.get(variable, "").strip()
        if not text:
            continue
        try:
            values[dest] = parse(text)
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"environment variable {variable}={text!r}: {error}")
    return values


def config_from_args(argv: list[str] | None = None, env=None) -> AppConfig:
    """An AppConfig from the command line, then the environment (`os.environ` unless given), then the defaults."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values = {**environment_values(parser, os.environ if env is None else env), **args}
    default = AppConfig()

    def pick(dest: str, fallback):
        return values[dest] if dest in values else fallback

    parse_timeout = pick("parse_timeout", default.parse_timeout_s)
    return AppConfig(
        host=pick("host", default.host), port=pick("port", default.port), data_dir=pick("data_dir", default.data_dir),
        memory_budget=pick("memory_budget", None), idle_unload_s=pick("idle_unload", default.idle_unload_s),
        auth=list(pick("auth", [])), api_key=pick("api_key", None) or None, share=pick("share", False),
        remotes=list(pick("remote", [])), preload=pick("preload", True),
        max_concurrent_generations=max(1, pick("max_concurrent", default.max_concurrent_generations)),
        max_queue=max(0, pick("max_queue", default.max_queue)),
        max_tokens_limit=max(1, pick("max_tokens_limit", default.max_tokens_limit)),
        max_prompt_chars=max(1, pick("max_prompt_chars", default.max_prompt_chars)),
        max_upload_bytes=pick("max_upload", default.max_upload_bytes),
        max_files_per_session=max(1, pick("max_files", default.max_files_per_session)),
        max_sessions_per_user=max(1, pick("max_sessions", default.max_sessions_per_user)),
        parse_timeout_s=parse_timeout or default.parse_timeout_s,
        max_context=max(256, pick("max_context", default.max_context)),
        batching=pick("batching", True), prefix_cache=pick("prefix_cache", True), weights=pick("weights", "auto"),
        kernels=pick("cpu_kernels", "auto"),
    )


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env=None) -> str:
    """LOG_LEVEL from the environment (default INFO), checked: a typo is a usage error, not a traceback."""
    level = (os.environ if env is None else env).get("LOG_LEVEL", "").strip().upper() or "INFO"
    if level not in LOG_LEVELS:
        build_parser().error(f"environment variable LOG_LEVEL={level!r}: use one of {', '.join(LOG_LEVELS)}")
    return level


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(config: AppConfig) -> str | None:
    """One warning for an app reachable from the network (a non-loopback address, or --share) that lacks a login
    or an API key; None when it is guarded or only this machine can reach it."""
    if config.host in LOOPBACK and not config.share:
        return None
    where = "a public share link" if config.share else config.host
    if not config.auth and not config.api_key:
        return (f"listening on {where} without --auth or --api-key (LLM_AUTH, LLM_API_KEY): anyone who can reach "
                "the port can chat, upload files and load models; see SECURITY.md")
    if not config.api_key:
        return (f"listening on {where} without --api-key (LLM_API_KEY): --auth guards the UI and the Gradio API, "
                "but anyone who can reach the port can use the /v1 and /api routes")
    if not config.auth:
        return (f"listening on {where} without --auth (LLM_AUTH): --api-key guards /v1 and /api, but anyone who can reach "
                "the port can use the UI and the Gradio API")
    return None
