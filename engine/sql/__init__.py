"""Loads engine/sql/queries.sql once into a mapping of name -> statement.

Only engine/store.py uses it (`Q.claim_batch`); a reader finds every statement the engine can send in
one file, and every call that sends one in one module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

_QUERY_FILE: Final = Path(__file__).with_name("queries.sql")
_NAME_LINE: Final = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def _load(text: str) -> dict[str, str]:
    parts = _NAME_LINE.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        statement = "\n".join(lines).strip()
        if name in queries:
            raise ValueError(f"{_QUERY_FILE}: query {name!r} is defined twice")
        # psycopg runs a single statement per execute for prepared statements; keep the trailing ';'
        # only for multi-statement blocks.
        queries[name] = statement[:-1] if statement.count(";") == 1 and statement.endswith(";") else statement
    return queries


class _Queries:
    def __init__(self, queries: dict[str, str]) -> None:
        self._queries = queries

    def __getattr__(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise AttributeError(f"no query named {name!r} in {_QUERY_FILE}") from None

    def names(self) -> list[str]:
        return sorted(self._queries)


Q: Final = _Queries(_load(_QUERY_FILE.read_text()))
