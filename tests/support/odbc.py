"""The tests' ODBC setup: the system's driver config with psqlODBC's logging off.

Debian's /etc/odbcinst.ini ships psqlODBC with `CommLog=1`, so every process that connects leaves a
/tmp/psqlodbc_*.log behind. The driver reads it from the driver's section at load time (`CommLog=0`
in the connection string does not stop it: measured), so the suite points unixODBC at a copy of the
system files with CommLog and Debug off (ODBCSYSINI, inherited by the engines the tests start).
Registered as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.embedded import make_temp_dir

_quiet_dir: Path | None = None


def system_odbc_dir() -> Path:
    """Where unixODBC reads odbcinst.ini and odbc.ini from (`odbcinst -j`), else /etc."""
    try:
        out = subprocess.run(["odbcinst", "-j"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return Path("/etc")
    match = re.search(r"^DRIVERS\.*:\s*(\S+)$", out, re.M)
    return Path(match.group(1)).parent if match else Path("/etc")


def write_quiet_config(source: Path, target: Path) -> None:
    for name in ("odbcinst.ini", "odbc.ini"):
        if (source / name).is_file():
            text = (source / name).read_text()
            (target / name).write_text(re.sub(r"^(CommLog|Debug)\s*=\s*1\s*$", r"\1=0", text, flags=re.M))


def pytest_configure(config: pytest.Config) -> None:
    global _quiet_dir
    if "ODBCSYSINI" in os.environ:  # the caller chose its own ODBC config
        return
    _quiet_dir = make_temp_dir("skiplock-odbc-")
    write_quiet_config(system_odbc_dir(), _quiet_dir)
    os.environ["ODBCSYSINI"] = str(_quiet_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _quiet_dir is not None:
        os.environ.pop("ODBCSYSINI", None)
        shutil.rmtree(_quiet_dir, ignore_errors=True)
