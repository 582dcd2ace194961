"""The README's "Your first flow", followed literally: the files it shows are written as shown, and the
commands it lists are run in order by a shell in a fresh project directory, against a real database
(SKIPLOCK_DSN). The console runs on a pseudo-terminal until it shows the flow, then gets `q`."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import tomllib
from pathlib import Path

import pytest

from support.cli import REPO, base_env
from support.postgres import scalar

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b[()][A-Za-z0-9]|\x1b[=>NOPX\\\]^_][^\x07\x1b]*(\x07|\x1b\\)?")


def first_flow_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Your first flow\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def files_shown(section: str) -> dict[str, str]:
    """Code blocks whose first line names the file: `# path`."""
    files = {}
    for body in re.findall(r"```(?:python|toml)\n(.*?)```", section, re.S):
        first = body.splitlines()[0]
        match = re.fullmatch(r"# ([\w./-]+\.(?:py|toml))", first)
        if match:
            files[match.group(1)] = body
    return files


def commands_listed(section: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the walk-through lists its commands in one bash block"
    return [re.sub(r"\s+#\s.*$", "", line).strip() for line in blocks[0].splitlines() if line.strip()]


def installed_scripts(bin_dir: Path) -> Path:
    """`engine` and `console` as `pip install` writes them from pyproject.toml, on this interpreter (the
    environment's own scripts may predate a change of entry point)."""
    bin_dir.mkdir()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        script.chmod(0o755)
    return bin_dir


def run_on_a_terminal(command: str, cwd: Path, env: dict[str, str], until: str, timeout: float = 90) -> str:
    """`command` on a pseudo-terminal until its screen shows `until`, then `q`; returns the screen text."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a shell on the terminal
        os.chdir(cwd)
        os.execvpe("bash", ["bash", "-c", command], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while until not in ANSI.sub("", output.decode(errors="replace")):
            if time.monotonic() > deadline:
                pytest.fail(f"{command!r} did not show {until!r}:\n{ANSI.sub('', output.decode(errors='replace'))[-3000:]}")
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    break
        os.write(fd, b"q")
        end = time.monotonic() + 30
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.waitstatus_to_exitcode(status) == 0, ANSI.sub("", output.decode(errors="replace"))[-3000:]
                return ANSI.sub("", output.decode(errors="replace"))
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    output += os.read(fd, 65536)
                except OSError:
                    pass
        pytest.fail(f"{command!r} did not quit on q")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_readme_first_flow_followed_literally(dsn: str, tmp_path: Path) -> None:
    section = first_flow_section()
    files = files_shown(section)
    assert set(files) == {"myapp/jobs.py", "config.toml", "enqueue.py", "test_jobs.py"}
    commands = commands_listed(section)
    assert [c.split()[0] for c in commands] == ["mkdir", "engine", "python", "engine", "engine", "python", "console"]

    project = tmp_path / "project"
    project.mkdir()
    runtime = tmp_path / "runtime"  # no `engine dev` state file: the database is SKIPLOCK_DSN
    runtime.mkdir()
    env = base_env(SKIPLOCK_DSN=dsn, XDG_RUNTIME_DIR=str(runtime), TERM="xterm-256color")
    env["PATH"] = os.pathsep.join([str(installed_scripts(tmp_path / "bin")), str(Path(sys.executable).parent),
                                   env["PATH"]])
    outputs = []
    for command in commands:
        if command.startswith("console"):
            screen = run_on_a_terminal(command, project, env, until="greet")
            outputs.append(screen)
            continue
        result = subprocess.run(["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True,
                                timeout=180)
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-3000:])
        outputs.append(result.stdout)
        if command.startswith("mkdir"):  # "and save the four files above"
            for name, body in files.items():
                (project / name).write_text(body)

    # what the walk-through promises: the three jobs ran, the test passed, the console showed the flow
    status = outputs[4].splitlines()
    header = status[0].split()
    greet = dict(zip(header, next(line.split() for line in status if line.startswith("greet"))))
    assert (greet["pending"], greet["claimed"], greet["dead"]) == ("0", "0", "0")
    assert int(greet["completed"]) == 3
    assert "2 passed" in outputs[5]
    assert scalar(dsn, "SELECT array_agg(result->>'greeting' ORDER BY id) FROM skiplock.jobs_done") == [
        "hello Ada", "hello Grace", "hello Linus", "hello Grace"]
