"""Real servers for tests: the App on its own event loop in a thread, or `lstmserve` as a subprocess."""

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from server.main import App
from server.settings import Settings


@dataclasses.dataclass
class RunningServer:
    app: App
    loop: asyncio.AbstractEventLoop

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    def call(self, coroutine, timeout: float = 30):
        """Runs a coroutine on the server's loop (e.g. to inspect the engine) and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


@contextlib.contextmanager
def server_in_thread(model_path, **overrides) -> Iterator[RunningServer]:
    """Starts the real gRPC server on 127.0.0.1 with a free port; stops it on exit."""
    settings = dataclasses.replace(Settings(), model_path=str(model_path), port=0, metrics_port=0,
                                   shutdown_grace=5.0, **overrides)
    app = App(settings, CollectorRegistry())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-server", daemon=True)
    thread.start()
    server = RunningServer(app, loop)
    try:
        server.call(app.start(), timeout=120)
        yield server
    finally:
        server.call(app.stop(), timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()


@contextlib.contextmanager
def server_process(model_path, log_path, *flags: str, timeout: float = 120) -> Iterator[ServerProcess]:
    """Runs `lstmserve` as a child process on a free port; kills only that PID if it outlives the test."""
    command = [sys.executable, "-m", "server.main", "--model-path", str(model_path), "--port", "0",
               "--metrics-port", "-1", *flags]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        yield ServerProcess(process, _wait_for_port(process, log_path, timeout), str(log_path))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(10)


def _wait_for_port(process: subprocess.Popen, log_path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            match = re.search(r"serving model .* on 127\.0\.0\.1:(\d+)", f.read())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{open(log_path).read()}")
        time.sleep(0.1)
    raise TimeoutError(f"server did not start within {timeout}s:\n{open(log_path).read()}")
