"""Load: many concurrent sessions from several client processes, zero errors, every state exact."""

import concurrent.futures
import multiprocessing

import pytest

from server.testing.processes import lstmserve_process
from tests.reliability import load_worker
from tests.reliability.figures import FIGURES, scale

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SESSIONS = scale(reduced=60, full=1000)
STEPS = scale(reduced=20, full=200)
WORKERS = scale(reduced=2, full=4)  # the last drives the client library's streams, the others StreamBatch
SIZES = (2, 8, 5)  # the two_layer_model: layers, hidden, input


def test_concurrent_sessions_hold_with_zero_errors_and_exact_state(two_layer_model, tmp_path):
    path, _ = two_layer_model
    per_worker = SESSIONS // WORKERS
    with lstmserve_process(path, tmp_path / "server.log", "--max-batch-size", "256") as server:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=context) as pool:
            runs = [
                pool.submit(
                    load_worker.run,
                    server.address,
                    str(path),
                    SIZES,
                    w * per_worker,
                    per_worker,
                    STEPS,
                    "client_streams" if w == WORKERS - 1 else "stream_batch",
                )
                for w in range(WORKERS)
            ]
            results = [run.result(timeout=900) for run in runs]
        log = server.log()
    totals = {key: sum(r[key] for r in results) for key in ("sessions", "steps", "errors", "mismatches")}
    seconds = max(r["seconds"] for r in results)  # all workers drive at once: the slowest one's time
    FIGURES.load.update(
        {
            "concurrent sessions": totals["sessions"],
            "client processes": WORKERS,
            "steps applied": totals["steps"],
            "errors": totals["errors"],
            "sessions != reference": totals["mismatches"],
            "seconds driving": round(seconds, 1),
            "steps per second": round(totals["steps"] / seconds),
        }
    )
    FIGURES.state_mismatches += totals["mismatches"]
    assert totals == {"sessions": SESSIONS, "steps": SESSIONS * STEPS, "errors": 0, "mismatches": 0}
    assert " ERROR " not in log
