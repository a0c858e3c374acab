"""Source files: decoded like plain text, plus the language for a Markdown fence."""

from __future__ import annotations

from pathlib import Path

from .base import Document, ParseLimits
from .text import read_text

# Extension (lower case) -> Markdown fence label.
LANGUAGES = {
    ".py": "python", ".pyw": "python", ".pyi": "python",
    ".c": "c", ".h": "c",
    ".cpp": "cpp", ".hpp": "cpp", ".cc": "cpp", ".hh": "cpp",
    ".cxx": "cpp", ".hxx": "cpp", ".c++": "cpp", ".ino": "cpp",
    ".rs": "rust",
    ".go": "go",
    ".java": "java",
    ".kt": "kotlin", ".kts": "kotlin",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript",
    ".jsx": "jsx",
    ".ts": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".tsx": "tsx",
    ".rb": "ruby",
    ".php": "php",
    ".cs": "csharp",
    ".swift": "swift",
    ".scala": "scala", ".sc": "scala",
    ".sh": "bash", ".bash": "bash", ".zsh": "zsh", ".fish": "fish",
    ".ps1": "powershell", ".psm1": "powershell",
    ".bat": "batch", ".cmd": "batch",
    ".sql": "sql",
    ".html": "html", ".htm": "html",
    ".css": "css", ".scss": "scss", ".sass": "sass", ".less": "less",
    ".vue": "vue", ".svelte": "svelte",
    ".lua": "lua",
    ".r": "r",
    ".m": "objectivec", ".mm": "objectivec",
    ".pl": "perl", ".pm": "perl",
    ".hs": "haskell",
    ".toml": "toml",
    ".dart": "dart",
    ".ex": "elixir", ".exs": "elixir",
    ".erl": "erlang",
    ".clj": "clojure", ".cljs": "clojure",
    ".fs": "fsharp", ".fsx": "fsharp",
    ".ml": "ocaml", ".mli": "ocaml",
    ".jl": "julia",
    ".groovy": "groovy", ".gradle": "groovy",
    ".zig": "zig",
    ".nim": "nim",
    ".f90": "fortran", ".f95": "fortran",
    ".asm": "asm", ".s": "asm",
    ".proto": "protobuf",
    ".graphql": "graphql", ".gql": "graphql",
    ".tf": "hcl", ".hcl": "hcl",
    ".nix": "nix",
    ".sol": "solidity",
    ".vim": "vim",
    ".cmake": "cmake",
    ".mk": "makefile",
    ".dockerfile": "dockerfile",
}

# Known file names without a telling extension -> fence label.
FILENAMES = {
    "Dockerfile": "dockerfile", "Containerfile": "dockerfile",
    "Makefile": "makefile", "GNUmakefile": "makefile",
    "CMakeLists.txt": "cmake",
    "Rakefile": "ruby", "Gemfile": "ruby", "Podfile": "ruby",
    "Vagrantfile": "ruby", "Brewfile": "ruby",
    "Jenkinsfile": "groovy",
    ".bashrc": "bash", ".bash_profile": "bash", ".profile": "bash", ".zshrc": "zsh",
}


def parse(path: Path, limits: ParseLimits, name: str) -> Document:
    """Parse a source file into a Document with ``format`` "code" and its ``language``."""
    text, encoding = read_text(path, limits, name)
    metadata = {"format": "code", "name": name, "language": language_for(name), "encoding": encoding}
    return Document(text, metadata)


def language_for(name: str) -> str:
    """The fence label for a file name; KeyError if it is not a known source file."""
    known = known_filename(name)
    if known is not None:
        return FILENAMES[known]
    return LANGUAGES[Path(name).suffix.lower()]


def known_filename(name: str) -> str | None:
    """The FILENAMES key that ``name`` matches (any case; "Dockerfile.dev" too), or None."""
    base = Path(name).name.lower()
    if base.startswith(("dockerfile.", "containerfile.")):
        base = base.split(".", 1)[0]
    return _FILENAMES_LOWER.get(base)


_FILENAMES_LOWER = {key.lower(): key for key in FILENAMES}
