"""A TCP proxy the tests control, between an engine (or any client) and the test PostgreSQL.

Real faults, not mocks: `cut()` drops every connection and refuses new ones (an engine cut off from
its database while its handlers keep running), `restore()` lets them through again, and
`drop_after_reply(pattern)` lets the next client message containing `pattern` through, swallows
the server's reply and drops that connection: the statement committed, the client never learns it.
With `at=b"COMMIT"` the drop waits for that connection's next COMMIT: the transaction the matched
statement ran in committed, the client never learns it.

The upstream is the server's Unix socket (the suite's server does not listen on TCP) or a TCP address.
One thread runs a selector loop over every socket; nothing here blocks the test.
"""

from __future__ import annotations

import selectors
import socket
import threading
from dataclasses import dataclass, field

import psycopg

Upstream = str | tuple[str, int]  # a Unix socket path, or (host, port)


def unix_socket_of(dsn: str) -> str:
    """The Unix socket path libpq would use for `dsn` (host is a directory)."""
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"{params['host']}/.s.PGSQL.{params.get('port', 5432)}"


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket
    drop_on_reply: bool = False  # set when a client message matched: drop after the next server data
    drop_at: bytes | None = None  # set when a client message matched: drop_on_reply at the next message with this
    closed: bool = False


@dataclass
class TcpProxy:
    upstream: Upstream
    host: str = "127.0.0.1"
    port: int = 0
    _pairs: list[_Pair] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _refusing: bool = False
    _drop_patterns: list[list[object]] = field(default_factory=list)  # [pattern, remaining, at]
    connections_accepted: int = 0
    drops_done: int = 0

    def __post_init__(self) -> None:
        self._listener = socket.create_server((self.host, self.port))
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- what tests call -----------------------------------------------------------------------------

    def dsn(self, dsn: str) -> str:
        """`dsn` rewritten to go through this proxy (same user and database)."""
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        params.update(host=self.host, port=str(self.port))
        return psycopg.conninfo.make_conninfo(**params)

    def cut(self) -> None:
        """Drop every connection now and refuse new ones until restore()."""
        with self._lock:
            self._refusing = True
            pairs = list(self._pairs)
        for pair in pairs:
            self._close(pair)

    def restore(self) -> None:
        with self._lock:
            self._refusing = False

    def drop_after_reply(self, pattern: bytes, count: int = 1, at: bytes | None = None) -> None:
        """The next `count` client messages containing `pattern`: forward them, swallow the server's
        reply (with `at`: the reply to that connection's next message containing `at`), and drop
        that connection."""
        with self._lock:
            self._drop_patterns.append([pattern, count, at])

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for pair in list(self._pairs):
            self._close(pair)
        self._listener.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ------------------------------------------------------------------------------------

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.upstream, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.upstream)
        else:
            sock = socket.create_connection(self.upstream)
        return sock

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        with self._lock:
            refusing = self._refusing
        if refusing:
            client.close()
            return
        try:
            server = self._connect_upstream()
        except OSError:
            client.close()
            return
        # Blocking with a timeout: the selector says when to read, and a send waits for a full buffer.
        client.settimeout(10)
        server.settimeout(10)
        pair = _Pair(client, server)
        with self._lock:
            self._pairs.append(pair)
            self.connections_accepted += 1
        self._selector.register(client, selectors.EVENT_READ, (pair, "client"))
        self._selector.register(server, selectors.EVENT_READ, (pair, "server"))

    def _arm(self, pair: _Pair, data: bytes) -> None:
        """Mark `pair` for a drop if the client message `data` matches a pattern."""
        if pair.drop_at is not None:
            pair.drop_on_reply = pair.drop_on_reply or pair.drop_at in data
            return
        with self._lock:
            for entry in self._drop_patterns:
                pattern, remaining, at = entry
                if remaining and pattern in data:  # type: ignore[operator]
                    entry[1] = int(remaining) - 1  # type: ignore[call-overload]
                    pair.drop_at = at  # type: ignore[assignment]
                    pair.drop_on_reply = at is None
                    return

    def _close(self, pair: _Pair) -> None:
        with self._lock:
            if pair.closed:
                return
            pair.closed = True
            if pair in self._pairs:
                self._pairs.remove(pair)
        for sock in (pair.client, pair.server):
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                    continue
                if key.data == "wake":
                    self._wake_r.recv(64)
                    continue
                pair, side = key.data
                if pair.closed:
                    continue
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    self._close(pair)
                    continue
                target = pair.server if side == "client" else pair.client
                if side == "client":
                    self._arm(pair, data)
                if side == "server" and pair.drop_on_reply:
                    # The server has answered (so an autocommit statement or COMMIT took effect);
                    # the client never sees the answer.
                    self._close(pair)
                    with self._lock:
                        self.drops_done += 1
                    continue
                try:
                    target.sendall(data)
                except OSError:
                    self._close(pair)
                    continue
