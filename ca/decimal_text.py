"""Decimal digits as a request or a command line may give them.

`str.isdigit()` is true for '²' and '٣' too, which `int()` then refuses (a 500) or
reads as another number ('５' is 5): every number hsmca parses from text is ASCII
0-9 only.
"""

from __future__ import annotations


def is_decimal(text: str) -> bool:
    """True if `text` is one or more of the ASCII digits 0-9 and nothing else."""
    return text.isascii() and text.isdigit()
