"""Every setting is a flag and an LSTMSERVE_* variable; flags win; bounds are enforced."""

import dataclasses
import gc
import subprocess
import sys

import pytest

from server.app import engine_limits
from server.main import settle_heap
from server.policies import Durability, EventLoop, FullPolicy
from server.settings import Settings

pytestmark = pytest.mark.unit


def test_defaults_listen_on_loopback_with_the_documented_ports():
    s = Settings.from_args([], environ={})
    assert (s.host, s.port, s.metrics_port) == ("127.0.0.1", 50051, 9090)


def test_environment_sets_values_and_flags_override_it():
    env = {"LSTMSERVE_MAX_BATCH_SIZE": "32", "LSTMSERVE_IDLE_TIMEOUT": "5", "LSTMSERVE_ALLOW_NONFINITE": "true"}
    s = Settings.from_args(["--idle-timeout", "7.5"], environ=env)
    assert (s.max_batch_size, s.idle_timeout, s.allow_nonfinite) == (32, 7.5, True)


def test_engine_limits_come_from_the_settings():
    limits = engine_limits(Settings.from_args(["--max-batch-size", "8", "--max-sessions", "10"], environ={}))
    assert (limits.max_batch_size, limits.max_sessions) == (8, 10)
    assert limits.full_policy is FullPolicy.REFUSE


def test_choices_are_parsed_into_their_enums_from_flags_variables_and_keywords():
    s = Settings.from_args(["--full-policy", "evict"], environ={"LSTMSERVE_DURABILITY": "checkpoint"})
    assert (s.full_policy, s.durability) == (FullPolicy.EVICT, Durability.CHECKPOINT)
    assert type(s.full_policy) is FullPolicy and type(s.durability) is Durability
    assert Settings(durability="none").durability is Durability.NONE
    assert Settings().durability is Durability.EVERY_STEP


@pytest.mark.parametrize("argv, env, choices", [
    (["--full-policy", "drop"], {}, FullPolicy),
    ([], {"LSTMSERVE_DURABILITY": "always"}, Durability),
])
def test_an_unknown_choice_stops_start_up_naming_the_choices(argv, env, choices, capsys):
    with pytest.raises(SystemExit):
        Settings.from_args(argv, environ=env)
    error = capsys.readouterr().err
    assert all(choice in error for choice in choices), error


def test_the_settings_do_not_import_the_engine():
    imported = subprocess.run([sys.executable, "-c", "import sys, server.settings; print(sorted(sys.modules))"],
                              capture_output=True, text=True, check=True).stdout
    assert "server.engine" not in imported and "torch" not in imported


def test_max_batch_entries_is_a_flag_and_a_variable_with_a_default():
    env = {"LSTMSERVE_MAX_BATCH_ENTRIES": "100"}
    assert Settings.from_args([], environ={}).max_batch_entries == 4096
    assert Settings.from_args([], environ=env).max_batch_entries == 100
    assert Settings.from_args(["--max-batch-entries", "7"], environ=env).max_batch_entries == 7


@pytest.mark.parametrize("argv, env", [
    (["--max-batch-size", "0"], {}),
    (["--max-batch-entries", "0"], {}),
    ([], {"LSTMSERVE_PORT": "not-a-port"}),
    ([], {"LSTMSERVE_ALLOW_NONFINITE": "maybe"}),
    (["--idle-timeout", "nan"], {}),  # NaN is at least nothing, and no less than anything either
    ([], {"LSTMSERVE_RATE_LIMIT": "nan"}),
    (["--log-level", "verbose"], {}),  # else logging.basicConfig's ValueError, a traceback at start-up
    (["--port", "70000"], {}),  # else gRPC listened on port 4464 (70000 - 65536)
    ([], {"LSTMSERVE_METRICS_PORT": "65536"}),
    ([], {"LSTMSERVE_MAX_MESSAGE_BYTES": str(2**31)}),  # a C int to gRPC: else OverflowError at start-up
])
def test_invalid_values_stop_start_up(argv, env):
    with pytest.raises(SystemExit):
        Settings.from_args(argv, environ=env)


def test_tracing_is_off_by_default_and_its_endpoint_is_a_flag_and_a_variable():
    assert Settings.from_args([], environ={}).otlp_endpoint == ""
    env = {"LSTMSERVE_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert Settings.from_args([], environ=env).otlp_endpoint == "http://127.0.0.1:4317"
    assert Settings.from_args(["--otlp-endpoint", "https://collector:4317"], environ=env).otlp_endpoint == \
        "https://collector:4317"


def test_an_otlp_endpoint_without_its_scheme_stops_start_up_saying_which_to_write(capsys):
    with pytest.raises(SystemExit):
        Settings.from_args(["--otlp-endpoint", "127.0.0.1:4317"], environ={})
    error = capsys.readouterr().err
    assert "http://host:port for plaintext" in error and "https://host:port for TLS" in error, error


def test_the_heap_is_settled_as_the_gc_settings_say():
    before = gc.get_threshold()
    try:
        settle_heap(Settings(gc_threshold=1234, gc_freeze=True))
        assert gc.get_threshold() == (1234, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_event_loop_is_uvloop_unless_asyncio_is_chosen():
    assert Settings.from_args([], environ={}).event_loop is EventLoop.UVLOOP
    assert Settings.from_args(["--event-loop", "asyncio"], environ={}).event_loop is EventLoop.ASYNCIO


def test_help_lists_every_setting_with_its_variable(capsys):
    with pytest.raises(SystemExit) as stopped:
        Settings.from_args(["--help"], environ={})
    assert stopped.value.code == 0
    described = capsys.readouterr().out
    for field in dataclasses.fields(Settings):
        assert f"--{field.name.replace('_', '-')}" in described and f"LSTMSERVE_{field.name.upper()}" in described
