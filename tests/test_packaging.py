"""What `pip install` puts in site-packages: the wheel and the editable install, built for real."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("packaging")  # one module fixture builds in the checkout

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 120


@dataclass(frozen=True)
class Builds:
    wheel: Path
    editable_target: Path


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Builds:
    """The wheel and an editable install, built at once (each takes seconds).

    The editable install goes to a --target directory: with --target pip ignores what is installed,
    so it never uninstalls the environment's own skiplock."""
    base = tmp_path_factory.mktemp("packaging")
    wheel_dir, target = base / "wheel", base / "editable"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--no-input"]
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    commands = [
        [*pip, "wheel", "--no-deps", "-w", str(wheel_dir), str(ROOT)],
        [*pip, "install", "--no-deps", "--ignore-installed", "--no-warn-script-location",
         "--target", str(target), "-e", str(ROOT)],
    ]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for c in commands]
    for command, proc in zip(commands, procs):
        output, _ = proc.communicate(timeout=PIP_TIMEOUT_S)
        assert proc.returncode == 0, f"{' '.join(command)}:\n{output}"
    (wheel,) = wheel_dir.glob("*.whl")
    return Builds(wheel, target)


def test_wheel_installs_exactly_engine_and_console(builds: Builds) -> None:
    names = zipfile.ZipFile(builds.wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"engine", "console"}
    assert [name for name in names if name.endswith(".orig")] == []


def test_wheel_ships_the_migrations_and_the_survey_example(builds: Builds, tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(builds.wheel).namelist())
    expected = {f"engine/_migrations/{p.name}" for p in (ROOT / "migrations").glob("*.sql")}
    assert expected and expected <= names
    # Installed from the wheel alone (PYTHONPATH replaces this checkout), the engine finds both.
    site = tmp_path / "site"
    zipfile.ZipFile(builds.wheel).extractall(site)
    code = ("import engine.migrate as m, engine.examples.survey.dev as d; "
            "print(m.migrations_dir()); print(m.REQUIRED_SCHEMA_VERSION); print(d.__file__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(site)}, timeout=60)
    assert result.returncode == 0, result.stderr
    migrations, version, example = result.stdout.split()
    assert Path(migrations) == site / "engine" / "_migrations"
    assert int(version) == max(int(Path(name).name[:4]) for name in expected)
    assert Path(example).is_relative_to(site)


def test_editable_install_leaves_no_package_directories(builds: Builds) -> None:
    """Only the .pth, the .dist-info and the scripts: no copied files (once, engine/_migrations/)."""
    stray = sorted(p.name for p in builds.editable_target.iterdir()
                   if p.is_dir() and not p.name.endswith(".dist-info") and p.name != "bin")
    assert stray == []
    assert [p.name for p in builds.editable_target.glob("*.pth")], "the editable install writes a .pth"
