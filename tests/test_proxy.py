"""The fault-injection proxy itself: it must really cut, refuse, restore and drop after a reply."""

from __future__ import annotations

import time

import psycopg
import pytest

from support.proxy import TcpProxy, unix_socket_of


def test_proxy_forwards_cuts_and_restores(dsn: str) -> None:
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        conn = psycopg.connect(proxy.dsn(dsn), autocommit=True)
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        proxy.cut()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(proxy.dsn(dsn), connect_timeout=2)
        proxy.restore()
        with psycopg.connect(proxy.dsn(dsn), autocommit=True) as again:
            assert again.execute("SELECT 1").fetchone() == (1,)


def test_drop_after_reply_commits_but_the_client_never_hears(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as direct:
        direct.execute("CREATE TABLE proxy_probe (x int)")
    with TcpProxy(unix_socket_of(dsn)) as proxy:
        conn = psycopg.connect(proxy.dsn(dsn), autocommit=True)
        proxy.drop_after_reply(b"proxy_probe_marker")
        with pytest.raises(psycopg.OperationalError):
            conn.execute("INSERT INTO proxy_probe /* proxy_probe_marker */ VALUES (7)")
        # The proxy counts the drop just after closing the socket the client already saw fail.
        deadline = time.monotonic() + 5
        while proxy.drops_done < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.drops_done == 1
    with psycopg.connect(dsn, autocommit=True) as direct:
        assert direct.execute("SELECT x FROM proxy_probe").fetchall() == [(7,)]
