"""Lazy download of catalog models from the Hugging Face hub, with progress."""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from .catalog import ModelSpec
from .progress import ProgressFn


class DownloadError(RuntimeError):
    """The file is not on disk and could not be fetched."""


PROBE_TIMEOUT_S = 2.0


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def hub_endpoint() -> str:
    """The hub's address, as huggingface_hub will use it (HF_ENDPOINT, else https://huggingface.co)."""
    try:
        from huggingface_hub import constants

        default = constants.ENDPOINT
    except ImportError:  # pragma: no cover - huggingface_hub is in requirements.txt
        default = "https://huggingface.co"
    return os.environ.get("HF_ENDPOINT") or default


def hub_unreachable(endpoint: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached (one TCP connect, to it or to the HTTPS proxy), or None if it can.

    huggingface_hub retries a dead network for ~24 s with a warning each time; one short connect says
    the same at once.
    """
    url = urlsplit(endpoint or hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as error:
        reason = "timed out" if isinstance(error, TimeoutError) else (error.strerror or str(error))
        return f"{host}:{port} cannot be reached: {reason}"


def ensure_local(spec: ModelSpec, progress: ProgressFn | None = None) -> Path:
    """The spec's GGUF path, downloading it from the hub first when it is missing."""
    if spec.path is not None and spec.path.exists():
        return spec.path
    if not spec.hub_repo:
        raise DownloadError(f"the model file {spec.path} is missing")
    how_to = f"download {spec.hub_file} from https://huggingface.co/{spec.hub_repo} into {spec.path.parent}/"
    if is_offline():
        raise DownloadError(f"{spec.name} is not on disk and the app is offline (HF_HUB_OFFLINE=1): {how_to}")
    unreachable = hub_unreachable()
    if unreachable:
        raise DownloadError(f"{spec.name} is not on disk and the app is offline ({unreachable}): {how_to}")
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
