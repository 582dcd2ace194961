"""Survey processing (seed 000): read surveys from the "SurveyHub" source database over ODBC, score
them, and write the scores to Postgres idempotently.

- `flow.py`: the handler `process_survey(payload, ctx)` and the scoring.
- `producer.py`: enqueues the ids of submitted surveys read from the source.
- `sample_data.py`: creates sample source data over ODBC (SQLite file, PostgreSQL, SQL Server) and the
  results table.
- `config.toml`: the flow and its source; the connection string comes from $SURVEYHUB_ODBC.
- `dev.py`: `engine dev --example survey` runs all of it against the embedded PostgreSQL and a SQLite
  source.
"""
