"""The HTTP API beside the web UI, on the same port: OpenAI's `/v1` routes and `/health` (`openai`),
Ollama's `/api` routes (`ollama`), the request body bound (`limits`), and what every generating route
shares (`streams`)."""

from typing import Callable

from fastapi import APIRouter

from . import ollama, openai
from .limits import BodySizeLimit
from .streams import worker_pool


def create_router(service, api_key: str | None = None, health: Callable[[], dict] | None = None) -> APIRouter:
    """Every HTTP API route (`/health`, `/v1`, `/api`), behind `api_key` where one is set; both APIs'
    generations run on one worker pool, sized for the engine's slots. `health`: more fields for /health
    from whoever serves the routes (the app reports its web UI's state)."""
    workers = worker_pool(service.config)
    router = APIRouter(on_shutdown=[lambda: workers.shutdown(wait=False, cancel_futures=False)])
    router.include_router(openai.create_router(service, workers, api_key, health))
    router.include_router(ollama.create_router(service, workers, api_key))
    return router


__all__ = ["BodySizeLimit", "create_router"]
