"""A real redis-server per test module, for the state store tests."""

import pytest

from server.testing.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url
