"""What a new user trips on in the first hour (issue 13), each through real `engine` subprocesses."""

from __future__ import annotations

from pathlib import Path

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
