"""The `/` filter: qualifiers plus free text, the same on every screen.

    flow:flaky error:FlakyError status:dead age:>1h timeout

- `flow:NAME`, `error:TYPE` (exact, case-sensitive like the data), `status:S` (retrying, dead, paused,
  active, circuit open... depending on the screen; on the jobs screen a comma list of job states),
  `run:ID`, `payload.KEY:VALUE` (a payload key equals VALUE, JSON if it parses, else a string), `age:>7d` / `age:<10m` (how long ago a job died or
  failed; `older:7d` and `newer:10m` say the same). Durations as in the config: 250ms, 5s, 2m, 1h, 1d.
- Anything else is free text, matched case-insensitively against the visible text of a row.
- Values with spaces go in double quotes: `error:"Connection reset"`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Final

from engine.config import parse_duration
from engine.errors import ConfigError

QUALIFIERS: Final = ("flow", "error", "status", "run", "age", "older", "newer")
PAYLOAD_PREFIX: Final = "payload."


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    flow: str | None = None
    error: str | None = None
    status: str | None = None
    run: str | None = None
    payload: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (key, value text)
    older_than: float | None = None  # seconds
    newer_than: float | None = None  # seconds
    words: tuple[str, ...] = field(default_factory=tuple)
    text: str = ""

    @property
    def empty(self) -> bool:
        return not (self.flow or self.error or self.status or self.run or self.payload
                    or self.older_than is not None or self.newer_than is not None or self.words)

    def matches_text(self, *fields: object) -> bool:
        if not self.words:
            return True
        haystack = " ".join("" if f is None else str(f) for f in fields).lower()
        return all(word.lower() in haystack for word in self.words)

    def matches_age(self, age: float | None) -> bool:
        if self.older_than is not None and (age is None or age <= self.older_than):
            return False
        if self.newer_than is not None and (age is None or age >= self.newer_than):
            return False
        return True

    def describe(self) -> str:
        return self.text.strip()


def _duration(value: str, qualifier: str) -> float:
    try:
        return parse_duration(value, qualifier)
    except ConfigError:
        raise FilterError(f"{qualifier}: bad duration {value!r} (use 30s, 10m, 2h, 7d)") from None


def parse_filter(text: str) -> Filter:
    """Parse the filter line; raises FilterError with a message for the user."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise FilterError(f"unbalanced quotes: {exc}") from None
    values: dict[str, object] = {}
    words: list[str] = []
    payload: list[tuple[str, str]] = []
    for token in tokens:
        key, colon, value = token.partition(":")
        if colon and key.lower().startswith(PAYLOAD_PREFIX) and len(key) > len(PAYLOAD_PREFIX):
            if not value:
                raise FilterError(f"{key}: needs a value")
            payload.append((key[len(PAYLOAD_PREFIX):], value))  # the key keeps its case, like the data
            continue
        key = key.lower()
        if not colon or key not in QUALIFIERS:
            words.append(token)  # "FlakyError: transient" pasted from a message is text, not a qualifier
            continue
        if not value:
            raise FilterError(f"{key}: needs a value")
        if key in ("flow", "error", "status", "run"):
            values[key] = value if key != "status" else value.lower()
        elif key == "age":
            if value.startswith(">"):
                values["older_than"] = _duration(value[1:], "age:>")
            elif value.startswith("<"):
                values["newer_than"] = _duration(value[1:], "age:<")
            else:
                raise FilterError("age: takes >DURATION or <DURATION, e.g. age:>7d")
        elif key == "older":
            values["older_than"] = _duration(value, "older:")
        elif key == "newer":
            values["newer_than"] = _duration(value, "newer:")
    return Filter(words=tuple(words), payload=tuple(payload), text=text, **values)  # type: ignore[arg-type]
