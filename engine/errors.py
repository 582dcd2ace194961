"""Exceptions the engine raises on purpose. The CLI turns them into one-line errors with exit code 2."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from engine.limits import MAX_DURATION_S


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


class JobNotFound(ValidationError):
    """No job has this id (never enqueued, or purged after it ended)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class RunNotFound(ValidationError):
    """No run has this id (never enqueued, or purged after it finished)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} not found")
        self.run_id = run_id


class JobFailed(SkiplockError):
    """Raised by `Queue.wait`: the job ended without a result. Base of JobDead and JobCancelled."""

    def __init__(self, job_id: int, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobDead(JobFailed):
    """Raised by `Queue.wait`: the job is a dead letter (attempts used up, or a permanent error)."""

    def __init__(self, job_id: int, error_type: str | None, error_message: str | None) -> None:
        super().__init__(job_id, f"job {job_id} is dead: {error_type or 'error'}: {error_message or ''}".rstrip(": "))
        self.error_type = error_type
        self.error_message = error_message


class JobCancelled(JobFailed):
    """Raised by `Queue.wait`: the job was cancelled. Also what `ctx.check_cancelled()` raises in a
    handler whose running job an operator cancelled (the job ends cancelled, never retried)."""

    def __init__(self, job_id: int) -> None:
        super().__init__(job_id, f"job {job_id} was cancelled")


class WaitTimeout(SkiplockError):
    """Raised by `Queue.wait`: the job had not ended when the timeout passed (it may still)."""

    def __init__(self, job_id: int, timeout: float, status: str) -> None:
        super().__init__(f"job {job_id} still {status} after {timeout:g} s")
        self.job_id = job_id
        self.status = status


class UnknownFlow(ValidationError):
    """Enqueue to a flow no engine has registered (pass allow_unknown_flow=True to allow it)."""


class Snooze(Exception):
    """Raised by a handler: put the job back to pending for `delay` seconds (a number or a timedelta)
    without counting an attempt or a failure. Its history gets an entry marked snoozed."""

    def __init__(self, delay: float | Any = 0.0) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_S):
            raise ValidationError(f"Snooze(delay): delay must be a finite number of seconds from 0 to "
                                  f"{MAX_DURATION_S:g} (or a timedelta), got {delay!r}")
        super().__init__(f"snoozed for {seconds:g}s")
        self.delay = float(seconds)


class PrivilegeMissing(SkiplockError):
    """The login role lacks privileges the command's role (engine/roles.py) has; names the GRANT."""
