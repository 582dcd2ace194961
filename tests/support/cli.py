"""Running the `engine` command as users' scripts do: a real subprocess per call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKIPLOCK")}
    # No empty entry: it would put the current directory on sys.path.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def engine(*args: str, dsn: str | None = None, input: str | bytes = "", timeout: float = 60,
           env: dict[str, str] | None = None, cwd: Path | str = REPO) -> subprocess.CompletedProcess:
    """Run `engine *args` in a subprocess; `dsn` goes in SKIPLOCK_DSN. stdin is always given.

    `python -P`: like the installed `engine` script, the current directory is not on sys.path.
    """
    full_env = base_env(**(env or {}))
    if dsn is not None:
        full_env["SKIPLOCK_DSN"] = dsn
    return subprocess.run([sys.executable, "-P", "-m", "engine.cli", *args], env=full_env, input=input,
                          capture_output=True, text=not isinstance(input, bytes), timeout=timeout, cwd=cwd)


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
