"""Exceptions the engine raises on purpose. The CLI turns them into one-line errors with exit code 2."""

from __future__ import annotations


class SkiplockError(Exception):
    """Base of every error we raise deliberately; its message is meant for the user."""


class ConfigError(SkiplockError):
    """Bad configuration, bad environment, or missing binaries."""


class ValidationError(SkiplockError):
    """Bad input (flow name, payload, options). Names the item that was wrong."""


class SchemaOutdated(SkiplockError):
    """The database schema is older than this code needs."""


class DatabaseUnavailable(SkiplockError):
    """The database could not be reached."""


class PermanentError(Exception):
    """Raised by a handler: the job must not be retried and goes straight to dead letters."""
