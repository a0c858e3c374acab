"""Models: the catalog, GGUF reading and conversion, loading, and the manager that owns them.

Importing this package is cheap; torch loads with `models.loader`/`models.manager`, transformers only for
what needs it (conversion, the dense path, other families' tokenizers: `convert.import_transformers`).
"""

from .catalog import DEFAULT_MODEL_ID, Catalog, ModelSpec, RemoteEngine, assemble_default_model
from .gguf_file import GGUFError, GGUFHeader, read_header

__all__ = [
    "DEFAULT_MODEL_ID", "Catalog", "ModelSpec", "RemoteEngine", "assemble_default_model",
    "GGUFError", "GGUFHeader", "read_header",
]
