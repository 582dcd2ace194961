"""Logging: JSON lines on stdout (orjson) when not on a terminal, readable lines on one.

Correlation ids (engine, worker, flow, job, run) travel as `extra=` fields; the JSON formatter puts
every extra field at the top level of the line. DSN passwords are redacted from every message.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Final

import orjson

from engine.redact import redact_text

_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = redact_text(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        text = f"{stamp} {record.levelname:<7} {redact_text(record.getMessage())}"
        if extras:
            text += f"  [{extras}]"
        if record.exc_info:
            text += "\n" + redact_text(self.formatException(record.exc_info))
        return text


def setup_logging(log_format: str = "auto", level: int = logging.INFO) -> None:
    """`auto` means JSON unless stdout is a terminal."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("psycopg", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ContextLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Carries correlation ids; per-call `extra=` fields are merged in, not dropped."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs
