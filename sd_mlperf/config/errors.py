"""The configuration error type, apart from the loader so that rule tables (closed_division.py) can raise it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and the fix."""
