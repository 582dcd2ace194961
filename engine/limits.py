"""What PostgreSQL and the OS accept, in one place: the ranges every validator (config, CLI, API)
checks at load or call time, so a value that would break later is refused with a message naming it."""

from __future__ import annotations

import re
from typing import Final

INT2_MIN: Final = -(2**15)
INT2_MAX: Final = 2**15 - 1
INT4_MAX: Final = 2**31 - 1  # integer columns: max_attempts, concurrency, batch sizes
INT8_MAX: Final = 2**63 - 1  # bigint job ids
# Durations (timeouts, backoff, retention, delays): now() +/- this stays inside PostgreSQL's timestamp
# and Python's datetime, and fits every wait the OS takes (threading.TIMEOUT_MAX is ~292 years).
MAX_DURATION_S: Final = 100 * 365 * 86400.0
MAX_DURATION_TEXT: Final = "36500d"
# Flow, schedule, pipeline and config table names: what a NAME column holds (NAMEDATALEN - 1 bytes).
# Use fullmatch: "$" would let a final "\n" in.
NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_WORKERS: Final = 1024  # processes per engine
MAX_POOL_SIZE: Final = 1000  # connections per worker (PostgreSQL's max_connections is far lower)
PROGRESS_MESSAGE_MAX: Final = 200  # characters of a ctx.progress message (shown in one console cell)
MAX_PORT: Final = 65535
# Metrics (engine/metrics.py): error types kept per flow before the rest count as "other", and the
# longest error type name exported as a label.
MAX_ERROR_TYPES_PER_FLOW: Final = 20
MAX_ERROR_TYPE_CHARS: Final = 80
# Failure log lines (engine/failure_log.py): a burst of this many per flow per worker, then this many
# per second; what is left out is counted in a later line.
FAILURE_LOG_BURST: Final = 10
FAILURE_LOG_PER_SECOND: Final = 1.0
# Flow rate limits (rate_limit = "N/s|m|h"): at most this many job starts per second, and a burst
# of at most this many tokens; far above what one database can claim, and exact in a float8.
MAX_RATE_PER_S: Final = 1_000_000.0
MAX_RATE_BURST: Final = 10_000_000


def utf8_problem(text: str) -> str | None:
    """None for text that encodes as UTF-8; else what is wrong, e.g. "byte 0xff at position 3".
    Non-UTF-8 bytes in argv and the environment arrive as lone surrogates (surrogateescape)."""
    if text.isascii():
        return None
    for index, char in enumerate(text):
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            if 0xDC80 <= code <= 0xDCFF:
                return f"byte 0x{code - 0xDC00:02x} at position {index}"
            return f"lone surrogate U+{code:04X} at position {index}"
    return None


def validate_flow(flow: object) -> str:
    """`flow` if it is a valid flow name; else ValidationError naming it. Here, not in engine.queue, so
    `engine run --flows` checks names without loading the enqueue API."""
    if not isinstance(flow, str) or not NAME.fullmatch(flow):
        from engine.errors import ValidationError  # here: engine.errors imports this module

        raise ValidationError(
            f"flow name {flow!r} is invalid: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return flow
