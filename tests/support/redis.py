"""A real redis-server for tests, on a free loopback port (cluster/redis_server.py).

Use it by importing the fixture into a test module (or list this module in `pytest_plugins`):

    from tests.support.redis import redis_url  # noqa: F401  (pytest fixture)

    def test_something(redis_url): ...
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from cluster.redis_server import RedisServer


def _running_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH: install it (`make setup` does, or "
                    "`apt-get install redis-server`); integration tests need a real Redis")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server for one test; stopped afterwards."""
    yield from _running_server()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The URL (redis://127.0.0.1:PORT/0) of a fresh redis-server for one test."""
    for server in _running_server():
        yield server.url
