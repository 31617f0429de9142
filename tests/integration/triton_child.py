"""A child process that runs `tritonclient` calls for the tests, and the values it returns.

tritonclient registers Triton's own `inference` protobuf descriptors, which cannot share one process's
descriptor pool with the server's (protobuf refuses the duplicate symbols); a separate process is also
what every real client is. This module imports neither side's protobuf code, so both processes load it:
the test process to start the child and read its answers, the child (`triton_calls`) to answer.
"""

import concurrent.futures
import contextlib
import dataclasses
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Failure:
    """An error tritonclient reported: its status (e.g. StatusCode.NOT_FOUND) and message."""

    status: str
    message: str


class TritonChild:
    """`child.call("infer_each", address, ...)` runs `triton_calls.infer_each(address, ...)` in the child."""

    def __init__(self, process: subprocess.Popen):
        self._process = process
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="triton-child")

    def call(self, function: str, *args, timeout: float = 60):
        pickle.dump((function, args), self._process.stdin)
        self._process.stdin.flush()
        ok, value = self._reader.submit(pickle.load, self._process.stdout).result(timeout)
        if not ok:
            raise RuntimeError(f"triton_calls.{function} raised in the child:\n{value}")
        return value

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(10)
        finally:
            if self._process.poll() is None:
                self._process.kill()
            self._reader.shutdown(wait=False)


@contextlib.contextmanager
def triton_child() -> Iterator[TritonChild]:
    process = subprocess.Popen([sys.executable, "-m", "tests.integration.triton_calls"], cwd=REPO_ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = TritonChild(process)
    try:
        yield child
    finally:
        child.close()


def serve(functions: dict, requests, answers) -> None:
    """The child's loop: reads `(function name, args)`, writes `(True, result)` or `(False, traceback)`."""
    import traceback

    while True:
        try:
            name, args = pickle.load(requests)
        except EOFError:
            return
        try:
            answer = (True, functions[name](*args))
        except Exception:  # noqa: BLE001 - the test process shows it
            answer = (False, traceback.format_exc())
        pickle.dump(answer, answers)
        answers.flush()
