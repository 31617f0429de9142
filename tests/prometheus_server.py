"""A real Prometheus for tests, listening on a loopback port it picks, its data in a temporary directory."""

import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from server.testing.processes import wait_for_log


class PrometheusError(Exception):
    """Prometheus's HTTP API answered with an error."""


@dataclasses.dataclass
class PrometheusServer:
    url: str
    log_path: Path

    def api(self, path: str, **params) -> dict | list:
        """The `data` of the HTTP API's answer at `/api/v1/{path}`; PrometheusError when it is an error."""
        address = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(address, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body["status"] != "success":
            raise PrometheusError(f"{path} {params}: {body['errorType']}: {body['error']}")
        return body["data"]

    def query(self, expression: str, at: float) -> list[dict]:
        """An instant query's result (a vector's samples) at unix time `at`."""
        return self.api("query", query=expression, time=f"{at:.3f}")["result"]

    def wait_for(self, condition, what: str, timeout: float = 30):
        """Polls `condition()` until it returns something true, and returns that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.2)
        raise TimeoutError(f"Prometheus: {what} within {timeout}s; its log:\n{self.log_path.read_text()}")


@contextlib.contextmanager
def prometheus_server(config: Path, directory: Path, timeout: float = 30) -> Iterator[PrometheusServer]:
    """Runs `prometheus` with `config` until ready; terminates that PID on exit."""
    executable = shutil.which("prometheus")
    if executable is None:
        raise RuntimeError("prometheus is not installed; `make test` installs it with apt-get")
    log_path = directory / "prometheus.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [executable, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             "--web.listen-address=127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        # Prometheus logs the port it was given (0) and then the one it listens on.
        listening = wait_for_log(process, log_path, r'msg="Listening on" address=(127\.0\.0\.1:\d+)', timeout)
        server = PrometheusServer(f"http://{listening.group(1)}", log_path)
        server.wait_for(lambda: _ready(server.url), "ready", timeout)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False
