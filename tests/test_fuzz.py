"""Property-based checks of the input contract (Hypothesis) over the redaction, the config loader,
the enqueue API and the `engine` command: hostile input gets the project's own error type or exit 2
with one line, nothing changes in the database, and no password reaches any output.

CI runs a bounded number of examples; `SKIPLOCK_FUZZ=long python -m pytest tests/test_fuzz.py` runs
many more by hand."""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import load_settings
from engine.errors import ConfigError, ValidationError
from engine.queue import DeadLetterFilter, Queue
from engine.redact import describe_error, redact_dsn, redact_text
from support.postgres import scalar

REPO = Path(__file__).resolve().parent.parent
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=3000, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile(os.environ.get("SKIPLOCK_FUZZ", "ci"))
CLI_EXAMPLES = 12 if os.environ.get("SKIPLOCK_FUZZ", "ci") == "ci" else 400  # one subprocess each

# Passwords: a distinctive core (so "not in the output" means something) with hostile characters around.
password = st.builds(lambda pre, post: f"{pre}Pw9Zq{post}",
                     st.text(string.printable.strip() + " ", max_size=6),
                     st.text(string.printable.strip() + " ", max_size=6))


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@given(password, st.sampled_from(["password", "PASSWORD", "pass%77ord", "sslpassword"]))
def test_redact_dsn_hides_every_form(secret: str, key: str) -> None:
    forms = [
        f"postgresql://user:{quote(secret, safe='')}@db.example:5432/app?sslmode=require",
        f"postgresql://user@db.example/app?{key}={quote(secret, safe='')}&application_name=x",
        f"host=db.example {key.replace('%77', 'w')}={_libpq_quote(secret)} dbname=app",
        "Driver={ODBC Driver 18};Server=db;UID=u;PWD={" + secret.replace("}", "}}") + "};Database=d",
    ]
    for dsn in forms:
        assert "Pw9Zq" not in redact_dsn(dsn), dsn
        assert "Pw9Zq" not in redact_text(f"could not connect with {dsn}: refused"), dsn


@given(password, st.sampled_from(["host=h port=1 password={} dbname=x", "postgresql://u:{}@h:1/x",
                                  "postgresql://u@h:1/x?password={}", "host=h password={}"]))
def test_libpq_parse_errors_are_redacted(secret: str, template: str) -> None:
    dsn = template.format(secret)
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        shown = describe_error(exc)
        assert "Pw9Zq" not in shown, (dsn, str(exc), shown)


toml_scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False), st.booleans(),
    st.text(max_size=12), st.sampled_from(["5s", "999999999d", "1e400", "-1s", "module:function", ""]),
)
toml_value = st.recursive(toml_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(string.ascii_lowercase + "_", min_size=1, max_size=8), inner,
                                            max_size=3), max_leaves=8)
keys = st.sampled_from(["workers", "pool_min", "pool_max", "heartbeat_interval", "stale_after", "retention",
                        "timeout", "concurrency", "max_attempts", "batch_size", "backoff", "circuit", "log_format",
                        "handler", "dsn", "on_complete", "permanent_errors", "bogus"])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value) if not isinstance(value, float) else repr(value).replace("inf", "inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"  # type: ignore[union-attr]


@given(st.dictionaries(st.sampled_from(["global", "flows.f", "console", "environments.e.global"]),
                       st.dictionaries(keys, toml_value, max_size=4), max_size=3))
def test_config_loader_raises_only_config_errors(tmp_path_factory: pytest.TempPathFactory,
                                                  tables: dict[str, dict[str, object]]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "config.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items())
                            for name, body in tables.items()))
    try:
        load_settings(path, environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)


hostile_text = st.one_of(st.text(max_size=20), st.sampled_from(["noop\n", "x\udcff", "\ud800", "a" * 300, "", " "]))


@given(flow=hostile_text, run_id=st.none() | hostile_text, key=st.none() | hostile_text,
       delay=st.one_of(st.floats(), st.integers(min_value=-(2**64), max_value=2**64)),
       attempts=st.none() | st.integers(min_value=-(2**64), max_value=2**64),
       priority=st.integers(min_value=-(2**40), max_value=2**40))
def test_enqueue_api_contract(queue: Queue, dsn: str, flow: str, run_id: str | None, key: str | None,
                              delay: float, attempts: int | None, priority: int) -> None:
    before = scalar(dsn, "SELECT count(*) FROM skiplock.jobs")
    try:
        queue.enqueue_many(flow, [{"a": 1}], run_id=run_id, dedupe_keys=[key], delay=delay,
                           max_attempts=attempts, priority=priority)
    except ValidationError as exc:
        assert "\n" not in str(exc)
        assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == before


@given(ids=st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=3),
       error=st.none() | hostile_text, limit=st.integers(min_value=-(2**40), max_value=2**40))
def test_dead_letter_api_contract(queue: Queue, ids: list[int], error: str | None, limit: int) -> None:
    try:
        queue.dead_letters(DeadLetterFilter(ids=ids or None, error_type=error), limit=limit)
    except ValidationError as exc:
        assert "\n" not in str(exc)


cli_word = st.one_of(st.text(max_size=10), st.sampled_from(
    ["--count", "1000000000000", "--delay", "99999999999d", "--max-attempts", "2147483648", "--limit", "-1",
     "--all", "99999999999999999999", "noop\n", "--payload", "{}", "[1]", "--run", "--dedupe-key", "--error"]))
cli_command = st.sampled_from([["enqueue", "f"], ["status"], ["dlq", "list"], ["dlq", "retry"], ["dlq", "show"],
                               ["pause"], ["health"]])


@settings(max_examples=CLI_EXAMPLES)
@given(command=cli_command, words=st.lists(cli_word, max_size=5))
def test_cli_contract(dsn: str, command: list[str], words: list[str]) -> None:
    secret_dsn = dsn + " password=Pw9ZqSecret"  # the test server trusts local users: the password is unused
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", SKIPLOCK_DSN=secret_dsn)
    before = scalar(dsn, "SELECT count(*) FROM skiplock.jobs")
    args = [w.encode("utf-8", "surrogateescape") for w in command + words]
    result = subprocess.run([sys.executable.encode(), b"-m", b"engine.cli", *args], capture_output=True, env=env,
                            input=b"", timeout=120, cwd=REPO)
    out, err = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    assert "Traceback" not in err and "Pw9Zq" not in out + err, err
    assert result.returncode in (0, 1, 2), (result.returncode, err)
    if result.returncode == 2 and not err.startswith("usage:"):
        assert err.count("\n") == 1 and err.startswith("engine: error: "), err
    if result.returncode != 0 and command[0] == "enqueue":
        assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == before
