"""Health, reflection, metrics, idle expiry and graceful shutdown of the real server."""

import collections
import re
import signal
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client import LstmClient
from server.testing.processes import lstmserve_process
from tests.conftest import export_model
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def scrape(server) -> dict[str, float]:
    """Each sample under its name and labels as /metrics prints them, and under its bare name the sum of a
    metric's samples over every label set (the per-model series carry model and version)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples, totals = {}, collections.Counter()
    for m in re.finditer(r"^((\w+)(\{[^}]*\})?) (\S+)$", text, re.M):
        samples[m.group(1)] = float(m.group(4))
        if m.group(3):
            totals[m.group(2)] += float(m.group(4))
    return {**totals, **samples}


def test_health_is_serving_for_the_server_and_the_service(demo_server):
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health_status(demo_server.address) == serving
    assert health_status(demo_server.address, "lstmserve.v1.LstmService") == serving


def test_reflection_lists_the_services(demo_server):
    with grpc.insecure_channel(demo_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {"lstmserve.v1.LstmService", "grpc.health.v1.Health"} <= names


def test_metrics_are_exported_and_move_with_traffic(demo_server):
    before = scrape(demo_server)
    with LstmClient(demo_server.address) as client, client.session() as session:
        list(session.stream(np.ones((3, 4))))
        with pytest.raises(grpc.RpcError):
            session.step(np.ones(5))
        live = scrape(demo_server)["lstmserve_live_sessions"]
    after = scrape(demo_server)

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert live >= 1
    assert delta("lstmserve_steps_applied_total") >= 3
    assert delta('lstmserve_steps_applied_total{model="tutorial-lstm",version="1"}') >= 3
    assert delta("lstmserve_sessions_created_total") >= 1
    assert delta("lstmserve_sessions_closed_total") >= 1
    assert delta('lstmserve_rpcs_total{code="OK",method="/lstmserve.v1.LstmService/Stream"}') >= 1
    assert delta('lstmserve_rpcs_total{code="INVALID_ARGUMENT",method="/lstmserve.v1.LstmService/Step"}') == 1
    assert delta("lstmserve_batch_size_count") >= 3
    for histogram in ("lstmserve_queue_wait_seconds_count", "lstmserve_model_compute_seconds_count",
                      'lstmserve_rpc_latency_seconds_count{method="/lstmserve.v1.LstmService/CreateSession"}'):
        assert delta(histogram) >= 1, histogram


def test_idle_sessions_expire_and_are_counted(demo_model):
    with server_in_thread(demo_model, idle_timeout=0.2) as server, LstmClient(server.address) as client:
        session = client.session()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and scrape(server).get("lstmserve_sessions_expired_total", 0) < 1:
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as error:
            session.step(np.ones(4))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert scrape(server)["lstmserve_sessions_expired_total"] == 1


@pytest.mark.slow
def test_sigterm_finishes_the_step_in_flight_then_exits_zero(tmp_path):
    path, _ = export_model(tmp_path, "big", 64, 512, 2)
    with lstmserve_process(path, tmp_path / "server.log") as server:
        with LstmClient(server.address) as client:
            result = {}
            long_request = threading.Thread(
                target=lambda: result.update(y=client.predict(np.ones((3000, 8, 64)))))
            long_request.start()
            time.sleep(1.0)  # let the long request reach the model thread
            server.process.send_signal(signal.SIGTERM)
            long_request.join(120)
            assert result["y"].outputs.shape == (3000, 8, 512)
            with pytest.raises(grpc.RpcError) as error:
                client.session()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(60) == 0
        assert "draining" in server.log()
