"""skiplock: a PostgreSQL-backed work-queue engine."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.hatch.version)

# What handlers raise (engine.errors): no other import, so `engine run` stays light.
from engine.errors import JobCancelled, Snooze  # noqa: E402

__all__ = ["JobCancelled", "Snooze", "__version__"]
