"""Lazy download of catalog models from the Hugging Face hub, with progress."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .catalog import ModelSpec

ProgressFn = Callable[[float, str], None]


class DownloadError(RuntimeError):
    """The file is not on disk and could not be fetched."""


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def ensure_local(spec: ModelSpec, progress: ProgressFn | None = None) -> Path:
    """The spec's GGUF path, downloading it from the hub first when it is missing."""
    if spec.path is not None and spec.path.exists():
        return spec.path
    if not spec.hub_repo:
        raise DownloadError(f"the model file {spec.path} is missing")
    how_to = f"download {spec.hub_file} from https://huggingface.co/{spec.hub_repo} into {spec.path.parent}/"
    if is_offline():
        raise DownloadError(f"{spec.name} is not on disk and the app is offline (HF_HUB_OFFLINE=1): {how_to}")
    try:
        from huggingface_hub import hf_hub_download
        from tqdm.auto import tqdm
    except ImportError as error:  # pragma: no cover - huggingface_hub is in requirements.txt
        raise DownloadError(f"huggingface_hub is not installed: {how_to}") from error

    class _Progress(tqdm):
        def update(self, n=1):
            result = super().update(n)
            if progress and self.total:
                progress(min(self.n / self.total, 1.0), f"downloading {spec.hub_file}: {self.n / 2**20:,.0f} MiB")
            return result

    try:
        path = hf_hub_download(spec.hub_repo, spec.hub_file, local_dir=spec.path.parent, tqdm_class=_Progress,
                               etag_timeout=10)
    except Exception as error:  # network, auth, 404: all end as one clear message
        raise DownloadError(f"could not download {spec.name} ({type(error).__name__}: {error}); "
                            f"you can {how_to}") from error
    return Path(path)
