"""Command-line value types the benchmarks share. Torch-free: `baton --help` imports this."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def count(text: str) -> int:
    """A whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def parts_type(all_parts: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """The type of --only: a comma-separated, non-empty list of some of all_parts."""

    def parts(text: str) -> tuple[str, ...]:
        chosen = tuple(p.strip() for p in text.split(",") if p.strip())
        unknown = [p for p in chosen if p not in all_parts]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(all_parts)}, got {text!r}")
        return chosen

    return parts
