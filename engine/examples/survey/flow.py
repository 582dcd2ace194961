"""The survey flow: SurveyHub (source, over ODBC) -> score -> survey_results (Postgres).

The handler takes `(payload, ctx)`:
- `ctx.sources["surveyhub"]` is the source connection, opened once per worker process; statements that
  fail with a transient ODBC error (lost connection, timeout, deadlock) are retried after reconnecting.
- `ctx.pg` is a Postgres connection from the worker's pool. The flow sets `transactional = true`, so
  the result row commits in the same transaction as the job's ack: a crash between the two cannot
  leave a result for a job that will run again, nor an acked job without its result. The write is an
  upsert anyway (`ON CONFLICT`), so running a survey twice (re-enqueued, or on a flow without
  `transactional`) leaves one row.
- A survey that is not in the source raises `SurveyNotFound`, a PermanentError: it goes straight to
  the dead letters instead of being retried.

Parameters to the source use the ODBC placeholder `?` on every driver; the Postgres side uses psycopg's
`%(name)s`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from engine.errors import PermanentError

SOURCE: Final = "surveyhub"

SURVEY_SQL: Final = "SELECT survey_id, respondent, status FROM surveys WHERE survey_id = ?"
ANSWERS_SQL: Final = (
    "SELECT a.question_id, a.answer_value, q.weight "
    "FROM survey_answers a JOIN survey_questions q ON q.question_id = a.question_id "
    "WHERE a.survey_id = ? ORDER BY a.question_id"
)

RESULTS_DDL: Final = """
CREATE TABLE IF NOT EXISTS survey_results (
    survey_id        integer PRIMARY KEY,
    respondent       text NOT NULL,
    score            numeric(5, 2) NOT NULL,
    band             text NOT NULL,
    answers          integer NOT NULL,
    job_id           bigint NOT NULL,
    processed_at     timestamptz NOT NULL DEFAULT now(),
    times_processed  integer NOT NULL DEFAULT 1
)
"""
UPSERT_SQL: Final = """
INSERT INTO survey_results (survey_id, respondent, score, band, answers, job_id)
VALUES (%(survey_id)s, %(respondent)s, %(score)s, %(band)s, %(answers)s, %(job_id)s)
ON CONFLICT (survey_id) DO UPDATE
SET respondent = EXCLUDED.respondent, score = EXCLUDED.score, band = EXCLUDED.band,
    answers = EXCLUDED.answers, job_id = EXCLUDED.job_id, processed_at = now(),
    times_processed = survey_results.times_processed + 1
"""

MAX_ANSWER: Final = 10


class SurveyNotFound(PermanentError):
    """The survey id is not in the source (deleted, or a bad id): retrying cannot help."""


class IncompleteSurvey(PermanentError):
    """The survey has no answers to score."""


@dataclass(frozen=True)
class Score:
    score: Decimal  # 0.00 .. 100.00
    band: str  # promoter | passive | detractor
    answers: int


def score(answers: Iterable[Sequence[Any]]) -> Score:
    """Weighted mean of (question_id, value 0..10, weight) rows, scaled to 0..100.

    Weights are DECIMAL in the source. SQLite's ODBC driver returns DECIMAL columns as text, so every
    weight goes through Decimal(str(...)), which gives the same number on every driver.
    """
    total = Decimal(0)
    weights = Decimal(0)
    count = 0
    for _question, value, weight in answers:
        w = Decimal(str(weight))
        v = int(value)
        if not 0 <= v <= MAX_ANSWER:
            raise ValueError(f"answer value {v} outside 0..{MAX_ANSWER}")
        total += w * v
        weights += w
        count += 1
    if count == 0 or weights == 0:
        raise IncompleteSurvey("survey has no weighted answers")
    value = (total / weights * 100 / MAX_ANSWER).quantize(Decimal("0.01"))
    band = "promoter" if value >= 90 else "passive" if value >= 70 else "detractor"
    return Score(value, band, count)


def process_survey(payload: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Handler of the `survey` flow: payload {"survey_id": N}."""
    survey_id = int(payload["survey_id"])
    source = ctx.sources[SOURCE]
    survey = source.query_one(SURVEY_SQL, survey_id)
    if survey is None:
        raise SurveyNotFound(f"survey {survey_id} does not exist in {SOURCE}")
    result = score(source.query(ANSWERS_SQL, survey_id))
    ctx.pg.execute(UPSERT_SQL, {"survey_id": survey_id, "respondent": survey.respondent, "score": result.score,
                                "band": result.band, "answers": result.answers, "job_id": ctx.job_id})
    return {"score": str(result.score), "band": result.band}


def create_results_table(conn: Any) -> None:
    """The results table in the Postgres database the engine uses (psycopg connection)."""
    conn.execute(RESULTS_DDL)
