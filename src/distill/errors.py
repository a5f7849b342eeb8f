"""Errors every kind shares."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input data: a missing, corrupt or inconsistent file. The message names the file."""
