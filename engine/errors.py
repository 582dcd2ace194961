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
    """Raised by `Queue.wait`: the job was cancelled."""

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
