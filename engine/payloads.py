"""Job payloads in and out of JSON: one validator per rule, shared by the CLI and the Python API.

Rules (README "Security" > input limits):
- a payload is a JSON object of at most MAX_PAYLOAD_BYTES bytes of UTF-8 JSON text (as stored);
- no NUL character anywhere (jsonb cannot store U+0000); the six characters `\\u0000` are fine;
- integers fit 64 bits (INT_MIN..INT_MAX). jsonb would keep bigger ones exactly (as numeric), but
  the worker decodes jsonb with orjson, which reads them back as rounded floats: refused, not rounded;
- no NaN or Infinity (JSON has none; orjson would quietly write them as null).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import orjson

from engine.errors import ValidationError

MAX_PAYLOAD_BYTES: Final = 1 << 20
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1  # orjson encodes and decodes -2^63 .. 2^64-1 exactly
# An escaped NUL in orjson's output: `\u0000` preceded by an even number of backslashes (an odd
# number means the backslash before `u` is itself escaped text, `\\u0000`, which is no NUL).
_NUL_ESCAPE: Final = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# An integer literal this long may be outside 64 bits; orjson would parse it as a rounded float.
_LONG_DIGITS: Final = re.compile(rb"\d{19}")


def loads_exact(data: bytes | str) -> Any:
    """Parse JSON text as orjson does (raising orjson.JSONDecodeError), but keep integers exact:
    a text with a long digit run is re-read with the standard parser, so that an integer beyond
    64 bits reaches encode_payload as the int it is and is refused there, never rounded."""
    value = orjson.loads(data)
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _LONG_DIGITS.search(raw) is None:
        return value
    # orjson accepted it, so it is strict JSON (no NaN literals) and no number has more than ~309
    # digits (orjson refuses those as infinite), well within int()'s digit limit.
    return json.loads(raw)


def encode_payload(payload: object, where: str) -> str:
    """The JSON text of a payload, as stored; ValidationError naming `where` if it breaks a rule."""
    if not isinstance(payload, Mapping):
        raise ValidationError(f"{where}: payload must be a JSON object, got {type(payload).__name__}")
    try:
        data = orjson.dumps(payload)
    except TypeError as exc:
        big = _find(payload, lambda v: isinstance(v, int) and not isinstance(v, bool) and not INT_MIN <= v <= INT_MAX)
        if big is not None:
            raise ValidationError(f"{where}: payload{big[0]} is an integer beyond 64 bits ({INT_MIN} to {INT_MAX}); "
                                  "send it as a string") from None
        raise ValidationError(f"{where}: payload is not JSON-serialisable: {exc}") from None
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValidationError(f"{where}: payload is {len(data)} bytes of JSON, more than the {MAX_PAYLOAD_BYTES} allowed")
    if b"\\u0000" in data and _NUL_ESCAPE.search(data):
        raise ValidationError(f"{where}: payload contains a NUL character, which PostgreSQL jsonb cannot store")
    # orjson writes NaN and Infinity as null: look only when a null is there.
    if b"null" in data and _nonfinite_inside(payload):
        bad = _find(payload, lambda v: isinstance(v, float) and not math.isfinite(v))
        if bad is not None:
            raise ValidationError(f"{where}: payload{bad[0]} is {bad[1]!r}; JSON has no NaN or Infinity")
    return data.decode()


def _nonfinite_inside(payload: Mapping[str, Any]) -> bool:
    """Whether a NaN or an infinity is anywhere in the payload: the fast check (one loop, no calls
    per item, no paths), run only for payloads whose JSON holds a null."""
    stack: list[Any] = [payload]
    while stack:
        item = stack.pop()
        for value in (item.values() if isinstance(item, Mapping) else item):
            kind = type(value)
            if kind is str or kind is int or value is None or kind is bool:
                continue
            if kind is dict or kind is list or kind is tuple or isinstance(value, Mapping):
                stack.append(value)
            elif isinstance(value, float) and not math.isfinite(value):
                return True
    return False


def _find(value: object, bad: Any) -> tuple[str, object] | None:
    """(path such as `["a"][0]`, item) of the first item for which `bad` is true, or None: the slow
    walk, for the error message only."""
    if bad(value):
        return "", value
    items: Any = value.items() if isinstance(value, Mapping) else enumerate(value) \
        if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _find(item, bad)
        if found is not None:
            return f"[{_label(key)}]{found[0]}", found[1]
    return None


def _label(key: object) -> str:
    return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)
