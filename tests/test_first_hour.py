"""What a new user trips on in the first hour (issue 13), each through real `engine` subprocesses."""

from __future__ import annotations

import glob
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from console.state import LiveState
from console.status import Attachment, header_text
from engine import __version__
from engine.embedded import SOCKET_PORT, default_data_dir, make_temp_dir
from engine.handlers import resolve
from engine.queue import Queue
from support.cli import REPO, base_env, engine, ok, one_line_error
from support.engines import wait_for
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
    ok(engine("enqueue", "hello", "--config", str(config), "--payload", '{"name": "ada"}', dsn=dsn))
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
    ok(engine("enqueue", "hello", "--config", str(config), "--payload", '{"name": "now"}', "--count", "2", dsn=dsn))
    ok(engine("enqueue", "hello", "--config", str(config), "--payload", '{"name": "later"}', "--delay", "1h", dsn=dsn))
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
    ok(engine("enqueue", "hello", "--config", str(config), "--payload", '{"name": "soon"}', "--delay", "2s", dsn=dsn))
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
    # exit 1: degraded, no engine runs here; the report carries the version all the same
    assert json.loads(engine("health", "--json", dsn=dsn).stdout)["version"] == __version__
    config = write_app(tmp_path)
    # a job to run: a drain that finds nothing due at start forks no worker
    ok(engine("enqueue", "hello", "--config", str(config), "--payload", '{"name": "v"}', dsn=dsn))
    result = engine("run", "--config", str(config), "--drain", "--app-dir", str(tmp_path), dsn=dsn, timeout=120)
    starting = [r for r in log_records(result.stdout) if r["msg"] == "engine starting"]
    assert starting[0]["version"] == __version__
    with Queue(dsn) as queue:  # each worker's row says what it ran
        versions = [w["version"] for w in queue.workers()]
    assert versions and set(versions) == {__version__}, versions
    header = str(header_text(LiveState(), Attachment("db"), now=0.0, tz=None))
    assert header.startswith(f"skiplock {__version__}"), header


# 6. ./config.toml is read only when named, and the message says so


def no_dev_cluster_env(tmp_path: Path) -> dict[str, str]:
    """A runtime dir of the test's own: no state file, so only a cluster in the default place is found."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    env = {"XDG_RUNTIME_DIR": str(runtime)}
    if (default_data_dir() / f".s.PGSQL.{SOCKET_PORT}").exists():
        pytest.skip(f"an `engine dev` cluster is running in {default_data_dir()}: every command would find it")
    return env


def test_no_database_names_the_config_flag_and_the_unread_config_here(tmp_path: Path) -> None:
    env = no_dev_cluster_env(tmp_path)
    (tmp_path / "config.toml").write_text('[global]\ndsn = "host=/nowhere dbname=x"\n')
    line = one_line_error(engine("migrate", cwd=tmp_path, env=env))
    assert line == ("engine: error: no database configured: pass --dsn, set SKIPLOCK_DSN, set `dsn` in a config "
                    "file named by --config or SKIPLOCK_CONFIG, or start `engine dev`; ./config.toml is here but "
                    "is read only when named (--config config.toml)\n")
    (tmp_path / "config.toml").unlink()
    assert one_line_error(engine("migrate", cwd=tmp_path, env=env)).endswith("or start `engine dev`\n")
    assert "./config.toml is not read unless named" in " ".join(ok(engine("migrate", "--help")).split())


# 7. `engine dev --data-dir X` is found by every other command


def test_other_commands_find_a_dev_cluster_in_any_data_dir(tmp_path: Path) -> None:
    env = no_dev_cluster_env(tmp_path)
    base = make_temp_dir("skiplock-devstate-")
    state = tmp_path / "runtime" / "skiplock" / "dev-cluster.json"
    dev = subprocess.Popen([sys.executable, "-P", "-m", "engine.cli", "dev", "--no-console", "--jobs", "10",
                            "--data-dir", str(base / "data"), "--seconds", "120"],
                           env=base_env(**env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: state.exists(), 60, message="engine dev to record its cluster")
        assert json.loads(state.read_text())["data_dir"] == str(base / "data")
        out = wait_for(lambda: (r := engine("status", env=env)).returncode == 0 and r.stdout, 30,
                       message="engine status to attach to the dev cluster")
        assert "noop" in out
        dev.send_signal(signal.SIGINT)
        assert dev.wait(60) == 0
        assert not state.exists(), "a stopped dev cluster is no longer named"
        assert one_line_error(engine("status", env=env)).startswith("engine: error: no database configured")
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
        shutil.rmtree(base, ignore_errors=True)


# 8. the docs speak the user's words and name handlers that exist


DOCS = [REPO / "README.md", REPO / "docs" / "configuration.md", REPO / "config.toml"]


def test_docs_name_no_seeds_and_only_handlers_that_exist() -> None:
    for path in DOCS:
        text = path.read_text()
        assert not re.search(r"\bseeds?\b", text, re.I), f"{path.name} speaks of seeds"
        for ref in re.findall(r'(?:handler|on_complete) *= *"([^"]+)"', text):
            if ref.startswith("myapp."):  # the README's own example app
                continue
            resolve(ref, f"{path.name}: handler")  # raises ConfigError naming the reference


# 11. the suite leaves no psqlODBC log files behind


def test_psqlodbc_connections_of_the_suite_write_no_log_files(pg_server) -> None:
    code = ("import os, pyodbc\n"
            f"c = pyodbc.connect('Driver={{PostgreSQL Unicode}};Servername={pg_server.socket_dir};"
            f"Port={pg_server.port};Database=postgres;UID=skiplock')\n"
            "c.cursor().execute('SELECT 1').fetchall(); c.close(); print(os.getpid())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if "not installed" in result.stderr or "Can't open lib" in result.stderr:
        pytest.skip("psqlODBC is not installed")
    assert result.returncode == 0, result.stderr
    pid = result.stdout.strip()
    assert not glob.glob(f"/tmp/psqlodbc_*{pid}.log"), "the suite's ODBC config turns CommLog off"


# 13. a headless engine loads no TUI module


def test_engine_run_paths_load_no_console_dependency() -> None:
    code = ("import sys\n"
            "from engine.cli import build_parser\n"
            "build_parser().parse_args(['run', '--drain'])\n"
            "import engine.supervisor, engine.worker, engine.dev\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'rich', 'pygments', 'markdown_it'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=base_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
