"""skiplock: a PostgreSQL-backed work-queue engine."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.hatch.version)
