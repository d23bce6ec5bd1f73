"""Typed errors shared by every layer. Pure Python; imports nothing heavy.

Every user-facing error names the field at fault and, where it helps, what to do next.
"""
from __future__ import annotations


class LoongError(Exception):
    """Base of Loong's own errors."""


class InvalidRequestError(LoongError, ValueError):
    """A request (prompt or sampling parameter) is invalid; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class ModelLoadError(LoongError, ValueError):
    """A model path, file, architecture or tensor shape cannot be used."""


class OutOfKVBlocksError(LoongError, RuntimeError):
    """The block pool cannot satisfy an allocation (callers check `can_allocate` first)."""
