"""What the `lstmserve` process says when it cannot start: a line naming the cause, exit status 2, no traceback."""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_a_port_in_use_is_reported_as_a_start_up_error(demo_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ended = subprocess.run([sys.executable, "-m", "server.main", "--model-path", str(demo_model), "--port",
                                str(port), "--metrics-port", "-1"], capture_output=True, text=True, timeout=120,
                               env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert ended.returncode == 2, ended.stderr
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in ended.stderr
    assert "Traceback" not in ended.stderr
