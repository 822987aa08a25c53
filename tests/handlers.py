"""Handlers the tests load by their import path, as users' own would be."""

from __future__ import annotations

SEEN: list[str] = []


def record(text: str) -> None:
    SEEN.append(text)


def fail(text: str) -> None:
    raise RuntimeError(f"cannot handle {text!r}")
