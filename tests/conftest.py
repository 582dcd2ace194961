"""Every fixture lives in tests/support/ and is registered here; tests import helpers from `support`.

- support.postgres: the session's PostgreSQL, a fresh database per test (`dsn`, `empty_dsn`, `conn`,
  `queue`), `scalar()`.
- support.engines: real `engine run` processes (`start_engine`), `wait_for()`.
- support.odbc: psqlODBC's per-process log files off for the whole run (ODBCSYSINI).
- support.pgbouncer: a real PgBouncer in transaction mode (`pgbouncer`, `start_pgbouncer()`).
- support.isolation: a per-process XDG_RUNTIME_DIR (parallel runs: pytest-xdist in pyproject addopts).
"""

pytest_plugins = ["support.postgres", "support.engines", "support.odbc", "support.pgbouncer", "support.isolation"]
