"""Every fixture lives in tests/support/ and is registered here; tests import helpers from `support`.

- support.postgres: the session's PostgreSQL, a fresh database per test (`dsn`, `empty_dsn`, `conn`,
  `queue`), `scalar()`.
- support.engines: real `engine run` processes (`start_engine`), `wait_for()`.
"""

pytest_plugins = ["support.postgres", "support.engines"]
