"""Engine limits for tests that build an Engine themselves: the settings' defaults, changed where a test says."""

from server.app import engine_limits
from server.engine import EngineLimits
from server.settings import Settings


def limits_with(**changes) -> EngineLimits:
    return engine_limits(Settings(**changes))
