"""How admin commands print what the daemon answered: fixed-width columns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def table(rows: list[dict[str, Any]], empty: str,
          columns: list[tuple[str, int, Callable[[dict[str, Any]], str]]]) -> int:
    """Print `rows` as fixed-width columns (the last one as wide as it is); `empty` when
    there are none."""
    if not rows:
        print(empty)
        return 0
    print(" ".join(f"{head:{width}}" for head, width, _ in columns).rstrip())
    for row in rows:
        print(" ".join(f"{cell(row):{width}}" for _, width, cell in columns).rstrip())
    return 0
