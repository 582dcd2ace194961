"""Resolving a flow's handler and hooks, the context a handler may ask for, and error classification."""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from engine.config import FlowConfig
from engine.errors import ConfigError, JobCancelled, PermanentError, ValidationError
from engine.limits import PROGRESS_MESSAGE_MAX, utf8_problem

TRACEBACK_CHARS: Final = 8000


class JobTimeout(TimeoutError):
    """The handler ran past its flow's timeout; the attempt counts as failed."""


def resolve(ref: str, what: str) -> Any:
    """Import "module:attribute"; errors name the reference and what it was for."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise ConfigError(f"{what} {ref!r}: cannot import {module_name!r}: {_not_on_path(exc.name)}") from None
        raise ConfigError(f"{what} {ref!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # any import-time failure of user code is a configuration error here
        raise ConfigError(f"{what} {ref!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    except SystemExit as exc:  # sys.exit() at import must not become the engine's exit code, unexplained
        raise ConfigError(f"{what} {ref!r}: importing {module_name!r} called sys.exit({exc.code!r})") from None
    try:
        target = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise ConfigError(f"{what} {ref!r}: module {module_name!r} has no attribute {attr!r}") from None
    return target


def _not_on_path(missing: str) -> str:
    # The module itself is missing (not one it imports): the usual cause is the app not on sys.path,
    # since the `engine` script's own directory is what Python searches first, not the current one.
    cwd = os.getcwd()
    where = "" if cwd in sys.path or "" in sys.path else f" (the current directory {cwd} is not on it)"
    return (f"no module named {missing!r} on the Python path{where}; "
            "install the app (pip install -e .), pass --app-dir DIR, or set PYTHONPATH=DIR")


def handler_problem(obj: object) -> str | None:
    """Why `obj` cannot be a handler, or None. A class (`engine.queue:Queue`) would be instantiated
    with the payload and a C built-in (`os:system`) was never written for one: both are mistakes."""
    if isinstance(obj, type):
        return "is a class, not a function"
    if inspect.ismodule(obj):
        return "is a module, not a function"
    if inspect.isbuiltin(obj):
        return "is a built-in function, not one written as a handler"
    if not callable(obj):
        return f"is not callable (an object of type {type(obj).__name__})"
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # no signature to inspect: let the call decide
        return None
    for args in ((None,), (None, None)):
        try:
            signature.bind(*args)
            return None
        except TypeError:
            continue
    return f"takes ({', '.join(signature.parameters)}), neither (payload) nor (payload, ctx)"


def wants_context(func: Callable[..., Any]) -> bool:
    """A handler takes (payload) or (payload, ctx)."""
    try:
        params = [p for p in inspect.signature(func).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) >= 2


@dataclass
class FlowRuntime:
    """A flow as one worker runs it: config plus resolved callables and breaker state."""

    config: FlowConfig
    handler: Callable[..., Any]
    with_context: bool
    permanent: tuple[type[BaseException], ...]
    permanent_names: frozenset[str]
    on_complete: Callable[[str, Mapping[str, Any]], Any] | None
    mode: str = "inline"  # the executor: inline | threads | asyncio | batch (see EXECUTION_MODES)
    per_worker: int = 1  # jobs at once in one worker (concurrency_per_worker, resolved)
    consecutive_failures: int = 0
    half_open: bool = False

    @property
    def name(self) -> str:
        return self.config.name

    def is_permanent(self, exc: BaseException) -> bool:
        if isinstance(exc, PermanentError) or (self.permanent and isinstance(exc, self.permanent)):
            return True
        return type(exc).__name__ in self.permanent_names


def load_flow(config: FlowConfig) -> FlowRuntime:
    handler = resolve(config.handler, f"flow {config.name}: handler")
    problem = handler_problem(handler)
    if problem is not None:
        raise ConfigError(f"flow {config.name}: handler {config.handler!r} {problem}; "
                          "a handler is a def or async def taking (payload) or (payload, ctx)")
    classes: list[type[BaseException]] = []
    names: set[str] = set()
    for ref in config.permanent_errors:
        if ":" in ref:
            cls = resolve(ref, f"flow {config.name}: permanent_errors entry")
            if not (isinstance(cls, type) and issubclass(cls, BaseException)):
                raise ConfigError(f"flow {config.name}: permanent_errors entry {ref!r} is not an exception class")
            classes.append(cls)
        else:
            names.add(ref)
    hook = resolve(config.on_complete, f"flow {config.name}: on_complete") if config.on_complete else None
    mode, per_worker = execution_mode(config, is_async(handler))
    return FlowRuntime(config, handler, wants_context(handler), tuple(classes), frozenset(names), hook,
                       mode, per_worker)


ASYNC_DEFAULT_CONCURRENCY: Final = 100
# How a flow's jobs run in a worker, chosen once when the flow loads (README: "Execution modes").
EXECUTION_MODES: Final = {
    "inline": "a def handler, concurrency_per_worker = 1: one job at a time in the worker's main thread",
    "threads": "a def handler, concurrency_per_worker > 1: that many handler threads",
    "asyncio": "an async def handler: up to concurrency_per_worker (default 100) tasks on one event loop",
    "batch": "batch = true: one call with the whole claimed batch, handler(payloads) -> list",
}


def is_async(func: Callable[..., Any]) -> bool:
    """An `async def` function, or a callable whose `__call__` is one (the call returns a coroutine)."""
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(type(func), "__call__", None)
    return not inspect.isfunction(func) and not inspect.ismethod(func) and inspect.iscoroutinefunction(call)


def execution_mode(config: FlowConfig, asynchronous: bool) -> tuple[str, int]:
    """(mode, jobs at once per worker); combinations that cannot keep their promises are refused."""
    where = f"flow {config.name}"
    per_worker = config.concurrency_per_worker or (ASYNC_DEFAULT_CONCURRENCY if asynchronous else 1)
    if config.batch:
        if asynchronous:
            raise ConfigError(f"{where}: batch = true needs a plain def handler; {config.handler!r} is async def")
        if per_worker > 1:
            raise ConfigError(f"{where}: batch = true runs one handler call per batch; "
                              f"concurrency_per_worker must be 1 (it is {per_worker})")
        return "batch", 1
    if asynchronous:
        if config.transactional:
            raise ConfigError(f"{where}: transactional = true is not supported for async def handlers; "
                              f"use a def handler (with concurrency_per_worker for concurrency)")
        return "asyncio", per_worker
    return ("threads" if per_worker > 1 else "inline"), per_worker


def check_progress(fraction: Any, message: Any) -> tuple[float, str | None]:
    """ctx.progress's arguments, or one ValidationError naming what is wrong."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ValidationError(f"ctx.progress(fraction): fraction must be a finite number from 0 to 1, got {fraction!r}")
    if message is not None:
        if not isinstance(message, str):
            raise ValidationError(f"ctx.progress(message): message must be a str or None, got {type(message).__name__}")
        if len(message) > PROGRESS_MESSAGE_MAX:
            raise ValidationError(f"ctx.progress(message): message is {len(message)} characters, "
                                  f"at most {PROGRESS_MESSAGE_MAX}")
        if "\x00" in message or utf8_problem(message):
            raise ValidationError("ctx.progress(message): message holds a NUL or a character that is not UTF-8")
    return float(fraction), message


def format_traceback(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= TRACEBACK_CHARS else "…" + text[-TRACEBACK_CHARS:]


class JobContext:
    """What a handler taking two arguments receives next to the payload. Built only for such handlers."""

    __slots__ = ("job_id", "flow", "attempt", "max_attempts", "run_id", "worker_id", "log", "_enqueue",
                 "sources", "_pg", "_pg_provider", "_cancelled", "_cancel_source", "_report", "_token")

    def __init__(self, job_id: int, flow: str, attempt: int, max_attempts: int, run_id: str | None,
                 worker_id: str, log: logging.LoggerAdapter[logging.Logger],
                 enqueue: Callable[..., Any], sources: Mapping[str, Any] | None = None,
                 pg: Callable[[], Any] | None = None) -> None:
        self.job_id = job_id
        self.flow = flow
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.run_id = run_id
        self.worker_id = worker_id
        self.log = log
        self._enqueue = enqueue
        # The flow's source databases by name (engine.sources.Source: opened once per worker process).
        self.sources: Mapping[str, Any] = sources if sources is not None else {}
        self._pg: Any = None  # set on first use of .pg; the worker commits or rolls it back
        self._pg_provider = pg
        # True once an operator asked to cancel this job while it runs (the worker learns of it within
        # about a second): a long handler checks it, or calls check_cancelled(), and stops early.
        self._cancelled = False
        self._cancel_source: Callable[[int], bool] | None = None  # the worker's: is a cancel requested?
        self._report: Callable[[int, int, float, str | None], None] | None = None  # the worker's progress sink
        self._token = 0  # the claim's token: progress reports are fenced by it

    @property
    def cancelled(self) -> bool:
        """True once an operator cancelled this job while it runs (read from the worker's requests)."""
        if self._cancelled:
            return True
        source = self._cancel_source
        return source is not None and source(self.job_id)

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = bool(value)

    def check_cancelled(self) -> None:
        """Raise JobCancelled if an operator cancelled this job: the job ends cancelled, never retried."""
        if self.cancelled:
            raise JobCancelled(self.job_id)

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the job is (0..1) and what it does now. Cheap to call often: the worker keeps
        the latest report per job and writes at most one per ~1 s (`engine jobs show`, the console)."""
        fraction, message = check_progress(fraction, message)
        if self._report is not None:
            self._report(self.job_id, self._token, fraction, message)

    def source(self, name: str) -> Any:
        """`ctx.sources[name]`: one of the flow's declared source databases."""
        return self.sources[name]

    @property
    def pg(self) -> Any:
        """A psycopg connection to the queue's database, for the job's writes, taken on first use.

        Its transaction is the worker's to end: committed when the handler returns, rolled back when it
        raises. In a flow with `transactional = true` it is the batch's connection, the job's writes sit
        in a savepoint, and they commit in the same transaction as the batch's ack.
        """
        if self._pg is None:
            if self._pg_provider is None:
                raise RuntimeError("this job context has no Postgres connection")
            self._pg = self._pg_provider()
        return self._pg

    def enqueue(self, flow: str, payload: Mapping[str, Any], **options: Any) -> int | None:
        """Enqueue a follow-up job (e.g. links discovered while processing this one)."""
        return self._enqueue(flow, payload, **options)
