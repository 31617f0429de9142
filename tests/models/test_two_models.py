"""Several models at once: each its own sizes and sessions, and one model thread shared fairly between them."""

import asyncio

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

LARGE = (64, 256, 2, None)
LARGE_CALLS = 32  # whole-sequence calls of the large model, all queued at once
LARGE_STEPS = 200  # time steps in each: a long model call
SMALL_STEPS = 4


def test_two_models_serve_side_by_side_each_with_its_own_sizes(tmp_path):
    small = add_version(tmp_path, "small", 1, seed=1)
    other = add_version(tmp_path, "other", 4, seed=3, sizes=(3, 5, 2, 2))
    with server_in_thread(tmp_path, model_repository=str(tmp_path), default_model="small") as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        listed = stub.ListModels(pb.ListModelsRequest()).models
        assert [(m.name, m.version, m.info.input_size) for m in listed] == [("other", 4, 3), ("small", 1, 4)]
        for name, module, sizes in (("", small, SIZES), ("other", other, (3, 5, 2, 2))):
            x = np.ones((2, sizes[0]), np.float32)
            answer = stub.Step(pb.StepRequest(new_session=pb.CreateSessionRequest(model_name=name),
                                              inputs=tensors.to_proto(x)))
            np.testing.assert_allclose(tensors.from_proto(answer.outputs),
                                       Reference(module, sizes[2], sizes[1]).step(x), atol=TOLERANCE)
            info = stub.GetSession(pb.SessionRef(session_id=answer.session_id))
            assert (info.model_name, info.model_version) == ((name or "small"), 4 if name else 1)


def test_a_saturated_model_does_not_starve_another(tmp_path):
    """The large model's calls are all queued before the small model's steps: served in turn, the small session
    finishes its steps while most large calls still wait (in one queue, first come first served, it would wait
    for every one of them)."""
    add_version(tmp_path, "large", 1, seed=1, sizes=LARGE)
    add_version(tmp_path, "small", 1, seed=2)
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server:
        large_done, large_done_when_small_finished = asyncio.run(saturate(server.address))
    assert large_done == LARGE_CALLS
    assert large_done_when_small_finished < LARGE_CALLS // 2


async def saturate(address: str) -> tuple[int, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        sequence = tensors.to_proto(np.ones((LARGE_STEPS, 1, LARGE[0]), np.float32))
        large = [asyncio.ensure_future(stub.Predict(pb.PredictRequest(model_name="large", inputs=sequence)))
                 for _ in range(LARGE_CALLS)]
        await asyncio.wait(large, return_when=asyncio.FIRST_COMPLETED)  # every call has reached the server
        step = tensors.to_proto(np.ones((1, SIZES[0]), np.float32))
        session = await stub.CreateSession(pb.CreateSessionRequest(model_name="small"))
        # all sent at once, so the small model always has a step waiting (the client's round trips never count)
        small = stub.Stream()
        for seq in range(1, SMALL_STEPS + 1):
            await small.write(pb.StepRequest(session_id=session.session_id, sequence_number=seq, inputs=step))
        await small.done_writing()
        assert not [answer async for answer in small if answer.HasField("error")]
        when_small_finished = sum(call.done() for call in large)
        await asyncio.gather(*large)
        return sum(call.done() for call in large), when_small_finished


def test_per_principal_limits_span_models(tmp_path):
    add_version(tmp_path, "a", 1, seed=1)
    add_version(tmp_path, "b", 1, seed=2)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), max_sessions_per_owner=2) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        stub.CreateSession(pb.CreateSessionRequest(model_name="a"))
        stub.CreateSession(pb.CreateSessionRequest(model_name="b"))
        for name in ("a", "b"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.CreateSession(pb.CreateSessionRequest(model_name=name))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_sessions_per_owner=2" in refused.value.details()
