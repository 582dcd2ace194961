"""engine.redact: one redaction for every string that leaves the process, tested with every password
form (URI, key=value, percent-encoded keys, quoted values with spaces, ODBC, libpq's own error texts),
and the API paths that report connection errors. No database needed: nothing here can connect."""

from __future__ import annotations

import psycopg
import pytest

from engine.errors import ConfigError, DatabaseUnavailable
from engine.queue import Queue
from engine.redact import describe_error, redact_dsn, redact_text

SECRET_WORDS = ("Hunter2", "Secret", "s3cr3t")


def assert_hidden(text: str) -> None:
    assert not any(word in text for word in SECRET_WORDS), text


@pytest.mark.parametrize(("dsn", "redacted"), [
    ("postgresql://u:s3cr3t@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:Hunter2 Secret@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u@h/db?pass%77ord=s3cr3t&sslmode=require", "postgresql://u@h/db?pass%77ord=***&sslmode=require"),
    ("postgresql://u@h/db?PASSWORD=s3cr3t", "postgresql://u@h/db?PASSWORD=***"),
    ("postgresql://u@h/db?%70assword=s3cr3t", "postgresql://u@h/db?%70assword=***"),
    ("postgresql://u@h/db?sslpassword=s3cr3t", "postgresql://u@h/db?sslpassword=***"),
    ("host=h password='Hunter2 Secret' dbname=d", "host=h password=*** dbname=d"),
    ("host=h password=Hunter2 Secret dbname=d", "host=h password=*** dbname=d"),
    ("host=h password=Hunter2 Secret", "host=h password=***"),
    ("host=h pass%77ord=s3cr3t port=1", "host=h pass%77ord=*** port=1"),
    ("Driver={x};Server=h;UID=u;PWD={Hunter2 Secret};Database=d", "Driver={x};Server=h;UID=u;PWD=***;Database=d"),
])
def test_redact_dsn_every_form(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


# libpq's own parse errors, as psycopg raises them for these connection strings.
LIBPQ_ECHOES = [
    "host=127.0.0.1 port=1 password=Hunter2 Secret dbname=x",  # missing "=" after "Secret"
    "host=127.0.0.1 port=1 password=Hunter2 Secret=1",  # invalid connection option "Secret"
    "postgresql://u:Hunter2 Secret@127.0.0.1:1/x",  # unexpected spaces found in "Hunter2 Secret"
    "postgresql://u@127.0.0.1:1/x?password=Hunter2 Secret",
    "postgresql://u:s3cr3t@[::1/x",  # the whole URI, quoted
    "postgresql://u@127.0.0.1:1/x?password=s3cr3t%zz",  # invalid percent-encoded token
]


@pytest.mark.parametrize("dsn", LIBPQ_ECHOES)
def test_libpq_error_texts(dsn: str) -> None:
    with pytest.raises(psycopg.ProgrammingError) as caught:
        psycopg.connect(dsn, connect_timeout=1)
    raw = str(caught.value)
    assert any(word in raw for word in SECRET_WORDS), f"libpq no longer echoes this one: {raw}"
    assert_hidden(describe_error(caught.value))
    assert_hidden(redact_text(f"engine: error: database: {raw}"))


def test_redact_text_keeps_what_is_not_secret() -> None:
    assert redact_text('invalid URI: "postgresql://u:s3cr3t@host/db"') == 'invalid URI: "postgresql://u:***@host/db"'
    assert redact_text('invalid integer value "abc" for connection option "port"') == (
        'invalid integer value "***" for connection option "port"')
    assert redact_text("connection to server at 127.0.0.1, port 1 failed") == (
        "connection to server at 127.0.0.1, port 1 failed")
    assert redact_text("see postgresql://u:Hunter2 Secret@h/db now") == "see postgresql://u:***@h/db now"
    assert describe_error(ValueError()) == "ValueError"


@pytest.mark.parametrize("dsn", LIBPQ_ECHOES)
def test_api_wraps_malformed_dsn(dsn: str) -> None:
    with Queue(dsn) as queue:
        with pytest.raises(DatabaseUnavailable) as caught:
            queue.get_queue_status()
        assert_hidden(str(caught.value))
        report = queue.health_check()
    assert report["status"] == "unhealthy"
    assert report["reasons"] and all(not any(w in r for w in SECRET_WORDS) for r in report["reasons"])


def test_config_refuses_percent_encoded_password_key(tmp_path) -> None:
    from engine.config import load_settings

    path = tmp_path / "c.toml"
    path.write_text('[global]\ndsn = "postgresql://u@h/db?pass%77ord=s3cr3t"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert str(caught.value) == f"{path}: global.dsn must not contain a password; put it in SKIPLOCK_DSN or PGPASSWORD"


@pytest.mark.parametrize("dsn", [
    'postgresql://u:%"Hunter2@127.0.0.1:1/x',  # a quote inside the echoed token (found by tests/test_fuzz.py)
    'host=127.0.0.1 password=a"Hunter2 "Secret',
    "host=127.0.0.1 password=Hunter2\nSecret",  # only the first line is shown: its quote never closes
])
def test_libpq_echoes_with_quotes_and_newlines(dsn: str) -> None:
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        assert_hidden(describe_error(exc))
        assert_hidden(redact_text(str(exc)))


def test_process_title_hides_passwords_in_place() -> None:
    import subprocess
    import sys

    code = ("import sys; from engine.redact import hide_secrets_in_process_title as hide; "
            "assert hide(); sys.stdout.buffer.write(open('/proc/self/cmdline', 'rb').read())")
    args = ["--dsn", "postgresql://u:Hunter2@h/x", "--dsn=host=h password='Hunter2 Secret' port=1",
            "postgresql://u@h/x?pass%77ord=s3cr3t", "plain"]
    shown = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, check=True).stdout
    assert shown.split(b"\0")[3:-1] == [b"--dsn", b"postgresql://u:*******@h/x",
                                        b"--dsn=host=h password=**************** port=1",
                                        b"postgresql://u@h/x?pass%77ord=******", b"plain"]
