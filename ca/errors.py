"""Errors shared across the CLI and the library."""

from __future__ import annotations


class CLIError(Exception):
    """An expected failure of a command: printed as one line, exit status 1."""
