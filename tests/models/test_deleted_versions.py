"""A version whose directory the operator deletes: once it holds no engine (it failed to load, or was unloaded), the
next read of the repository forgets it, so ListModels and lstmserve_model_versions stop reporting it (and the
LstmserveModelVersionUnavailable alert clears); a version still loaded drains as any version leaving the policy."""

import shutil
import time

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from tests.models.repository_files import SIZES, add_version, corrupt, state_name, states, write_config
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration


def versions_in(server, state: str) -> float | None:
    """lstmserve_model_versions{model="m", state} as a scrape would read it."""
    return server.app.metrics.registry.get_sample_value("lstmserve_model_versions", {"model": "m", "state": state})


def test_a_failed_version_whose_directory_is_deleted_is_forgotten(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        corrupt(tmp_path / "m" / "2" / "model.pt")  # a broken roll-out: version 1 stays current
        server.call(server.app.registry.reload())
        listed = states(channel)
        assert state_name(listed[("m", 2)]) == "UNAVAILABLE" and listed[("m", 2)].reason.startswith("failed to load")
        assert versions_in(server, "UNAVAILABLE") == 1
        shutil.rmtree(tmp_path / "m" / "2")
        server.call(server.app.registry.reload())
        listed = states(channel)
        assert set(listed) == {("m", 1)}
        assert state_name(listed[("m", 1)]) == "READY" and listed[("m", 1)].is_default
        assert (versions_in(server, "UNAVAILABLE"), versions_in(server, "READY")) == (0, 1)


def test_a_serving_version_whose_directory_is_deleted_drains_and_is_forgotten_once_unloaded(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    add_version(tmp_path, "m", 2, seed=2)
    write_config(tmp_path, "m", version_policy={"all": {}})
    with server_in_thread(tmp_path, model_repository=str(tmp_path), drain_timeout=120) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest(model_name="m", model_version=1)).session_id
        shutil.rmtree(tmp_path / "m" / "1")
        for _ in range(2):  # read again while it drains: a version holding sessions is kept
            server.call(server.app.registry.reload())
            assert state_name(states(channel)[("m", 1)]) == "DRAINING"
        x = tensors.to_proto(np.zeros((1, SIZES[0]), np.float32))
        assert stub.Step(pb.StepRequest(session_id=session, inputs=x)).outputs.shape == [1, SIZES[1]]
        stub.CloseSession(pb.SessionRef(session_id=session))
        deadline = time.monotonic() + 30
        while state_name(states(channel)[("m", 1)]) != "UNAVAILABLE":
            assert time.monotonic() < deadline, "version 1 was not unloaded after its last session closed"
            time.sleep(0.02)
        server.call(server.app.registry.reload())
        assert set(states(channel)) == {("m", 2)}
        assert (versions_in(server, "DRAINING"), versions_in(server, "READY")) == (0, 1)
