"""Sample SurveyHub data, written over ODBC so the same code fills a SQLite file, a PostgreSQL database
or a SQL Server: the DDL uses only types all three share (INTEGER, VARCHAR, DECIMAL, DATE).

    python -m engine.examples.survey.sample_data --sqlite /tmp/surveyhub.sqlite --surveys 200
    python -m engine.examples.survey.sample_data --odbc 'Driver={PostgreSQL Unicode};Servername=...;Database=surveyhub'
    python -m engine.examples.survey.sample_data --sqlite /tmp/surveyhub.sqlite --dsn "$SKIPLOCK_DSN"  # + results table

Existing sample tables are dropped first. About one survey in ten is a draft, which the producer skips.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Final

import psycopg

from engine.sources import Source, SourceConfig

from engine.examples.survey.flow import create_results_table

QUESTIONS: Final = (
    (1, "How likely are you to recommend us?", Decimal("3.00")),
    (2, "How satisfied are you with the product?", Decimal("2.00")),
    (3, "How easy was it to get help?", Decimal("1.50")),
    (4, "How fair is the price?", Decimal("1.00")),
    (5, "How likely are you to buy again?", Decimal("2.50")),
)
DDL: Final = (
    "DROP TABLE IF EXISTS survey_answers",
    "DROP TABLE IF EXISTS surveys",
    "DROP TABLE IF EXISTS survey_questions",
    "CREATE TABLE survey_questions (question_id INTEGER PRIMARY KEY, question_text VARCHAR(200) NOT NULL, "
    "weight DECIMAL(5, 2) NOT NULL)",
    "CREATE TABLE surveys (survey_id INTEGER PRIMARY KEY, respondent VARCHAR(100) NOT NULL, "
    "status VARCHAR(20) NOT NULL, submitted_on DATE)",
    "CREATE TABLE survey_answers (survey_id INTEGER NOT NULL, question_id INTEGER NOT NULL, "
    "answer_value INTEGER NOT NULL, PRIMARY KEY (survey_id, question_id))",
)


def sqlite_connection_string(path: Path | str) -> str:
    return f"Driver={{SQLite3}};Database={path}"


def create_source_data(connection_string: str, surveys: int = 50, *, seed: int = 6) -> list[int]:
    """(Re)creates the SurveyHub tables and fills them; returns the ids of the submitted surveys."""
    rng = random.Random(seed)
    survey_rows: list[tuple[int, str, str, dt.date | None]] = []
    answer_rows: list[tuple[int, int, int]] = []
    submitted: list[int] = []
    start = dt.date(2024, 1, 1)
    for survey_id in range(1, surveys + 1):
        draft = rng.random() < 0.1
        survey_rows.append((survey_id, f"respondent-{survey_id:05d}", "draft" if draft else "submitted",
                            None if draft else start + dt.timedelta(days=rng.randrange(365))))
        if not draft:
            submitted.append(survey_id)
        mood = rng.choice((3, 6, 8, 9, 10))
        for question_id, _text, _weight in QUESTIONS:
            answer_rows.append((survey_id, question_id, max(0, min(10, mood + rng.randint(-2, 1)))))
    source = Source(SourceConfig("sample-data", connection_string, retries=0))
    try:
        for statement in DDL:
            source.execute(statement)
        # One transaction (SQLite commits, and syncs, per statement otherwise). Plain executemany, not
        # fast_executemany: SQLite's driver rejects Decimal parameters there.
        with source.transaction() as cursor:
            cursor.executemany("INSERT INTO survey_questions (question_id, question_text, weight) VALUES (?, ?, ?)",
                               QUESTIONS)
            cursor.executemany("INSERT INTO surveys (survey_id, respondent, status, submitted_on) "
                               "VALUES (?, ?, ?, ?)", survey_rows)
            cursor.executemany("INSERT INTO survey_answers (survey_id, question_id, answer_value) VALUES (?, ?, ?)",
                               answer_rows)
    finally:
        source.close()
    return submitted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.examples.survey.sample_data",
                                     description="create sample SurveyHub data over ODBC")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--sqlite", type=Path, help="SQLite file (SQLite3 ODBC driver, libsqliteodbc)")
    where.add_argument("--odbc", help="any ODBC connection string")
    parser.add_argument("--surveys", type=int, default=50)
    parser.add_argument("--dsn", help="also create the survey_results table in this Postgres database")
    args = parser.parse_args(argv)
    connection_string = sqlite_connection_string(args.sqlite.resolve()) if args.sqlite else args.odbc
    submitted = create_source_data(connection_string, args.surveys)
    print(f"{args.surveys} surveys written ({len(submitted)} submitted)")
    if args.dsn:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            create_results_table(conn)
        print("survey_results table ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
