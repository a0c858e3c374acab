"""The progress callback that downloads, conversions and loads report through."""

from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[float, str], None]
"""progress(fraction done in [0, 1], what is happening now); the UI shows it as a progress bar."""
