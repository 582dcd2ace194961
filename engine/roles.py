"""Least-privilege roles (migration 0020_roles.sql; README "Running in containers" > Roles).

Which role each command needs, and the one-line message for a command run with too little: it names
the command, what the login role lacks (read from the catalog: what the needed role may do there
that this login may not) and the GRANT that fixes it.
"""

from __future__ import annotations

import re
from typing import Final

import psycopg

from engine import store
from engine.errors import PrivilegeMissing

ENGINE: Final = "skiplock_engine"
OPERATOR: Final = "skiplock_operator"
VIEWER: Final = "skiplock_viewer"
ROLES: Final = (ENGINE, OPERATOR, VIEWER)

# The least role each `engine` command needs, as the CLI names them ("dlq retry"); a command not named
# here is taken to need OPERATOR. Commands of the schema's owner are OWNER_COMMANDS.
COMMAND_ROLES: Final = {
    "run": ENGINE,
    "enqueue": OPERATOR, "pause": OPERATOR, "resume": OPERATOR, "cancel": OPERATOR,
    "dlq retry": OPERATOR, "dlq purge": OPERATOR,
    "schedule add": OPERATOR, "schedule remove": OPERATOR, "schedule pause": OPERATOR,
    "schedule resume": OPERATOR, "schedule trigger": OPERATOR,
    "console actions": OPERATOR,
    "status": VIEWER, "health": VIEWER, "wait": VIEWER, "console": VIEWER,
    "dlq list": VIEWER, "dlq show": VIEWER, "dlq analyze": VIEWER,
    "jobs list": VIEWER, "jobs show": VIEWER, "schedule list": VIEWER,
    "engines": VIEWER, "explain": VIEWER, "runs show": VIEWER,
    "runs seal": OPERATOR, "scale": OPERATOR, "drain": OPERATOR, "stop": OPERATOR,
}
OWNER_COMMANDS: Final = frozenset({"migrate", "dev"})

# PostgreSQL's "permission denied for table jobs" (also sequence, schema, function, database).
_DENIED: Final = re.compile(r"permission denied for (table|sequence|relation|schema|function|database) \"?([\w.]+)\"?")


def role_for(command: str) -> str:
    return COMMAND_ROLES.get(command, OPERATOR)


def denied_message(command: str, login: str | None, missing: list[str], detail: str = "") -> str:
    """One line: the command, what this login role lacks, and the fix."""
    if command in OWNER_COMMANDS:
        return (f"{command}: permission denied ({detail}): run it as the owner of the skiplock schema (a role "
                "with CREATE on the database; CREATEROLE too the first time, for migration 20's roles); "
                f"{', '.join(ROLES)} cannot migrate")
    role = role_for(command)
    who = f'login role "{login}"' if login else "this login role"
    by_object: dict[str, list[str]] = {}
    for item in missing:  # "UPDATE on skiplock.jobs" -> {"skiplock.jobs": ["UPDATE"]}
        privilege, _, target = item.partition(" on ")
        by_object.setdefault(target, []).append(privilege)
    groups = [f"{', '.join(privileges)} on {target}" for target, privileges in by_object.items()]
    lacks = "; ".join(groups[:4]) + (f" (and {len(groups) - 4} more)" if len(groups) > 4 else "")
    what = f"{who} lacks {lacks}" if missing else f"{who} lacks a privilege ({detail})"
    grantee = f'"{login}"' if login else "<login role>"
    return f"{command}: permission denied: {what}; it needs role {role}: GRANT {role} TO {grantee};"


def require(conn: psycopg.Connection, command: str) -> None:
    """Refuse up front, in one line, a command whose login role lacks something its role may do
    (`engine run` checks before it forks a worker that would fail in a crash loop)."""
    missing = store.privileges_missing(conn, role_for(command))
    if missing:
        raise PrivilegeMissing(denied_message(command, conn.info.user, missing))


def explain(exc: psycopg.Error, command: str, dsn: str | None) -> str:
    """The one-line message for an InsufficientPrivilege raised while running `command`: what the
    needed role may do on the object the error names that this login role may not, read on a fresh
    connection (the failed one may be mid-transaction)."""
    found = _DENIED.search(str(exc))
    detail = found.group(0) if found else str(exc).splitlines()[0]
    relation = found.group(2).rsplit(".", 1)[-1] if found and found.group(1) in ("table", "sequence", "relation") \
        else None
    login, missing = None, []
    if dsn is not None and command not in OWNER_COMMANDS:
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                login = conn.info.user
                missing = store.privileges_missing(conn, role_for(command), relation)
        except psycopg.Error:
            pass  # the message below still names the command, the error and the role
    return denied_message(command, login, missing, detail)
