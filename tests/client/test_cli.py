"""The client CLI against the real server: info, stream from stdin, predict from CSV and .npy files."""

import subprocess
import sys

import numpy as np
import pytest

from client import LstmClient

pytestmark = pytest.mark.integration

ROWS = np.array([[0.7757, 0.9996, -0.2380, -1.7623], [0.4873, 1.4592, 1.4165, 1.0032],
                 [-0.5644, 0.3819, 1.7595, 1.2146]], dtype=np.float32)


def cli(server, *args, stdin: str = "") -> str:
    result = subprocess.run([sys.executable, "-m", "client.cli", "--address", server.address, *args],
                            input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def parse_rows(lines) -> np.ndarray:
    return np.array([[float(v) for v in line.split(",")] for line in lines])


def test_health_reports_serving(demo_server):
    assert cli(demo_server, "health").strip() == "SERVING"


def test_info_names_the_model(demo_server):
    out = cli(demo_server, "info")
    assert 'name: "tutorial-lstm"' in out and "input_size: 4" in out


def test_stream_prints_each_output_and_the_final_state(demo_server):
    stdin = "\n".join(",".join(str(v) for v in row) for row in ROWS) + "\n"
    lines = cli(demo_server, "stream", "--show-state", stdin=stdin).splitlines()
    with LstmClient(demo_server.address) as client:
        expected = client.predict(ROWS[:, None, :])
    np.testing.assert_allclose(parse_rows(lines[:3]), expected.outputs[:, 0], atol=1e-5)
    np.testing.assert_allclose(parse_rows([lines[3].split()[1]]), expected.h_n[:, 0], atol=1e-5)


def test_predict_from_csv_and_npy_agree(demo_server, tmp_path):
    csv, npy, saved = tmp_path / "rows.csv", tmp_path / "rows.npy", tmp_path / "out.npz"
    csv.write_text("# t, four inputs\n" + "\n".join(" ".join(map(str, row)) for row in ROWS))
    np.save(npy, ROWS)
    from_csv = cli(demo_server, "predict", str(csv))
    assert from_csv == cli(demo_server, "predict", str(npy), "--output", str(saved))
    with LstmClient(demo_server.address) as client:
        expected = client.predict(ROWS[:, None, :])
    np.testing.assert_allclose(np.load(saved)["outputs"], expected.outputs, atol=1e-5)


def test_errors_are_reported_with_their_status(demo_server, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n")
    result = subprocess.run([sys.executable, "-m", "client.cli", "--address", demo_server.address,
                             "predict", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "expected [N, N, 4]" in result.stderr


@pytest.mark.parametrize("args, stdin, says", [
    (("stream",), "1,2,3,4\n1,2,x,4\n", "could not convert"),
    (("predict", "/nonexistent/rows.csv"), "", "No such file"),
])
def test_bad_input_is_reported_without_a_traceback(demo_server, args, stdin, says):
    result = subprocess.run([sys.executable, "-m", "client.cli", "--address", demo_server.address, *args],
                            input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
