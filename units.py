"""Byte counts for people: the one formatter every message and table uses.

Standard library only, imported by `parsers`, `models`, `inference` and `app.py` alike.
"""

from __future__ import annotations


def format_bytes(n: int | float) -> str:
    """512 B, 3.2 KiB, 50.0 MiB: binary units, as the sizes are counted (1 KiB = 1024 bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
