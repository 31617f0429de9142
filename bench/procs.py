"""The processes under test: the real `lstmserve` and the echo server, each a child on a loopback port."""

import contextlib
import dataclasses
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


@dataclasses.dataclass
class Child:
    process: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        """Resident memory of the process now, from /proc (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def metric(self, name: str) -> float:
        """The sum of every sample of a Prometheus metric (all label sets) from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


@contextlib.contextmanager
def child(command: list[str], log_path: Path, pattern: str, timeout: float = 180) -> Iterator[Child]:
    """Starts `command` and waits for `pattern` (groups: port, metrics port) in its log; kills it on exit."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        match = _wait_for(process, log_path, pattern, timeout)
        metrics = match.group(2) if match.re.groups > 1 else None
        yield Child(process, int(match.group(1)), int(metrics) if metrics else None, log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(30)


def lstmserve(model_path: Path, log_path: Path, **settings) -> contextlib.AbstractContextManager[Child]:
    """The real server on a free port with metrics on another; `settings` are its flags (snake_case)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    command = [
        sys.executable,
        "-m",
        "server.main",
        "--model-path",
        str(model_path),
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--log-level",
        "INFO",
        *flags,
    ]
    return child(command, log_path, r"serving model .* on 127\.0\.0\.1:(\d+) \(.*metrics on port (\d+)\)")


def echo(output_size: int, log_path: Path) -> contextlib.AbstractContextManager[Child]:
    command = [sys.executable, "-m", "bench.echo", "--output-size", str(output_size)]
    return child(command, log_path, r"echo listening on 127\.0\.0\.1:(\d+)")


def _wait_for(process: subprocess.Popen, log_path: Path, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text())
        if match:
            return match
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[2]} exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(f"{process.args} did not start within {timeout}s:\n{log_path.read_text()}")
