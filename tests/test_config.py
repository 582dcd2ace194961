"""engine.config: lookup order, environments, overrides, secrets and error messages. No database."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path

import pytest

from engine.config import (
    BackoffPolicy,
    CircuitPolicy,
    Settings,
    load_settings,
    parse_duration,
)
from engine.errors import ConfigError
from engine.redact import redact_dsn

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(
    path: Path | None,
    env: str | None = None,
    environ: dict[str, str] | None = None,
    dsn: str | None = None,
) -> Settings:
    # Always pass environ explicitly so the developer's own SKIPLOCK_* variables cannot leak in.
    return load_settings(path, env=env, environ=environ or {}, dsn=dsn)


def error(path: Path | None, env: str | None = None, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, env=env, environ=environ)
    return str(info.value)


# --- lookup order ----------------------------------------------------------------------------------

FOUR_LEVELS = """
    [global]
    batch_size = 1
    [flows.survey]
    handler = "examples.survey:process"
    batch_size = 2
    [environments.prod.global]
    batch_size = 3
    [environments.prod.flows.survey]
    batch_size = 4
"""


def test_environment_flow_level_beats_every_other(tmp_path: Path) -> None:
    path = write(tmp_path, FOUR_LEVELS)
    assert load(path, env="prod").flows["survey"].batch_size == 4


def test_flow_level_beats_environment_global_and_global(tmp_path: Path) -> None:
    path = write(tmp_path, FOUR_LEVELS.replace("batch_size = 4", "max_attempts = 9"))
    settings = load(path, env="prod")
    assert settings.flows["survey"].batch_size == 2
    assert settings.flows["survey"].max_attempts == 9


def test_environment_global_beats_global_for_flow_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [global]
        batch_size = 1
        [flows.survey]
        handler = "examples.survey:process"
        [environments.prod.global]
        batch_size = 3
        """,
    )
    assert load(path, env="prod").flows["survey"].batch_size == 3
    assert load(path).flows["survey"].batch_size == 1  # no environment: its levels are ignored


def test_global_beats_default_and_default_applies_last(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [global]
        batch_size = 7
        [flows.survey]
        handler = "examples.survey:process"
        """,
    )
    survey = load(path).flows["survey"]
    assert survey.batch_size == 7
    assert survey.max_attempts == 5
    assert survey.timeout is None and survey.concurrency is None and survey.circuit is None


def test_engine_keys_environment_global_then_global_then_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [global]
        workers = 4
        poll_interval = "3s"
        [environments.prod.global]
        workers = 8
        """,
    )
    engine = load(path, env="prod").engine
    assert engine.workers == 8
    assert engine.poll_interval == 3.0
    assert engine.tick_interval == 1.0
    assert load(path).engine.workers == 4


def test_console_environment_then_base_then_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [console]
        refresh_interval = "5s"
        [environments.prod.console]
        read_only = true
        refresh_interval = "10s"
        [environments.dev.console]
        """,
    )
    assert load(path, env="prod").console.read_only is True
    assert load(path, env="prod").console.refresh_interval == 10.0
    assert load(path, env="dev").console.refresh_interval == 5.0
    assert load(path, env="dev").console.read_only is False


def test_sources_environment_table_refines_base_table(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [sources.crm]
        connection_string = "Driver={x};Server=crm;UID=svc"
        timeout = "30s"
        [environments.prod.sources.crm]
        retries = 3
        timeout = "1m"
        """,
    )
    assert load(path, env="prod").sources["crm"] == {
        "connection_string": "Driver={x};Server=crm;UID=svc",
        "timeout": 60.0,
        "retries": 3,
    }
    assert load(path).sources["crm"] == {"connection_string": "Driver={x};Server=crm;UID=svc", "timeout": 30.0}


def test_backoff_sub_keys_are_looked_up_one_by_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [global]
        backoff = { cap = "5m", jitter = 0.1 }
        [flows.survey]
        handler = "examples.survey:process"
        backoff = { base = "2s" }
        [environments.prod.flows.survey.backoff]
        jitter = 0.5
        """,
    )
    assert load(path, env="prod").flows["survey"].backoff == BackoffPolicy(base=2.0, cap=300.0, jitter=0.5)
    assert load(path).flows["survey"].backoff == BackoffPolicy(base=2.0, cap=300.0, jitter=0.1)


def test_false_disables_optional_keys_set_at_a_less_specific_level(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [global]
        circuit = { failures = 5, cooldown = "30s" }
        timeout = "10s"
        concurrency = 3
        [flows.survey]
        handler = "examples.survey:process"
        circuit = false
        timeout = false
        concurrency = false
        [flows.noop]
        """,
    )
    settings = load(path)
    assert settings.flows["survey"].circuit is None
    assert settings.flows["survey"].timeout is None
    assert settings.flows["survey"].concurrency is None
    assert settings.flows["noop"].circuit == CircuitPolicy(failures=5, cooldown=30.0)
    assert settings.flows["noop"].timeout == 10.0


def test_full_flow_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [flows.survey]
        handler = "examples.survey:process"
        backoff = { base = "2s", cap = "5m", jitter = 0.2 }
        circuit = { failures = 5, cooldown = "30s" }
        permanent_errors = ["KeyError", "examples.survey:BadRecord"]
        on_complete = "examples.survey:report"
        sources = ["crm"]
        [sources.crm]
        connection_string = "Driver={x};Server=crm"
        """,
    )
    survey = load(path).flows["survey"]
    assert survey.handler == "examples.survey:process"
    assert survey.backoff == BackoffPolicy(base=2.0, cap=300.0, jitter=0.2)
    assert survey.circuit == CircuitPolicy(failures=5, cooldown=30.0)
    assert survey.permanent_errors == ("KeyError", "examples.survey:BadRecord")
    assert survey.on_complete == "examples.survey:report"
    assert survey.sources == ("crm",)


# --- environment selection ---------------------------------------------------------------------


ENVS = """
    [global]
    workers = 1
    [environments.development.global]
    workers = 2
    [environments.production.global]
    workers = 3
"""


def test_environment_from_argument(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ENVS), env="production")
    assert (settings.env, settings.engine.workers) == ("production", 3)


def test_environment_from_skiplock_env(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ENVS), environ={"SKIPLOCK_ENV": "development"})
    assert (settings.env, settings.engine.workers) == ("development", 2)


def test_environment_argument_beats_skiplock_env(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ENVS), env="production", environ={"SKIPLOCK_ENV": "development"})
    assert settings.env == "production"


def test_no_environment_uses_base_levels(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ENVS))
    assert (settings.env, settings.engine.workers) == (None, 1)


def test_unknown_environment_names_file_and_declared_ones(tmp_path: Path) -> None:
    path = write(tmp_path, ENVS)
    assert error(path, env="prod") == f"{path}: unknown environment 'prod' (declared: development, production)"
    assert error(path, environ={"SKIPLOCK_ENV": "prod"}) == (
        f"{path}: unknown environment 'prod' selected by SKIPLOCK_ENV (declared: development, production)"
    )


def test_unknown_environment_when_file_has_none(tmp_path: Path) -> None:
    path = write(tmp_path, "[global]\nworkers = 1\n")
    assert error(path, env="development") == (
        f"{path}: unknown environment 'development' (the file declares no environments)"
    )
    assert error(None, env="production") == (
        "unknown environment 'production': no config file is loaded (pass a path or set SKIPLOCK_CONFIG)"
    )


def test_errors_in_an_unselected_environment_are_still_reported(tmp_path: Path) -> None:
    path = write(tmp_path, ENVS + "[environments.staging.global]\nworkers = \"many\"\n")
    assert error(path, env="development") == (
        f'{path}: environments.staging.global.workers must be an integer, got "many"'
    )


# --- the file and defaults ---------------------------------------------------------------------


def test_no_path_and_no_skiplock_config_means_defaults_only() -> None:
    settings = load(None)
    assert settings.path is None and settings.env is None and settings.dsn is None
    assert settings.application_name == "skiplock"
    assert settings.engine.workers == 2 and settings.engine.retention == 7 * 86400.0
    assert settings.sources == {}


def test_path_from_skiplock_config(tmp_path: Path) -> None:
    path = write(tmp_path, "[global]\nworkers = 6\napplication_name = \"etl\"\n")
    settings = load(None, environ={"SKIPLOCK_CONFIG": str(path)})
    assert settings.path == path
    assert (settings.engine.workers, settings.application_name) == (6, "etl")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert error(path) == f"{path}: config file not found"


def test_toml_syntax_error_names_file_and_tomllib_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[global]\nworkers = = 3\n")
    with pytest.raises(tomllib.TOMLDecodeError) as toml_error:
        tomllib.loads("[global]\nworkers = = 3\n")
    assert error(path) == f"{path}: TOML syntax error: {toml_error.value}"


# --- built-in flows ------------------------------------------------------------------------------


def test_builtin_flows_only_when_asked_or_named(tmp_path: Path) -> None:
    assert load(None).flows == {}
    path = write(tmp_path, '[flows.mine]\nhandler = "myapp.jobs:f"\n')
    assert list(load(path).flows) == ["mine"]  # a production file: its own flows, no demo flows
    assert list(load_settings(path, environ={}, builtin_flows=True).flows) == ["mine", "noop", "sleep", "flaky"]


def test_builtin_flows_exist_without_a_file_when_asked() -> None:
    flows = load_settings(None, environ={}, builtin_flows=True).flows
    assert {name: flow.handler for name, flow in flows.items()} == {
        "noop": "engine.flows.builtin:noop",
        "sleep": "engine.flows.builtin:sleep",
        "flaky": "engine.flows.builtin:flaky",
    }
    assert flows["noop"].batch_size == 500
    assert flows["sleep"].batch_size == 100


def test_builtin_flow_refined_by_file_keeps_its_handler(tmp_path: Path) -> None:
    path = write(tmp_path, "[flows.noop]\nmax_attempts = 2\n[flows.sleep]\nbatch_size = 7\n")
    flows = load(path).flows
    assert flows["noop"].handler == "engine.flows.builtin:noop"
    assert (flows["noop"].batch_size, flows["noop"].max_attempts) == (500, 2)
    assert flows["sleep"].batch_size == 7


def test_builtin_flow_redeclared_with_own_handler_and_batch_size(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows.noop]\nhandler = "mine.flows:noop"\nbatch_size = 5\n')
    noop = load(path).flows["noop"]
    assert (noop.handler, noop.batch_size) == ("mine.flows:noop", 5)


def test_flow_without_handler_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[flows.survey]\nbatch_size = 5\n")
    assert error(path) == f'{path}: flows.survey has no handler; add handler = "module:function"'


def test_bad_handler_string(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows.survey]\nhandler = "examples.survey.process"\n')
    assert error(path) == (
        f'{path}: flows.survey.handler must look like "module:function", got "examples.survey.process"'
    )


def test_bad_flow_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows."bad name"]\nhandler = "a:b"\n')
    assert error(path) == (
        f"{path}: flows.\"bad name\": a flow name must be 1-63 characters of letters, digits, '_', '.' "
        "or '-', starting with a letter or digit"
    )


# --- environment variable overrides -------------------------------------------------------------


SURVEY = """
    [global]
    workers = 2
    [flows.survey]
    handler = "examples.survey:process"
    batch_size = 10
    [environments.production.global]
    workers = 4
"""


def test_override_int(tmp_path: Path) -> None:
    settings = load(write(tmp_path, SURVEY), environ={"SKIPLOCK__GLOBAL__WORKERS": "8"})
    assert settings.engine.workers == 8


def test_override_duration_bare_and_quoted(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    bare = load(path, environ={"SKIPLOCK__GLOBAL__HEARTBEAT_INTERVAL": "2s"})
    quoted = load(path, environ={"SKIPLOCK__GLOBAL__HEARTBEAT_INTERVAL": '"250ms"'})
    assert (bare.engine.heartbeat_interval, quoted.engine.heartbeat_interval) == (2.0, 0.25)


def test_override_flow_key_matches_flow_name_case_insensitively(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY.replace("flows.survey", "flows.Survey"))
    settings = load(path, environ={"SKIPLOCK__FLOWS__SURVEY__BATCH_SIZE": "1000"})
    assert settings.flows["Survey"].batch_size == 1000


def test_override_builtin_flow_not_in_file() -> None:
    noop = load_settings(None, environ={"SKIPLOCK__FLOWS__NOOP__MAX_ATTEMPTS": "9"}, builtin_flows=True).flows["noop"]
    assert (noop.handler, noop.batch_size, noop.max_attempts) == ("engine.flows.builtin:noop", 500, 9)


def test_override_environment_level(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    environ = {"SKIPLOCK__ENVIRONMENTS__PRODUCTION__GLOBAL__WORKERS": "3"}
    assert load(path, env="production", environ=environ).engine.workers == 3
    assert load(path, environ=environ).engine.workers == 2


def test_override_replaces_the_value_at_its_own_level_only(tmp_path: Path) -> None:
    # SKIPLOCK__GLOBAL__WORKERS sets global.workers; the environment's own value still wins over it.
    path = write(tmp_path, SURVEY)
    assert load(path, env="production", environ={"SKIPLOCK__GLOBAL__WORKERS": "8"}).engine.workers == 4


def test_override_sub_key_and_whole_table(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY + '[flows.survey.backoff]\ncap = "1m"\n')
    environ = {
        "SKIPLOCK__FLOWS__SURVEY__BACKOFF__BASE": "3s",
        "SKIPLOCK__GLOBAL__CIRCUIT": '{failures = 2, cooldown = "5s"}',
    }
    survey = load(path, environ=environ).flows["survey"]
    assert survey.backoff == BackoffPolicy(base=3.0, cap=60.0, jitter=0.2)
    assert survey.circuit == CircuitPolicy(failures=2, cooldown=5.0)


def test_override_values_are_toml_when_they_parse(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    environ = {
        "SKIPLOCK__CONSOLE__READ_ONLY": "true",
        "SKIPLOCK__FLOWS__SURVEY__PERMANENT_ERRORS": '["KeyError"]',
        "SKIPLOCK__GLOBAL__APPLICATION_NAME": "etl-7",
    }
    settings = load(path, environ=environ)
    assert settings.console.read_only is True
    assert settings.flows["survey"].permanent_errors == ("KeyError",)
    assert settings.application_name == "etl-7"


def test_override_value_cannot_smuggle_other_keys(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    settings = load(path, environ={"SKIPLOCK__GLOBAL__APPLICATION_NAME": '"x"\nworkers = 9'})
    assert settings.application_name == '"x"\nworkers = 9'
    assert settings.engine.workers == 2


def test_override_unknown_key_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    assert error(path, environ={"SKIPLOCK__GLOBAL__WOKERS": "8"}) == (
        "SKIPLOCK__GLOBAL__WOKERS: unknown key 'global.wokers' (did you mean 'global.workers'?)"
    )
    assert error(path, environ={"SKIPLOCK__FLOWS__SURVY__BATCH_SIZE": "8"}) == (
        "SKIPLOCK__FLOWS__SURVY__BATCH_SIZE: unknown key 'flows.survy' "
        "(no flow 'survy' is declared; did you mean 'survey'?)"
    )
    assert error(path, environ={"SKIPLOCK__ENVIRONMENTS__STAGING__GLOBAL__WORKERS": "8"}) == (
        "SKIPLOCK__ENVIRONMENTS__STAGING__GLOBAL__WORKERS: unknown key 'environments.staging' "
        "(no environment 'staging' is declared)"
    )
    assert error(path, environ={"SKIPLOCK__GLOBAL": "8"}) == (
        "SKIPLOCK__GLOBAL: names the table 'global', not a key in it"
    )
    assert error(path, environ={"SKIPLOCK__GLOBAL__WORKERS__MAX": "8"}) == (
        "SKIPLOCK__GLOBAL__WORKERS__MAX: unknown key 'global.workers.max'"
    )


def test_override_bad_value_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    assert error(path, environ={"SKIPLOCK__FLOWS__SURVEY__BATCH_SIZE": "ten"}) == (
        'SKIPLOCK__FLOWS__SURVEY__BATCH_SIZE: flows.survey.batch_size must be an integer, got "ten"'
    )


def test_dsn_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, '[global]\ndsn = "postgresql://skiplock@db/skiplock"\n')
    assert load(path).dsn == "postgresql://skiplock@db/skiplock"
    from_env = {"SKIPLOCK_DSN": "postgresql://u:secret@other/db"}
    assert load(path, environ=from_env).dsn == "postgresql://u:secret@other/db"
    assert load(path, environ=from_env, dsn="host=third").dsn == "host=third"
    assert load(None, environ={"SKIPLOCK_DSN": ""}).dsn is None


def test_password_in_dsn_from_the_environment_is_fine(tmp_path: Path) -> None:
    path = write(tmp_path, SURVEY)
    environ = {"SKIPLOCK__GLOBAL__DSN": "postgresql://u:secret@db/x"}
    assert load(path, environ=environ).dsn == "postgresql://u:secret@db/x"


# --- error messages ------------------------------------------------------------------------------


def test_unknown_key_with_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, "[global]\nwokers = 4\n")
    assert error(path) == f"{path}: unknown key 'global.wokers' (did you mean 'global.workers'?)"


def test_unknown_nested_flow_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows.survey]\nhandler = "a:b"\nbatch_sise = 4\n')
    assert error(path) == f"{path}: unknown key 'flows.survey.batch_sise' (did you mean 'flows.survey.batch_size'?)"
    path = write(tmp_path, '[flows.survey]\nhandler = "a:b"\nbackoff = { bse = "1s" }\n')
    assert error(path) == (
        f"{path}: unknown key 'flows.survey.backoff.bse' (did you mean 'flows.survey.backoff.base'?)"
    )


def test_unknown_section_and_misplaced_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[flow.survey]\nhandler = \"a:b\"\n")
    assert error(path) == f"{path}: unknown key 'flow' (did you mean 'flows'?)"
    path = write(tmp_path, "[flows.noop]\nworkers = 3\n")
    assert error(path) == f"{path}: unknown key 'flows.noop.workers' ('workers' belongs in [global])"
    path = write(tmp_path, "[environments.prod.console]\nworkers = 3\n")
    assert error(path) == (
        f"{path}: unknown key 'environments.prod.console.workers' "
        "('workers' belongs in [environments.prod.global])"
    )


def test_environment_may_only_refine_declared_flows(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows.survey]\nhandler = "a:b"\n[environments.prod.flows.survy]\nbatch_size = 1\n')
    assert error(path) == (
        f"{path}: unknown key 'environments.prod.flows.survy' (no flow 'survy' is declared; did you mean 'survey'?)"
    )


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, '[flows.noop]\nbatch_size = "ten"\n')
    assert error(path) == f'{path}: flows.noop.batch_size must be an integer, got "ten"'
    path = write(tmp_path, "[global]\nworkers = true\n")
    assert error(path) == f"{path}: global.workers must be an integer, got true"
    path = write(tmp_path, "[global]\nbackoff = 3\n")
    assert error(path) == f"{path}: global.backoff must be a table, got 3"
    path = write(tmp_path, "global = 3\n")
    assert error(path) == f"{path}: global must be a table, got 3"


def test_bad_duration(tmp_path: Path) -> None:
    path = write(tmp_path, '[global]\nheartbeat_interval = "5 parsecs"\n')
    assert error(path) == (
        f'{path}: global.heartbeat_interval: bad duration "5 parsecs" (use 250ms, 5s, 2m, 1h, 1d or seconds)'
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[global]\nbatch_size = 0\n", "global.batch_size must be at least 1, got 0"),
        ("[flows.noop]\nmax_attempts = 0\n", "flows.noop.max_attempts must be at least 1, got 0"),
        ("[global]\nworkers = 0\n", "global.workers must be at least 1, got 0"),
        ("[global]\nbackoff = { jitter = 1.5 }\n", "global.backoff.jitter must be between 0 and 1, got 1.5"),
        ("[global]\nconcurrency = 0\n", "global.concurrency must be at least 1, got 0"),
        ("[global]\nheartbeat_interval = \"0s\"\n", 'global.heartbeat_interval must be greater than 0, got "0s"'),
        ('[global]\nlog_format = "xml"\n', 'global.log_format must be one of auto, json, text, got "xml"'),
        (
            '[global]\nheartbeat_interval = "30s"\nstale_after = "30s"\n',
            "global.stale_after must be greater than global.heartbeat_interval (30 vs 30)",
        ),
        (
            '[global]\nheartbeat_interval = "1m"\n',
            "stale_after (default) must be greater than global.heartbeat_interval (30 vs 60)",
        ),
        ("[global]\npool_min = 5\npool_max = 2\n", "global.pool_max must be at least global.pool_min (2 vs 5)"),
        (
            '[flows.noop]\nbackoff = { base = "10m", cap = "1m" }\n',
            "flows.noop.backoff.cap must be at least flows.noop.backoff.base (60s vs 600s)",
        ),
        (
            "[flows.noop]\ncircuit = { failures = 3 }\n",
            "flows.noop.circuit.cooldown is required when the circuit is set",
        ),
    ],
)
def test_out_of_range(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    assert error(path) == f"{path}: {message}"


def test_stale_after_checked_against_the_selected_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[global]\nstale_after = "20s"\n[environments.prod.global]\nheartbeat_interval = "20s"\n')
    assert load(path).engine.stale_after == 20.0
    assert error(path, env="prod") == (
        f"{path}: global.stale_after must be greater than environments.prod.global.heartbeat_interval (20 vs 20)"
    )


def test_stale_after_must_cover_three_heartbeats(tmp_path: Path) -> None:
    """A worker's lease (stale_after - margin) must outlast two renewals (engine/liveness.py)."""
    path = write(tmp_path, '[global]\nheartbeat_interval = "5s"\nstale_after = "10s"\n')
    assert error(path) == f"{path}: global.stale_after must be at least 3 x global.heartbeat_interval (10 vs 5)"
    path = write(tmp_path, '[global]\nheartbeat_interval = "5s"\nstale_after = "15s"\n')
    assert load(path).engine.stale_after == 15.0


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dsn",
    ["postgresql://skiplock:hunter2@db/skiplock", "host=db user=skiplock password=hunter2 dbname=skiplock"],
)
def test_password_in_dsn_rejected(tmp_path: Path, dsn: str) -> None:
    path = write(tmp_path, f'[global]\ndsn = "{dsn}"\n')
    assert error(path) == (
        f"{path}: global.dsn must not contain a password; put it in SKIPLOCK_DSN or PGPASSWORD"
    )


def test_password_in_environment_dsn_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[environments.prod.global]\ndsn = "postgresql://u:pw@db/x"\n')
    assert error(path) == (
        f"{path}: environments.prod.global.dsn must not contain a password; put it in SKIPLOCK_DSN or PGPASSWORD"
    )


def test_password_in_connection_string_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, '[sources.crm]\nconnection_string = "Driver={x};Server=crm;UID=svc;Password=hunter2"\n')
    assert error(path) == (
        f"{path}: sources.crm.connection_string must not contain a password; reference an environment "
        "variable instead, e.g. PWD=${SOURCE_PASSWORD}"
    )


def test_connection_string_variables_are_expanded(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[sources.crm]\nconnection_string = "Driver={x};Server=${CRM_HOST};UID=svc;PWD={${CRM_PASSWORD}}"\n',
    )
    environ = {"CRM_HOST": "crm.internal", "CRM_PASSWORD": "hunter2"}
    assert load(path, environ=environ).sources["crm"]["connection_string"] == (
        "Driver={x};Server=crm.internal;UID=svc;PWD={hunter2}"
    )


def test_connection_string_missing_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[sources.crm]\nconnection_string = "Driver={x};UID=svc;PWD=${CRM_PASSWORD}"\n')
    assert error(path, environ={}) == (
        f"{path}: sources.crm.connection_string uses ${{CRM_PASSWORD}}, but CRM_PASSWORD is not set in the environment"
    )


def test_flow_sources_must_be_declared(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[flows.survey]\nhandler = "a:b"\nsources = ["crn"]\n[sources.crm]\nconnection_string = "Server=x"\n',
    )
    assert error(path) == f"{path}: flows.survey.sources names an unknown source 'crn' (declared: crm)"


@pytest.mark.parametrize(
    ("dsn", "redacted"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        ("postgres://u:s%40cret@h:5432/db?sslmode=require", "postgres://u:***@h:5432/db?sslmode=require"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql:///db?host=/tmp&password=secret&user=u", "postgresql:///db?host=/tmp&password=***&user=u"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = 'se cret' dbname=d", "host=h password = *** dbname=d"),
        (
            "Driver={ODBC Driver 18};Server=h;UID=u;PWD=secret;Database=d",
            "Driver={ODBC Driver 18};Server=h;UID=u;PWD=***;Database=d",
        ),
        ("Server=h;User Id=u;Password={se;cr}}et};Encrypt=yes", "Server=h;User Id=u;Password=***;Encrypt=yes"),
    ],
)
def test_redact_dsn(dsn: str, redacted: str) -> None:
    assert redact_dsn(dsn) == redacted


# --- the repository's own config.toml ------------------------------------------------------------


def test_repo_config_loads_for_every_environment() -> None:
    declared = tomllib.loads(REPO_CONFIG.read_text(encoding="utf-8")).get("environments", {})
    assert {"development", "production"} <= set(declared)
    for env in [None, *declared]:
        settings = load_settings(REPO_CONFIG, env=env, environ={})
        assert settings.env == env
        assert settings.dsn is None  # embedded PostgreSQL unless told otherwise
        assert {"noop", "sleep", "flaky"} <= set(settings.flows)


def test_repo_config_loads_from_its_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_CONFIG.parent)
    assert load_settings("config.toml", env="production", environ={}).path == Path("config.toml")


# --- durations and backoff -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1d", 86400.0),
        ("1.5s", 1.5), (7, 7.0), (0.5, 0.5), ("3", 3.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, "x") == seconds


@pytest.mark.parametrize("value", ["5 parsecs", "-5s", "", "1h30m", True, [1], float("inf")])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^here: bad duration "):
        parse_duration(value, "here")


def test_parse_duration_rejects_negative_numbers() -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(-1, "here")
    assert str(info.value) == "here: duration must not be negative, got -1"


def test_backoff_delay_grows_then_caps() -> None:
    policy = BackoffPolicy(base=1.0, cap=60.0, jitter=0.0)
    assert [policy.delay(n, 0.5) for n in (1, 2, 3, 4, 7, 8, 100, 10_000)] == [1, 2, 4, 8, 60, 60, 60, 60]


def test_backoff_delay_jitter_range() -> None:
    policy = BackoffPolicy(base=2.0, cap=300.0, jitter=0.2)
    assert policy.delay(3, 0.0) == pytest.approx(8.0 * 0.8)
    assert policy.delay(3, 0.5) == pytest.approx(8.0)
    assert policy.delay(3, 0.999999) == pytest.approx(8.0 * 1.2, rel=1e-5)
    for rand in (0.0, 0.25, 0.5, 0.75, 0.999999):
        assert 300.0 * 0.8 <= policy.delay(50, rand) < 300.0 * 1.2


# ---------------------------------------------------------------------------------------------
# Each key declared once: the dataclass field's metadata drives the tables, the readers and the policy


def test_every_key_has_help_and_is_documented() -> None:
    import dataclasses

    from engine.config import ConsoleConfig, EngineConfig, FlowConfig

    docs = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    for cls in (Settings, EngineConfig, FlowConfig, BackoffPolicy, CircuitPolicy, ConsoleConfig):
        for f in dataclasses.fields(cls):
            if "key" in f.metadata:
                assert f.metadata["key"].help, f"{cls.__name__}.{f.name} has no help"
                assert f"`{f.name}`" in docs or f"{f.name} =" in docs, f"{f.name} is not in docs/configuration.md"


def test_recorded_policy_is_what_engines_store(tmp_path: Path) -> None:
    from engine.config import recorded_policy

    path = write(tmp_path, """
        [flows.s]
        handler = "m:f"
        batch_size = 7
        timeout = "2s"
        circuit = { failures = 3, cooldown = "1m" }
        backoff = { base = "2s" }
    """)
    flow = load_settings(path, environ={}).flows["s"]
    assert recorded_policy(flow) == {
        "batch_size": 7, "max_attempts": 5, "backoff": {"base": 2.0, "cap": 300.0, "jitter": 0.2},
        "timeout": 2.0, "concurrency": None, "circuit": {"failures": 3, "cooldown": 60.0},
        "concurrency_per_worker": None, "batch": False, "next": None, "on_complete_repeat": False,
        "rate_limit": None, "rate_burst": None, "concurrency_key": None, "concurrency_per_key": None}


# ---------------------------------------------------------------------------------------------
# Values that used to load and break later (issue 11 item 5): refused at load, naming the key


@pytest.mark.parametrize(("body", "message"), [
    ("[global]\nconcurrency = 3000000000", "global.concurrency must be at most 2147483647, got 3000000000"),
    ("[global]\nmax_attempts = 3000000000", "global.max_attempts must be at most 2147483647, got 3000000000"),
    ("[global]\nbatch_size = 3000000000", "global.batch_size must be at most 2147483647, got 3000000000"),
    ("[global]\nworkers = 100000", "global.workers must be at most 1024, got 100000"),
    ("[global]\npool_max = 100000", "global.pool_max must be at most 1000, got 100000"),
    ('[global]\ntimeout = "999999999d"',
     'global.timeout: duration must be at most 36500d (100 years), got "999999999d"'),
    ('[global]\nretention = "36500000d"',
     'global.retention: duration must be at most 36500d (100 years), got "36500000d"'),
    ("[global]\nbackoff = { base = 1e300, cap = 1e301 }",
     "global.backoff.base: duration must be at most 36500d (100 years), got 1e+300"),
    ('[global]\ncircuit = { failures = 5000000000, cooldown = "1s" }',
     "global.circuit.failures must be at most 2147483647, got 5000000000"),
])
def test_values_beyond_what_postgres_and_the_os_take(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body + "\n")
    assert error(path) == f"{path}: {message}"


def test_deeply_nested_override_is_not_a_recursion_error() -> None:
    deep = "[" * 5000 + "]" * 5000
    assert error(None, environ={"SKIPLOCK__GLOBAL__WORKERS": deep}) == (
        f"SKIPLOCK__GLOBAL__WORKERS: global.workers must be an integer, got {json.dumps(deep)}")
