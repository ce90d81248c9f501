"""The embedded redis-server: starts on a free port, answers, stops without leaving a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import redis

from cluster.redis_server import RedisServer, RedisServerError, free_port, ping
from tests.support.redis import redis_url  # noqa: F401  (pytest fixture)

pytestmark = pytest.mark.integration


def test_start_ping_stop():
    server = RedisServer()
    server.start()
    try:
        assert server.url.startswith("redis://127.0.0.1:")
        pid = server.pid
        assert psutil.pid_exists(pid)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("k", "v")
        assert client.get("k") == b"v"
        client.close()
        assert ping("127.0.0.1", server.port)
    finally:
        server.stop()
    assert not server.is_running()
    assert not ping("127.0.0.1", server.port)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_no_persistence_no_files_left():
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        data_dir = client.config_get("dir")["dir"]
        assert os.path.isdir(data_dir)
        client.close()
    assert not os.path.exists(data_dir)


def test_two_servers_get_different_ports():
    with RedisServer() as a, RedisServer() as b:
        assert a.port != b.port
        assert ping("127.0.0.1", a.port) and ping("127.0.0.1", b.port)


def test_stop_twice_is_harmless():
    server = RedisServer()
    server.start()
    server.stop()
    server.stop()


def test_missing_binary_says_how_to_install():
    with pytest.raises(RedisServerError) as err:
        RedisServer(executable="redis-server-that-does-not-exist").start()
    assert "apt-get install redis-server" in str(err.value)
    assert "--redis-url" in str(err.value)


def test_port_in_use_reports_the_log():
    with RedisServer() as first, pytest.raises(RedisServerError) as err:
        RedisServer(port=first.port, startup_timeout_s=3).start()
    assert f"port {first.port}" in str(err.value)


def test_ping_of_nothing_is_false():
    assert not ping("127.0.0.1", free_port(), timeout_s=0.2)


def test_fixture_gives_a_live_server(redis_url):  # noqa: F811
    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.dbsize() == 0
    client.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_server_dies_with_a_killed_parent():
    """A launcher killed with SIGKILL (no chance to clean up) still leaves no redis-server."""
    script = textwrap.dedent("""
        import sys, time
        from cluster.redis_server import RedisServer
        server = RedisServer(); server.start()
        print(server.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        redis_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(redis_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(redis_pid)
    finally:
        parent.kill()
        parent.wait()
