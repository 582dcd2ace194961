"""skiplock: a PostgreSQL-backed work-queue engine."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (tool.hatch.version)

# What handlers raise (engine.errors): no other import, so `engine run` stays light.
from engine.errors import JobCancelled, Snooze  # noqa: E402

__all__ = ["JobCancelled", "Next", "Result", "Snooze", "__version__"]


def __getattr__(name: str) -> object:
    # `from engine import Next, Result` without importing the store for every `import engine`.
    if name in ("Next", "Result"):
        from engine import stages

        return getattr(stages, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
