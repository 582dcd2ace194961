"""What the ack stores for a handler's return or exception: the one place that turns either into a
result text or a Failure, so a result or error that cannot be stored fails that job alone.

Rules: a result must encode with orjson as it is (no str() fallback) and hold no NUL (jsonb refuses
it); an error message is sanitised (NUL, lone surrogates) and redacted; an exception whose str()
raises is named by its type. Every BaseException a handler lets out fails its job alone.
"""

from __future__ import annotations

import random
from typing import Any, Final

import orjson

from engine.redact import redact_text
from engine.handlers import FlowRuntime, JobTimeout, format_traceback
from engine.store import Failure

MESSAGE_CHARS: Final = 2000


class ResultNotStorable(Exception):
    """The handler returned something the ack cannot store as jsonb."""


class HandlerExit(BaseException):
    """A handler called os._exit() in the worker process: its job fails, the worker goes on."""


class BatchResultError(Exception):
    """A batch handler returned something other than one outcome per job."""


def clean_text(text: str) -> str:
    """Text PostgreSQL can store: NUL is refused by text and jsonb, lone surrogates by UTF-8."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def encode_result(result: Any) -> str:
    """The result's JSON text, or ResultNotStorable naming why it cannot be stored."""
    try:
        text = orjson.dumps(result).decode()
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        detail = str(exc)
        prefix = "Type is not JSON serializable: "
        if detail.startswith(prefix):
            raise ResultNotStorable(f"result is not JSON serializable: {detail[len(prefix):]}") from None
        raise ResultNotStorable(f"result cannot be stored as JSON: {clean_text(detail)}") from None
    if "\\u0000" in text:
        raise ResultNotStorable("result contains a NUL character (\\u0000), which PostgreSQL jsonb cannot store")
    return text


def describe(exc: BaseException) -> tuple[str, str, str | None]:
    """(type name, message, traceback) of an exception, each safe to store and redacted."""
    error_type = clean_text(type(exc).__name__)
    try:
        message = str(exc)
    except BaseException as inner:  # a broken __str__ must not take the worker down
        message = f"<str() of the {error_type} raised {type(inner).__name__}>"
    try:
        trace: str | None = format_traceback(exc)
    except BaseException:
        trace = None
    message = redact_text(clean_text(message or error_type))[:MESSAGE_CHARS]
    return error_type, message, redact_text(clean_text(trace)) if trace is not None else None


def failure(flow: FlowRuntime, row: tuple[Any, ...], exc: BaseException) -> Failure:
    """The Failure the ack stores for job `row` (a claimed row: id, payload, attempts, ...)."""
    permanent = flow.is_permanent(exc)
    delay = 0.0 if permanent else flow.config.backoff.delay(row[2], random.random())
    error_type, message, trace = describe(exc)
    return Failure(row[0], error_type, message, trace, permanent, delay)


def timeout_error(seconds: float | None) -> JobTimeout:
    return JobTimeout(f"handler ran past its timeout ({seconds:g}s)" if seconds else "handler ran past its timeout")
