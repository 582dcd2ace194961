"""Handlers for the metrics and failure-log tests: outcomes chosen by the payload."""

from __future__ import annotations

from typing import Any

from engine.errors import PermanentError


def mixed(payload: dict[str, Any]) -> None:
    kind = payload.get("kind", "ok")
    if kind == "transient":
        # a secret in the message: the log line must carry it redacted
        raise ValueError(f"upstream refused postgresql://app:hunter2@db/x job {payload.get('n')}\nsecond line")
    if kind == "permanent":
        raise PermanentError("bad payload")
