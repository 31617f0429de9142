"""A new version rolls out under streaming load: every session finishes on the version it began with, new
sessions get the new version, the old one is unloaded once its last session closes (or at the drain timeout)."""

import asyncio
import gc
import time
import weakref

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version, state_name, states
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

SESSIONS = 100
STEPS_EACH_SIDE = 8  # steps of every session before the switch, and again after it


class Driven:
    """A session streamed without pause: its inputs and answers, for the reference afterwards."""

    def __init__(self, info: pb.SessionInfo):
        self.info = info
        self.inputs: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []
        self.errors: list[str] = []


async def stream_until(stub, driven: Driven, done: asyncio.Event, rng: np.random.Generator) -> None:
    """Steps the session back to back on one Stream until `done`, then closes it."""
    call = stub.Stream()
    while not done.is_set():
        x = rng.standard_normal((1, SIZES[0])).astype(np.float32)
        await call.write(pb.StepRequest(session_id=driven.info.session_id, sequence_number=len(driven.inputs) + 1,
                                        inputs=tensors.to_proto(x)))
        answer = await call.read()
        if answer.HasField("error"):
            driven.errors.append(answer.error.message)
            break
        driven.inputs.append(x)
        driven.outputs.append(tensors.from_proto(answer.outputs))
    await call.done_writing()
    await call.read()  # the end of the stream
    await stub.CloseSession(pb.SessionRef(session_id=driven.info.session_id))


async def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout}s for {what}")
        await asyncio.sleep(0.02)


def check_against(reference_module, driven: Driven) -> None:
    """Every answer equals the reference's run of the session's inputs as one sequence (one call: fast)."""
    reference = Reference(reference_module, SIZES[2], SIZES[1])
    np.testing.assert_allclose(np.concatenate(driven.outputs), reference.step(np.concatenate(driven.inputs)),
                               atol=TOLERANCE)


def test_a_new_version_rolls_out_while_100_sessions_stream(tmp_path):
    references = {1: add_version(tmp_path, "m", 1, seed=1)}
    with server_in_thread(tmp_path, model_repository=str(tmp_path), drain_timeout=120) as server:
        asyncio.run(roll_out(server, tmp_path, references))


async def roll_out(server, repository, references) -> None:
    rng = np.random.default_rng(0)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        old = [Driven(await stub.CreateSession(pb.CreateSessionRequest(model_name="m"))) for _ in range(SESSIONS)]
        assert {d.info.model_version for d in old} == {1}
        done = asyncio.Event()
        streams = [asyncio.create_task(stream_until(stub, d, done, rng)) for d in old]

        async def each_did(steps: int, sessions: list[Driven] = old) -> bool:
            return all(len(d.inputs) >= steps for d in sessions) or any(d.errors for d in sessions)

        await wait_until(lambda: each_did(STEPS_EACH_SIDE), "the first steps")
        references[2] = add_version(repository, "m", 2, seed=2)  # the policy (latest 1) now leaves version 1 out
        await asyncio.to_thread(server.call, server.app.registry.reload())
        listed = await stub.ListModels(pb.ListModelsRequest())
        by_version = {m.version: m for m in listed.models}
        assert state_name(by_version[1]) == "DRAINING" and by_version[1].live_sessions == SESSIONS
        assert state_name(by_version[2]) == "READY" and by_version[2].is_default

        new = [Driven(await stub.CreateSession(pb.CreateSessionRequest(model_name="m"))) for _ in range(10)]
        assert {d.info.model_version for d in new} == {2}
        streams += [asyncio.create_task(stream_until(stub, d, done, rng)) for d in new]
        passed = [len(d.inputs) for d in old]
        await wait_until(lambda: each_did(max(passed) + STEPS_EACH_SIDE), "steps after the switch")
        await wait_until(lambda: each_did(STEPS_EACH_SIDE, new), "the new sessions' steps")
        done.set()
        await asyncio.gather(*streams)

        assert not [e for d in old + new for e in d.errors]
        assert (await stub.GetModelInfo(pb.GetModelInfoRequest(model_name="m"))).model_version == 2
        for d in old:
            check_against(references[1], d)
        for d in new:
            check_against(references[2], d)

        async def unloaded() -> bool:
            return state_name(states_by_version(await stub.ListModels(pb.ListModelsRequest()))[1]) == "UNAVAILABLE"

        await wait_until(unloaded, "version 1 to be unloaded after its last session closed")
        v1 = states_by_version(await stub.ListModels(pb.ListModelsRequest()))[1]
        assert "unloaded" in v1.reason and v1.live_sessions == 0


def states_by_version(answer: pb.ListModelsResponse) -> dict[int, pb.ModelVersionStatus]:
    return {m.version: m for m in answer.models}


def test_at_the_drain_timeout_a_retired_versions_sessions_are_told_to_open_a_new_one(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), drain_timeout=0.2) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        leftover = stub.CreateSession(pb.CreateSessionRequest()).session_id
        x = tensors.to_proto(np.ones((1, SIZES[0]), np.float32))
        stub.Step(pb.StepRequest(session_id=leftover, inputs=x))
        retired = weakref.ref(server.app.registry.engine())
        reference = add_version(tmp_path, "m", 2, seed=2)
        server.call(server.app.registry.reload())
        fresh = stub.CreateSession(pb.CreateSessionRequest())
        assert fresh.model_version == 2
        deadline = time.monotonic() + 30
        while state_name(states(channel)[("m", 1)]) != "UNAVAILABLE":
            assert time.monotonic() < deadline, "version 1 was never unloaded"
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Step(pb.StepRequest(session_id=leftover, inputs=x))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 1 of model m" in refused.value.details() and "open a new session" in refused.value.details()
        columns = pb.StepColumns(session_ids=[leftover], inputs=tensors.to_proto(np.ones((1, 1, SIZES[0]), np.float32)))
        (in_band,) = list(stub.StreamColumns(iter([columns]), timeout=30))  # one version left: its fast path
        assert in_band.errors[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "version 1 of model m" in in_band.errors[0].error.message
        server.call(asyncio.to_thread(gc.collect))
        assert retired() is None  # nothing holds the unloaded version: its memory is returned
        answer = stub.Step(pb.StepRequest(session_id=fresh.session_id, inputs=x))  # others unaffected
        np.testing.assert_allclose(tensors.from_proto(answer.outputs),
                                   Reference(reference, SIZES[2], SIZES[1]).step(np.ones((1, SIZES[0]), np.float32)),
                                   atol=TOLERANCE)


def test_a_draining_version_the_policy_wants_again_serves_again_with_its_sessions(tmp_path):
    reference_module = add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), drain_timeout=120) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        live = stub.CreateSession(pb.CreateSessionRequest()).session_id
        xs = np.random.default_rng(3).standard_normal((2, 1, SIZES[0])).astype(np.float32)
        first = stub.Step(pb.StepRequest(session_id=live, inputs=tensors.to_proto(xs[0])))
        server.call(server.app.registry.unload("m"))
        assert state_name(states(channel)[("m", 1)]) == "DRAINING"
        server.call(server.app.registry.load("m"))  # a roll-back: the draining version is wanted again
        assert state_name(states(channel)[("m", 1)]) == "READY"
        second = stub.Step(pb.StepRequest(session_id=live, inputs=tensors.to_proto(xs[1])))
        outputs = np.concatenate([tensors.from_proto(first.outputs), tensors.from_proto(second.outputs)])
        np.testing.assert_allclose(outputs, Reference(reference_module, SIZES[2], SIZES[1]).step(xs[:, 0]),
                                   atol=TOLERANCE)
        assert stub.CreateSession(pb.CreateSessionRequest()).model_version == 1


def test_an_unloaded_versions_engine_is_freed(tmp_path):
    """Its weights and state pool go with it: nothing keeps the engine alive once the version is unloaded."""
    add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        old_engine = weakref.ref(server.app.registry.engine())
        stub = pb_grpc.LstmServiceStub(channel)
        session = stub.CreateSession(pb.CreateSessionRequest()).session_id
        add_version(tmp_path, "m", 2, seed=2)
        server.call(server.app.registry.reload())
        assert old_engine() is not None  # draining: its session goes on
        stub.CloseSession(pb.SessionRef(session_id=session))
        deadline = time.monotonic() + 30
        while old_engine() is not None:
            assert time.monotonic() < deadline, "version 1's engine is still referenced after its unload"
            time.sleep(0.02)
        assert state_name(states(channel)[("m", 1)]) == "UNAVAILABLE"
