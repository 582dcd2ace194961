"""Payload rules (issue 11 item 6), one validator each, through the CLI (subprocesses) and the API alike;
handlers that are not functions refused at load; the console's --keymap read like a config file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import REPO, base_env, engine, ok, one_line_error
from support.postgres import register_flows_for, scalar
from engine.errors import ValidationError
from engine.payloads import INT_MAX, INT_MIN, MAX_PAYLOAD_BYTES, encode_payload
from engine.queue import Queue


@pytest.fixture(autouse=True)
def registered_flows(request: pytest.FixtureRequest) -> None:
    register_flows_for(request, "emails")


def stored(dsn: str) -> list:
    return [row for row in (scalar(dsn, "SELECT coalesce(jsonb_agg(payload ORDER BY id), '[]') FROM skiplock.jobs"))]


def test_a_backslash_u_text_is_not_a_nul(queue: Queue, dsn: str) -> None:
    text = "\\u0000 and \\\\u0000"  # backslash-u text: no NUL character in it
    queue.enqueue("emails", {"note": text, "\\u0000": 1})
    out = ok(engine("enqueue", "emails", "--payload", '{"note": "\\\\u0000"}', dsn=dsn))
    assert out.startswith("enqueued 1")
    assert stored(dsn) == [{"note": text, "\\u0000": 1}, {"note": "\\u0000"}]
    # a real NUL (the JSON escape \u0000, or one after an escaped backslash) is still refused
    for payload in ({"a": "\x00"}, {"a": "\\\x00"}, {"\x00": 1}):
        with pytest.raises(ValidationError, match="payload contains a NUL character"):
            queue.enqueue("emails", payload)
    assert one_line_error(engine("enqueue", "emails", "--payload", '{"a": "\\\\\\u0000"}', dsn=dsn)) == \
        "engine: error: --payload (copy 1): payload contains a NUL character, which PostgreSQL jsonb cannot store\n"
    assert len(stored(dsn)) == 2


def test_the_size_limit_counts_bytes_of_utf8(queue: Queue, dsn: str) -> None:
    wide = {"t": "é" * 600_000}  # 600,000 characters, 1,200,008 bytes of JSON
    with pytest.raises(ValidationError) as caught:
        queue.enqueue("emails", wide)
    assert str(caught.value) == f"payload: payload is 1200008 bytes of JSON, more than the {MAX_PAYLOAD_BYTES} allowed"
    line = '{"t": "' + "é" * 600_000 + '"}\n'
    assert one_line_error(engine("enqueue", "emails", input=line, dsn=dsn)) == \
        f"engine: error: line 1: payload is 1200008 bytes of JSON, more than the {MAX_PAYLOAD_BYTES} allowed\n"
    exactly = {"t": "a" * (MAX_PAYLOAD_BYTES - len('{"t":""}'))}
    assert queue.enqueue("emails", exactly) is not None  # the limit itself is allowed
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 1


def test_integers_beyond_64_bits_are_refused_not_rounded(queue: Queue, dsn: str) -> None:
    queue.enqueue("emails", {"lo": INT_MIN, "hi": INT_MAX})
    ok(engine("enqueue", "emails", input=f'{{"lo": {INT_MIN}, "hi": {INT_MAX}, "digits": "123456789012345678901"}}\n',
              dsn=dsn))
    assert stored(dsn) == [{"lo": INT_MIN, "hi": INT_MAX},
                           {"lo": INT_MIN, "hi": INT_MAX, "digits": "123456789012345678901"}]
    message = f"is an integer beyond 64 bits ({INT_MIN} to {INT_MAX}); send it as a string"
    for value in (INT_MAX + 1, INT_MIN - 1):
        with pytest.raises(ValidationError) as caught:
            queue.enqueue("emails", {"n": [1, {"id": value}]})
        assert str(caught.value) == f'payload: payload["n"][1]["id"] {message}'
        assert one_line_error(engine("enqueue", "emails", input=f'{{}}\n{{"n": [1, {{"id": {value}}}]}}\n',
                                     dsn=dsn)) == f'engine: error: line 2: payload["n"][1]["id"] {message}\n'
        assert one_line_error(engine("enqueue", "emails", "--payload", f'{{"id": {value}}}', dsn=dsn)) == \
            f'engine: error: --payload (copy 1): payload["id"] {message}\n'
    assert len(stored(dsn)) == 2


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_infinity_are_refused_by_the_api_as_by_the_cli(queue: Queue, dsn: str, value: float) -> None:
    with pytest.raises(ValidationError) as caught:
        queue.enqueue("emails", {"ok": None, "x": [value]})
    assert str(caught.value) == f'payload: payload["x"][0] is {value!r}; JSON has no NaN or Infinity'
    with pytest.raises(ValidationError, match="item 1: payload"):
        queue.enqueue_many("emails", [{}, {"x": value}])
    literal = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}[repr(value)]
    one_line_error(engine("enqueue", "emails", "--payload", f'{{"x": {literal}}}', dsn=dsn))
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0


def test_schedules_follow_the_same_payload_rules(queue: Queue, dsn: str) -> None:
    with pytest.raises(ValidationError, match=r'payload\["n"\] is an integer beyond 64 bits'):
        queue.add_schedule("big", "emails", every=60.0, payload={"n": 2**70})
    result = engine("schedule", "add", "big", "--flow", "emails", "--every", "60s", "--payload", f'{{"n": {2**70}}}',
                    dsn=dsn)
    assert 'payload["n"] is an integer beyond 64 bits' in one_line_error(result)
    assert scalar(dsn, "SELECT count(*) FROM skiplock.schedules") == 0


def test_encode_payload_is_the_one_validator() -> None:
    assert encode_payload({"a": None, "b": 1.5}, "x") == '{"a":null,"b":1.5}'
    with pytest.raises(ValidationError, match="^x: payload must be a JSON object, got list$"):
        encode_payload([], "x")


# ---------------------------------------------------------------------------------------------
# Handlers that are not functions


@pytest.mark.parametrize(("ref", "problem"), [
    ("engine.queue:Queue", "is a class, not a function"),
    ("os:system", "is a built-in function, not one written as a handler"),
    ("os:path", "is a module, not a function"),
    ("engine.payloads:MAX_PAYLOAD_BYTES", "is not callable (an object of type int)"),
    ("engine.dev:stop_requested_by_signals", "takes (), neither (payload) nor (payload, ctx)"),
])
def test_a_handler_that_is_not_a_function_is_refused_at_load(dsn: str, tmp_path: Path, ref: str,
                                                              problem: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[flows.odd]\nhandler = "{ref}"\n')
    result = engine("run", "--config", str(config), "--flows", "odd", "--drain", dsn=dsn)
    assert one_line_error(result) == (f"engine: error: flow odd: handler {ref!r} {problem}; "
                                      "a handler is a def or async def taking (payload) or (payload, ctx)\n")


# ---------------------------------------------------------------------------------------------
# console --keymap: a regular file of bounded size, like config files


def test_keymap_file_is_read_like_a_config_file(tmp_path: Path) -> None:
    fifo = tmp_path / "keymap.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    cases = {
        fifo: f"{fifo}: not a regular file, cannot be a keymap file",
        big: f"{big}: keymap file is larger than 1024 KiB",
    }
    for path, message in cases.items():
        result = subprocess.run([sys.executable, "-m", "console.cli", "--dsn", "host=/nowhere", "--keymap", str(path)],
                                capture_output=True, text=True, timeout=30, env=base_env(), cwd=REPO)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
