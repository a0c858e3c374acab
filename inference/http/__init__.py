"""The HTTP API beside the web UI, on the same port: OpenAI's `/v1` routes and `/health` (`openai`),
the request body bound (`limits`), and what every generating route shares (`streams`)."""

from .limits import BodySizeLimit
from .openai import create_router

__all__ = ["BodySizeLimit", "create_router"]
