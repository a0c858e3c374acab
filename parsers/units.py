"""Byte counts for people: the one formatter every message and table uses.

Standard library only, so `models`, `inference` and `app.py` use it too (importing `parsers` is
instant); it lives here rather than beside app.py because the top level of the repository is fixed.
"""

from __future__ import annotations


def format_bytes(n: int | float) -> str:
    """512 B, 3.2 KiB, 50.0 MiB: binary units, as the sizes are counted (1 KiB = 1024 bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
