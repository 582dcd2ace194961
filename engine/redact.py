"""Passwords out of every string that leaves the process: connection strings (libpq URI and
key=value, ODBC), free text that quotes one (log lines, errors), and exceptions (`describe_error`).

Used by the CLI errors, the logs, the API's exceptions, health reasons, the console and the config
check that refuses passwords in the file.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["describe_error", "redact_dsn", "redact_text", "secret_spans"]


def redact_dsn(dsn: str) -> str:
    """The DSN with every password replaced by ***, for logs and error messages."""
    parts: list[str] = []
    last = 0
    for start, end in secret_spans(dsn):
        if end > start:
            parts.append(dsn[last:start])
            parts.append("***")
            last = end
    parts.append(dsn[last:])
    return "".join(parts)


_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']+")


def redact_text(text: str) -> str:
    """Free text (a log line, an error) with passwords redacted: `redact_dsn` reads its whole argument
    as one DSN, while a message can quote a URL anywhere (libpq quotes a malformed URI whole)."""
    return _URL_IN_TEXT.sub(lambda m: redact_dsn(m.group(0)), redact_dsn(text))


_URL_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_QUERY_SECRET_RE: Final = re.compile(r"(?i)[?&](?:password|sslpassword|pwd)=([^&#]*)")
_SECRET_KEY_RE: Final = re.compile(r"(?i)\b(?:password|sslpassword|pwd)\s*=\s*")
# Keys only ODBC / SQL Server connection strings use: their values end at ';' instead of whitespace.
_ODBC_HINT_RE: Final = re.compile(
    r"(?i)(?:^|;)\s*(?:driver|server|dsn|uid|user id|data source|initial catalog|trusted_connection)\s*="
)


def secret_spans(dsn: str) -> list[tuple[int, int]]:
    """(start, end) of each password value in a URL, libpq key=value or ODBC connection string."""
    scheme = _URL_SCHEME_RE.match(dsn)
    if scheme is not None:
        spans: list[tuple[int, int]] = []
        start = scheme.end()
        slash = dsn.find("/", start)
        authority_end = len(dsn) if slash < 0 else slash
        # The last '@' before the path ends the user info, as in libpq; an unencoded '@' or '?' in
        # the password is then still hidden rather than leaked.
        at = dsn.rfind("@", start, authority_end)
        query_from = start
        if at >= 0:
            colon = dsn.find(":", start, at)
            if colon >= 0:
                spans.append((colon + 1, at))
            query_from = at
        for param in _URL_QUERY_SECRET_RE.finditer(dsn, query_from):
            spans.append((param.start(1), param.end(1)))
        return spans
    odbc = _ODBC_HINT_RE.search(dsn) is not None
    spans = []
    position = 0
    while (match := _SECRET_KEY_RE.search(dsn, position)) is not None:
        end = _odbc_value_end(dsn, match.end()) if odbc else _libpq_value_end(dsn, match.end())
        spans.append((match.end(), end))
        position = max(end, match.end())
    return spans


def _odbc_value_end(text: str, start: int) -> int:
    if text.startswith("{", start):
        index = start + 1
        while index < len(text):
            if text[index] == "}":
                if text.startswith("}}", index):  # '}}' is an escaped brace inside {...}
                    index += 2
                    continue
                return index + 1
            index += 1
        return len(text)
    end = text.find(";", start)
    return len(text) if end < 0 else end


def _libpq_value_end(text: str, start: int) -> int:
    if text.startswith("'", start):
        index = start + 1
        while index < len(text):
            if text[index] == "\\":
                index += 2
                continue
            if text[index] == "'":
                return index + 1
            index += 1
        return len(text)
    index = start
    while index < len(text) and not text[index].isspace():
        index += 1
    return index


def describe_error(exc: BaseException) -> str:
    """The error's first line (its type when it has no text), redacted: for one-line messages."""
    text = str(exc).strip()
    return redact_text(text.splitlines()[0] if text else type(exc).__name__)
