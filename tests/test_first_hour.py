"""What a new user trips on in the first hour (issue 13), each through real `engine` subprocesses."""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine import __version__
from support.cli import engine, ok, one_line_error
from support.postgres import scalar

APP_CONFIG = """
[flows.hello]
handler = "myapp.jobs:hello"
"""


def write_app(root: Path) -> Path:
    (root / "myapp").mkdir()
    (root / "myapp" / "__init__.py").write_text("")
    (root / "myapp" / "jobs.py").write_text("def hello(payload):\n    return {'hi': payload['name']}\n")
    config = root / "config.toml"
    config.write_text(APP_CONFIG)
    return config


# 1. where handlers come from


def test_handler_not_on_path_says_what_to_do_and_app_dir_fixes_it(dsn: str, tmp_path: Path) -> None:
    config = write_app(tmp_path)
    ok(engine("enqueue", "hello", "--payload", '{"name": "ada"}', dsn=dsn))
    line = one_line_error(engine("run", "--config", str(config), "--drain", dsn=dsn, cwd=tmp_path))
    assert line == (f"engine: error: flow hello: handler 'myapp.jobs:hello': cannot import 'myapp.jobs': "
                    f"no module named 'myapp' on the Python path (the current directory {tmp_path} is not on "
                    "it); install the app (pip install -e .), pass --app-dir DIR, or set PYTHONPATH=DIR\n")
    result = engine("run", "--config", str(config), "--drain", "--app-dir", ".", dsn=dsn, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert scalar(dsn, "SELECT result->>'hi' FROM skiplock.jobs_done WHERE flow = 'hello'") == "ada"


def test_app_dir_must_be_a_directory(dsn: str, tmp_path: Path) -> None:
    config = write_app(tmp_path)
    line = one_line_error(engine("run", "--config", str(config), "--app-dir", "nope", dsn=dsn, cwd=tmp_path))
    assert line == "engine: error: --app-dir nope: not a directory\n"


# 2. the built-in demo flows are served only where asked for


def started_flows(stdout: str) -> list[str]:
    starting = [json.loads(line) for line in stdout.splitlines() if '"engine starting"' in line]
    assert len(starting) == 1, stdout
    return starting[0]["flows"]


def test_production_engine_serves_only_its_own_flows(dsn: str, tmp_path: Path) -> None:
    config = write_app(tmp_path)
    result = engine("run", "--config", str(config), "--drain", "--app-dir", str(tmp_path), dsn=dsn, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert started_flows(result.stdout) == ["hello"]
    line = one_line_error(engine("run", "--config", str(config), "--flows", "noop", dsn=dsn))
    assert line == ("engine: error: --flows: flow 'noop' is not configured (known: hello); the built-in demo "
                    "flows (noop, sleep, flaky) are served by `engine dev`, or where the config names them "
                    "([flows.noop])\n")
    # named in the file (no handler needed), a built-in is served
    config.write_text(APP_CONFIG + "[flows.noop]\n")
    result = engine("run", "--config", str(config), "--drain", "--app-dir", str(tmp_path), dsn=dsn, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert started_flows(result.stdout) == ["hello", "noop"]


def test_engine_run_without_flows_says_where_to_declare_them(dsn: str) -> None:
    line = one_line_error(engine("run", "--drain", dsn=dsn))
    assert line == ("engine: error: no flows configured (no config file: pass --config or set SKIPLOCK_CONFIG); "
                    'add [flows.NAME] with handler = "module:function"\n')


# 3. --drain: nothing due and nothing running; --wait-scheduled waits for later jobs too


def log_records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_drain_leaves_jobs_scheduled_for_later_and_says_so(dsn: str, tmp_path: Path) -> None:
    config = write_app(tmp_path)
    ok(engine("enqueue", "hello", "--payload", '{"name": "now"}', "--count", "2", dsn=dsn))
    ok(engine("enqueue", "hello", "--payload", '{"name": "later"}', "--delay", "1h", dsn=dsn))
    started = time.monotonic()
    result = engine("run", "--config", str(config), "--drain", "--app-dir", str(tmp_path), dsn=dsn, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    done = [r for r in log_records(result.stdout) if r["msg"].startswith("drain complete")]
    assert len(done) == 1, result.stdout
    assert done[0]["msg"].startswith("drain complete: nothing due or running; 1 job(s) scheduled for later, "
                                     "the first at ")
    assert done[0]["scheduled"] == {"hello": 1}
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 2
    assert scalar(dsn, "SELECT payload->>'name' FROM skiplock.jobs WHERE status = 'pending'") == "later"


def test_wait_scheduled_drains_jobs_due_later_too(dsn: str, tmp_path: Path) -> None:
    config = write_app(tmp_path)
    ok(engine("enqueue", "hello", "--payload", '{"name": "soon"}', "--delay", "2s", dsn=dsn))
    result = engine("run", "--config", str(config), "--drain", "--wait-scheduled", "--app-dir", str(tmp_path),
                    dsn=dsn, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["msg"] for r in log_records(result.stdout) if r["msg"].startswith("drain complete")] == [
        "drain complete: nothing pending or running"]
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs") == 0
    assert scalar(dsn, "SELECT payload->>'name' FROM skiplock.jobs_done") == "soon"
    line = one_line_error(engine("run", "--config", str(config), "--wait-scheduled", dsn=dsn))
    assert line == "engine: error: --wait-scheduled goes with --drain\n"


# 5. the version: engine --version, health --json, the engine's start line


def test_version_everywhere(dsn: str, tmp_path: Path) -> None:
    assert ok(engine("--version")) == f"skiplock {__version__}\n"
    assert json.loads(ok(engine("health", "--json", dsn=dsn)))["version"] == __version__
    config = write_app(tmp_path)
    result = engine("run", "--config", str(config), "--drain", "--app-dir", str(tmp_path), dsn=dsn, timeout=120)
    starting = [r for r in log_records(result.stdout) if r["msg"] == "engine starting"]
    assert starting[0]["version"] == __version__
