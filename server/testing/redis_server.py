"""A real redis-server for tests and benchmarks, on a unix socket in a temporary directory (no port to pick)."""

import contextlib
import dataclasses
import shutil
import subprocess
import time
from pathlib import Path

import redis


@dataclasses.dataclass
class RedisServer:
    socket: Path
    appendonly: bool = False  # keep data across restarts
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed; `make test` installs it with apt-get")
        self.process = subprocess.Popen(
            [executable, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.socket.parent)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(unix_socket_path=str(self.socket)).ping():
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@contextlib.contextmanager
def redis_server(directory: Path, appendonly: bool = False):
    server = RedisServer(directory / "redis.sock", appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()
