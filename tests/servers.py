"""The real server in the test process: the App on its own event loop in a thread.

`lstmserve` as a child process is `server.testing.processes.lstmserve_process`, shared with bench/.
"""

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from server.app import App
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
