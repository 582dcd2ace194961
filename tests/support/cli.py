"""The `engine` command run as users run it: a subprocess, with the DSN in SKIPLOCK_DSN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.update(extra)
    return env


def engine(*args: str, dsn: str | None = None, input: str | bytes = "", timeout: float = 60,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `engine *args` in a subprocess; `dsn` goes in SKIPLOCK_DSN. stdin is always given."""
    full_env = base_env(**(env or {}))
    if dsn is not None:
        full_env["SKIPLOCK_DSN"] = dsn
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=full_env, input=input,
                          capture_output=True, text=not isinstance(input, bytes), timeout=timeout, cwd=REPO)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """Assert a failure reported as exactly one line on stderr, no traceback; returns that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("engine: error: "), result.stderr
    return result.stderr
