"""Broken versions (a corrupt file, sizes its metadata gets wrong, a model that raises in its warm-up) are refused
with their reason and never take traffic, while the serving version streams on untouched."""

import threading
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc
from torch import nn

from server.engine import ModelNotFound
from server.model.metadata import METADATA_FILE, ModelMetadata
from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version, corrupt, state_name, states, write_config
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration


class FailsInWarmUp(nn.Module):
    """An LSTM that passes the load-time probe (3 steps) but raises on the warm-up's 8-step inputs."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(SIZES[0], SIZES[1])

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.shape[0] >= 8:
            raise RuntimeError("this model cannot take 8 steps")
        return self.lstm(x, hx)


def save(module: nn.Module, path, input_size: int = SIZES[0]) -> None:
    """Saves `module` with metadata claiming `input_size` (a lie when it differs from the module's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = ModelMetadata("m", "3", input_size, SIZES[1], 1, SIZES[1])
    torch.jit.save(torch.jit.script(module.eval()), str(path), _extra_files={METADATA_FILE: metadata.to_json()})


BROKEN = [
    (corrupt, "not a TorchScript file"),
    (lambda path: save(nn.LSTM(SIZES[0], SIZES[1]), path, input_size=SIZES[0] + 1), "does not accept"),
    (lambda path: save(FailsInWarmUp(), path), "cannot take 8 steps"),
]


class Streaming(threading.Thread):
    """A session of version 1 stepping without pause until stopped; its inputs, answers and errors kept."""

    def __init__(self, channel: grpc.Channel):
        super().__init__(daemon=True)
        self.stub = pb_grpc.LstmServiceStub(channel)
        self.info = self.stub.CreateSession(pb.CreateSessionRequest(model_name="m"))
        self.stop = threading.Event()
        self.inputs, self.outputs, self.errors = [], [], []

    def run(self) -> None:
        rng = np.random.default_rng(1)
        for answer in self.stub.Stream(self._requests(rng)):
            if answer.HasField("error"):
                self.errors.append(answer.error.message)
            else:
                self.outputs.append(tensors.from_proto(answer.outputs))

    def _requests(self, rng):
        while not self.stop.is_set() and len(self.inputs) < 100_000:
            x = rng.standard_normal((1, SIZES[0])).astype(np.float32)
            self.inputs.append(x)
            yield pb.StepRequest(session_id=self.info.session_id, sequence_number=len(self.inputs),
                                 inputs=tensors.to_proto(x))
            while len(self.outputs) + len(self.errors) < len(self.inputs) and not self.stop.is_set():
                self.stop.wait(0.001)  # one step at a time: each answer comes before the next request


def test_broken_versions_are_refused_with_their_reason_while_traffic_continues(tmp_path):
    reference = add_version(tmp_path, "m", 1, seed=1)
    write_config(tmp_path, "m", version_policy={"all": {}})
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub, health = pb_grpc.LstmServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        streaming = Streaming(channel)
        streaming.start()
        for make_broken, reason in BROKEN:
            make_broken(tmp_path / "m" / "3" / "model.pt")
            server.call(server.app.registry.reload())
            listed = states(channel)
            assert state_name(listed[("m", 3)]) == "UNAVAILABLE" and reason in listed[("m", 3)].reason
            assert state_name(listed[("m", 1)]) == "READY" and listed[("m", 1)].is_default
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            for call in (lambda: stub.CreateSession(pb.CreateSessionRequest(model_name="m", model_version=3)),
                         lambda: stub.GetModelInfo(pb.GetModelInfoRequest(model_name="m", model_version=3))):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "version 3 of model m" in refused.value.details() and reason in refused.value.details()
            assert stub.CreateSession(pb.CreateSessionRequest(model_name="m")).model_version == 1
        streaming.stop.set()
        streaming.join(10)
        assert not streaming.errors and len(streaming.outputs) > 0
        answered = np.concatenate(streaming.inputs[:len(streaming.outputs)])
        expected = Reference(reference, SIZES[2], SIZES[1]).step(answered)
        np.testing.assert_allclose(np.concatenate(streaming.outputs), expected, atol=TOLERANCE)


def test_unknown_models_and_versions_are_not_found(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        for request in (pb.CreateSessionRequest(model_name="nope"), pb.CreateSessionRequest(model_version=9)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(request)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        for operation in (server.app.registry.load, server.app.registry.unload):
            with pytest.raises(ModelNotFound, match="nope"):
                server.call(operation("nope"))


def test_health_is_serving_only_while_every_model_has_a_ready_version(tmp_path):
    add_version(tmp_path, "a", 1, seed=1)
    corrupt(tmp_path / "b" / "1" / "model.pt")
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert state_name(states(channel)[("b", 1)]) == "UNAVAILABLE"
        assert pb_grpc.LstmServiceStub(channel).CreateSession(pb.CreateSessionRequest(model_name="a")).model_version
        add_version(tmp_path, "b", 1, seed=2)  # fixed: its file changed, so it is tried again
        server.call(server.app.registry.reload())
        deadline = time.monotonic() + 30  # the health update runs on the server's loop after the change
        while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never turned SERVING"
            time.sleep(0.01)
