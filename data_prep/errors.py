"""The error every reader raises for bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """A source file is missing, corrupt or inconsistent; the message names it."""
