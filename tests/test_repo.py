"""Repository contracts: the README's commands, CI running them, the engine/console boundary, test imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md must open with a bash block of commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_install_and_run_then_test_command() -> None:
    commands = readme_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install") and commands[0].endswith("engine dev")
    assert commands[1].endswith("python -m pytest")


def test_ci_runs_the_readme_test_command() -> None:
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert readme_commands()[1] in ci_lines


def test_engine_never_imports_the_console() -> None:
    code = (
        "import sys, engine.cli, engine.supervisor, engine.worker, engine.queue, engine.dev, engine.telemetry\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('console', 'textual', 'rich'))\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_tests_import_helpers_from_support_not_from_other_tests() -> None:
    """Shared helpers live in tests/support/; its fixtures are plugins registered in tests/conftest.py."""
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
           for path in sorted((ROOT / "tests").rglob("*.py"))
           for line, module in imported_modules(path)
           if module.split(".")[0] == "conftest" or module.split(".")[0].startswith("test_")]
    assert bad == [], "\n".join(bad)
