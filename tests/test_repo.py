"""Repository contracts: the README's commands, CI running them, and the engine/console boundary."""

from __future__ import annotations

import re
import subprocess
import sys
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


def _imports(path: Path, *, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) of every import in the file, function bodies included unless asked."""
    import ast

    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: list[tuple[str, int]] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


TUI_PACKAGES = ("console", "textual", "rich")


def test_only_the_composition_point_imports_the_console() -> None:
    """engine/cli.py wires `engine dev` and `engine console`: it alone may import the console, lazily."""
    composition = ROOT / "engine" / "cli.py"
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / "engine").rglob("*.py")) if path != composition
           for name, line in _imports(path) if name.split(".")[0] in TUI_PACKAGES]
    bad += [f"engine/cli.py:{line} imports {name} at module level"
            for name, line in _imports(composition, module_level_only=True) if name.split(".")[0] in TUI_PACKAGES]
    assert not bad, "\n".join(bad)


def test_no_part_imports_the_cli() -> None:
    """The CLIs compose the parts; engine/, console/ and the examples never import engine/cli.py."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for folder in ("engine", "console", "examples")
           for path in sorted((ROOT / folder).rglob("*.py")) if path != ROOT / "engine" / "cli.py"
           for name, line in _imports(path) if name == "engine.cli" or name.startswith("engine.cli.")]
    assert not bad, "\n".join(bad)
