"""Passwords out of every string that leaves the process: connection strings (libpq URI and
key=value, ODBC), free text that quotes one (log lines, errors, libpq's own parse errors), and
exceptions (`describe_error`).

Used by the CLI errors, the logs, the API's exceptions, health reasons, the console and the config
check that refuses passwords in the file. When in doubt it hides more: a message loses a detail
rather than leak a secret.
"""

from __future__ import annotations

import ctypes
import re
from typing import Final
from urllib.parse import unquote

__all__ = ["describe_error", "hide_secrets_in_process_title", "redact_dsn", "redact_text", "secret_spans"]

_SECRET_KEYS: Final = frozenset({"password", "sslpassword", "pwd"})


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


# A URL in free text. The user info may hold spaces (a malformed password), up to the '@'.
_URL_IN_TEXT: Final = re.compile(r"""[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@"'\n]*@)?[^\s"']*""")


def redact_text(text: str) -> str:
    """Free text (a log line, an error) with passwords redacted: `redact_dsn` reads its whole argument
    as one DSN, while a message can quote a URL anywhere (libpq quotes a malformed URI whole)."""
    text = _redact_libpq_echoes(text)
    return _URL_IN_TEXT.sub(lambda m: redact_dsn(m.group(0)), redact_dsn(text))


def describe_error(exc: BaseException) -> str:
    """The error's first line (its type when it has no text), redacted: for one-line messages."""
    text = str(exc).strip()
    return redact_text(text.splitlines()[0] if text else type(exc).__name__)


# --- libpq's parse errors echo pieces of the connection string ---------------------------------------
# ('missing "=" after "Secret" in connection info string', 'unexpected spaces found in "Hunter2
# Secret", ...', 'invalid connection option "Secret"', 'invalid percent-encoded token: "a%zzb"').
# In such a message every quoted piece is hidden, except libpq's own punctuation and option names.

_LIBPQ_PARSE_ERROR: Final = re.compile(
    r"connection info string|\bURI\b|percent-encoded|unexpected spaces found|connection option"
)
# libpq's templates that echo a value, greedy to the template's own text after it, since the
# value may itself hold quotes. Then any other quoted piece; then an unclosed quote (a value with
# a newline, of which only the first line is shown) hides the rest of the line.
_LIBPQ_ECHO_TEMPLATES: Final = tuple(re.compile(t, re.MULTILINE) for t in (
    r'(missing "=" after ")(.*)(" in connection info string)',
    r'(unexpected spaces found in ")(.*)(", use percent-encoded spaces)',
    r'(invalid integer value ")(.*)(" for connection option ")',
    r'(invalid connection option ")(.*)("\s*)$',
    r'(: ")(.*)("\s*)$',  # "... in URI: "%s"", "invalid percent-encoded token: "%s"", ...
))
_QUOTED: Final = re.compile(r'"([^"\n]*)"')
_LIBPQ_WORDS: Final = frozenset({
    "=", "]", ":", "/", "***", "host", "hostaddr", "port", "dbname", "user", "passfile", "channel_binding",
    "connect_timeout", "client_encoding", "options", "application_name", "fallback_application_name",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "replication", "gssencmode", "sslmode", "sslnegotiation", "sslcompression", "sslcert", "sslkey",
    "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir", "sslsni", "requirepeer", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "krbsrvname", "gsslib", "gssdelegation", "service", "target_session_attrs",
    "load_balance_hosts", "password", "sslpassword",
})


def _redact_libpq_echoes(text: str) -> str:
    if _LIBPQ_PARSE_ERROR.search(text) is None:
        return text
    for template in _LIBPQ_ECHO_TEMPLATES:
        text = template.sub(lambda m: m.group(1) + _hide_echo(m.group(2)) + m.group(3), text)
    text = _QUOTED.sub(lambda m: m.group(0) if m.group(1) in _LIBPQ_WORDS or _URL_SCHEME_RE.match(m.group(1))
                       else '"***"', text)
    return "\n".join(_close_quote(line) for line in text.split("\n"))


def _close_quote(line: str) -> str:
    if line.count('"') % 2 == 0:
        return line
    return line[: line.rfind('"') + 1] + "***"


def _hide_echo(value: str) -> str:
    """A URI keeps its shape with the password hidden (libpq quotes a malformed URI whole); any other
    echoed value is hidden whole. No quote is left for the later passes to split on."""
    if value in _LIBPQ_WORDS:
        return value
    if _URL_SCHEME_RE.match(value):
        return redact_dsn(value).replace('"', "'")
    return "***"


# --- secrets in connection strings ------------------------------------------------------------------

_URL_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_URL_QUERY_PARAM_RE: Final = re.compile(r"[?&]([^=&#]*)=([^&#]*)")
# A key of key=value text; libpq decodes %XX in URI keys only, but a key is hidden whichever way it is written.
_KEY_RE: Final = re.compile(r"(?<![\w%])((?:[A-Za-z_]|%[0-9A-Fa-f]{2})(?:[\w.]|%[0-9A-Fa-f]{2})*)[ \t]*=[ \t]*")
# Keys only ODBC / SQL Server connection strings use: their values end at ';' instead of whitespace.
_ODBC_HINT_RE: Final = re.compile(
    r"(?i)(?:^|;)\s*(?:driver|server|dsn|uid|user id|data source|initial catalog|trusted_connection)\s*="
)


def _is_secret_key(raw: str) -> bool:
    return unquote(raw).strip().lower() in _SECRET_KEYS


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
        for param in _URL_QUERY_PARAM_RE.finditer(dsn, query_from):
            if _is_secret_key(param.group(1)):
                spans.append((param.start(2), param.end(2)))
        return spans
    odbc = _ODBC_HINT_RE.search(dsn) is not None
    spans = []
    position = 0
    while (match := _KEY_RE.search(dsn, position)) is not None:
        if not _is_secret_key(match.group(1)):
            position = match.end()  # a value may still hold "password=...": keep scanning inside it
            continue
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


_NEXT_WORD_RE: Final = re.compile(r"\s+(\S+)")


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
    # An unquoted password with a space ("password=Hunter2 Secret host=h") is malformed; its tail
    # is the words up to the next key=value, and libpq echoes them in its error: hide them too.
    while (word := _NEXT_WORD_RE.match(text, index)) is not None and _KEY_RE.match(word.group(1)) is None:
        index = word.end()
    return index


# --- the process title: what `ps` shows ---------------------------------------------------------------


def hide_secrets_in_process_title() -> bool:
    """Overwrite, in place and at the same length, every password in this process's command line
    (`--dsn postgresql://u:pw@h/db` -> `u:**@h`), so `ps` and /proc/PID/cmdline show none; workers
    forked afterwards inherit the hidden copy. Linux only; returns False where it cannot."""
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            cmdline = handle.read()
        with open("/proc/self/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    except (OSError, IndexError, ValueError):
        return False
    if arg_end - arg_start != len(cmdline) or ctypes.string_at(arg_start, len(cmdline)) != cmdline:
        return False  # the area was moved or rewritten: leave it alone rather than guess
    hidden = bytearray(cmdline)
    offset = 0
    for raw in cmdline.split(b"\0")[:-1] if cmdline.endswith(b"\0") else cmdline.split(b"\0"):
        arg = raw.decode("utf-8", "surrogateescape")
        skip = arg.index("=") + 1 if arg.startswith("--") and "=" in arg else 0
        for start, end in secret_spans(arg[skip:]):
            first = offset + len(arg[: skip + start].encode("utf-8", "surrogateescape"))
            last = offset + len(arg[: skip + end].encode("utf-8", "surrogateescape"))
            hidden[first:last] = b"*" * (last - first)
        offset += len(raw) + 1
    if hidden != cmdline:
        ctypes.memmove(arg_start, bytes(hidden), len(hidden))
    return True
