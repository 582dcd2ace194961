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


# Sends every statement of engine/sql/queries.sql; engine/sql/__init__.py is the loader it uses.
STORE_MODULES = {"engine/store.py", "engine/sql/__init__.py"}


def _sql_references(path: Path) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name == "engine.sql" or a.name.startswith("engine.sql.")]
        elif isinstance(node, ast.ImportFrom):
            module = ("." * node.level) + (node.module or "")
            if module in ("engine.sql", ".sql", "..sql") or module.startswith("engine.sql."):
                found.append(f"from {module} import ...")
            elif module in ("engine", ".") and any(a.name == "sql" for a in node.names):
                found.append(f"from {module} import sql")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Q":
            found.append(f"Q.{node.attr} (line {node.lineno})")
    return found


def test_only_the_store_sends_the_named_statements() -> None:
    # Product code and benchmarks; tests may read statement text (plans, prepared-statement checks).
    offenders = {}
    for package in ("engine", "console", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            if name in STORE_MODULES:
                continue
            found = _sql_references(path)
            if found:
                offenders[name] = found
    assert not offenders, f"send these statements through engine/store.py: {offenders}"


def test_the_store_check_sees_a_stray_statement(tmp_path: Path) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text("from engine.sql import Q\nfrom engine import sql\nconn.execute(Q.claim_batch)\n")
    assert _sql_references(stray) == ["from engine.sql import ...", "from engine import sql", "Q.claim_batch (line 3)"]


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
    """The CLIs compose the parts; engine/ (the examples included) and console/ never import engine/cli.py."""
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for folder in ("engine", "console")
           for path in sorted((ROOT / folder).rglob("*.py")) if path != ROOT / "engine" / "cli.py"
           for name, line in _imports(path) if name == "engine.cli" or name.startswith("engine.cli.")]
    assert not bad, "\n".join(bad)
