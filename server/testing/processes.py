"""Child processes that announce their loopback port in their log: `lstmserve` itself, or any such command."""

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

# server/app.py's start-up line; the metrics port is `None` when metrics are off.
SERVING = r"serving model .* on 127\.0\.0\.1:(\d+) \(.*metrics on port (\d+|None)\)"


@dataclasses.dataclass
class ChildProcess:
    process: subprocess.Popen
    port: int
    metrics_port: int | None
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

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
def child_process(command: list[str], log_path, pattern: str, timeout: float = 120) -> Iterator[ChildProcess]:
    """Starts `command` with its output in `log_path` and waits for `pattern` in the log (groups: the port,
    optionally the metrics port); kills that PID on exit if it is still running."""
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        match = wait_for_log(process, log_path, pattern, timeout)
        metrics = match.group(2) if match.re.groups > 1 else None
        yield ChildProcess(process, int(match.group(1)), int(metrics) if metrics and metrics.isdigit() else None,
                           log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(30)


def lstmserve_process(model_path, log_path, *flags: str, metrics: bool = False,
                      timeout: float = 120) -> contextlib.AbstractContextManager[ChildProcess]:
    """`lstmserve` as a child process on a free loopback port, with `flags` after the launcher's own; metrics on
    another free port when `metrics`, else off."""
    command = [sys.executable, "-m", "server.main", "--model-path", str(model_path), "--port", "0",
               "--metrics-port", "0" if metrics else "-1",
               "--log-level", "INFO",  # the start-up line waited for is logged at INFO
               *flags]
    return child_process(command, log_path, SERVING, timeout)


def wait_for_log(process: subprocess.Popen, log_path: Path, pattern: str, timeout: float) -> re.Match:
    """The first match of `pattern` in the log; raises with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, log_path.read_text())
        if match:
            return match
        if process.poll() is not None:
            raise RuntimeError(f"{_name(process)} exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(f"{_name(process)} did not start within {timeout}s:\n{log_path.read_text()}")


def _name(process: subprocess.Popen) -> str:
    """`python -m server.main` reads better as `server.main`."""
    args = process.args
    return args[2] if len(args) > 2 and args[1] == "-m" else str(args[0])
