"""An embedded `redis-server` on a free loopback port, for `baton serve` without --redis-url and
for tests.

Lifecycle: start() picks a free port, launches redis-server with no persistence in a temporary
directory and waits until it answers PING; stop() terminates it (SIGTERM, wait, then SIGKILL) and
removes the directory. On Linux the server also gets SIGTERM when the thread that started it ends
(PR_SET_PDEATHSIG), so a killed launcher leaves no redis-server behind: call start() from a thread
that outlives the server (the main thread). The server runs in a session of its own, so a
terminal's Ctrl-C reaches only the launcher, which then stops it in order. Use it as a context
manager:

    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (another process may still take it; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True if a Redis server at host:port answers PING (plain RESP, no client library)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def server_pid(host: str, port: int, timeout_s: float = 0.5) -> int | None:
    """The process id of the Redis server at host:port (INFO server), None if none answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.split(b":", 1)[1])
    return None


def _pdeathsig_prefix() -> list[str]:
    """A command prefix asking Linux to SIGTERM the server when its parent dies: util-linux's
    `setpriv --pdeathsig`, which sets it and execs the server (same pid). [] where there is none.

    Not a preexec_fn: Python code between fork and exec in a process that runs threads (gRPC,
    torch, the router) can deadlock or abort the child.
    """
    if not sys.platform.startswith("linux"):
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class RedisServer:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        executable: str = "redis-server",
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port  # None = a free port, chosen at start()
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the Redis server has not been started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        binary = shutil.which(self.executable)
        if binary is None:
            raise RedisServerError(
                f"{self.executable!r} is not installed or not on PATH. Install it "
                "(Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`), "
                "or point Baton at a running Redis with --redis-url redis://HOST:PORT"
            )
        fixed_port = self.port is not None
        last_error = ""
        for _ in range(1 if fixed_port else 3):  # a free port can be taken before redis binds it
            port = self.port if fixed_port else free_port(self.host)
            error = self._try_start(binary, port)
            if error is None:
                self.port = port
                log.info("redis-server pid %d listening on %s", self._process.pid, self.url)
                return
            last_error = error
        raise RedisServerError(f"redis-server did not start on {self.host}: {last_error}")

    def _try_start(self, binary: str, port: int) -> str | None:
        self._dir = Path(tempfile.mkdtemp(prefix="baton-redis-"))
        log_path = self._dir / "redis.log"
        cmd = [
            *_pdeathsig_prefix(), binary, "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
            "--dir", str(self._dir), "--logfile", str(log_path), "--daemonize", "no",
        ]
        self._process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C goes to the launcher, which stops us
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            # Ours, not another server that already held the port.
            if server_pid(self.host, port) == self._process.pid:
                return None
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        exited = self._process.poll()
        self._cleanup()
        status = f"exited with code {exited}" if exited is not None else (
            f"no PING answer within {self.startup_timeout_s:.0f} s"
        )
        return f"port {port}: {status}. Its log:\n{tail}"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM; killing it", self._process.pid)
                self._process.kill()
                self._process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten stop() must not leave a server behind
        if getattr(self, "_process", None) is not None:
            self._cleanup()
