"""Every setting is a flag and an LSTMSERVE_* variable; flags win; bounds are enforced."""

import pytest

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
    limits = Settings.from_args(["--max-batch-size", "8", "--max-sessions", "10"], environ={}).engine_limits()
    assert (limits.max_batch_size, limits.max_sessions) == (8, 10)


@pytest.mark.parametrize("argv, env", [
    (["--max-batch-size", "0"], {}),
    ([], {"LSTMSERVE_PORT": "not-a-port"}),
    ([], {"LSTMSERVE_ALLOW_NONFINITE": "maybe"}),
])
def test_invalid_values_stop_start_up(argv, env):
    with pytest.raises(SystemExit):
        Settings.from_args(argv, environ=env)
