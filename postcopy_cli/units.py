"""Sizes and rates as users write them (light: imported by every command)."""
from __future__ import annotations


def parse_size(text: str) -> int:
    """'4096', '64K', '512M', '1G' -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(t, 0)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (bytes, or a number with K, M, G or T)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value * mult


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """'1 page', '2 pages', '0 pages' (``plural_form`` when adding an s is wrong)."""
    return f"{n} {singular if n == 1 else (plural_form or singular + 's')}"
