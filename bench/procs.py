"""The processes under test: the real `lstmserve` and the echo server, each a child on a loopback port."""

import contextlib
import sys
from pathlib import Path

from server.testing.processes import ChildProcess, child_process, lstmserve_process


def lstmserve(model_path: Path, log_path: Path, **settings) -> contextlib.AbstractContextManager[ChildProcess]:
    """The real server on a free port with metrics on another; `settings` are its flags (snake_case)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]
    return lstmserve_process(model_path, log_path, *flags, metrics=True, timeout=180)


def echo(output_size: int, log_path: Path) -> contextlib.AbstractContextManager[ChildProcess]:
    command = [sys.executable, "-m", "bench.echo", "--output-size", str(output_size)]
    return child_process(command, log_path, r"echo listening on 127\.0\.0\.1:(\d+)", timeout=180)
