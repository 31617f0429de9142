"""ModelStreamInfer over an engine with a FakeRuntime, without gRPC: what a client that goes away leaves running."""

import asyncio

import numpy as np
import pytest
from inference import grpc_service_pb2 as pb
from prometheus_client import CollectorRegistry

from server.engine import Draining, Engine, Sequences
from server.metrics import Metrics
from server.models.versions import VersionState, VersionStatus
from server.transport.oip import OipServicer
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit


class OneEngine:
    """What OipServicer asks of the model registry, for one engine (model "fake") that never drains."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._sequences = Sequences(engine)
        self.draining = asyncio.Event()

    def statuses(self) -> list[VersionStatus]:
        return [VersionStatus("fake", 1, VersionState.READY, "", self._engine.runtime.metadata, 0, is_default=True)]

    def engine(self, name: str, version: int, new_work: bool = True) -> Engine:
        return self._engine

    def sequences(self, engine: Engine) -> Sequences:
        return self._sequences

    def draining_refusal(self, message: str) -> Draining:
        return Draining(message)


class OpenStream:
    """A client's request stream: `requests`, then nothing more until the client goes away."""

    def __init__(self, *requests: pb.ModelInferRequest):
        self._requests = list(requests)

    def __aiter__(self):
        return self

    async def __anext__(self) -> pb.ModelInferRequest:
        if not self._requests:
            await asyncio.Event().wait()
        return self._requests.pop(0)


def stateless_request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fake")
    request.inputs.add(name="INPUT", datatype="FP32", shape=(1, 1, 2))
    request.raw_input_contents.append(np.full((1, 1, 2), value, np.float32).tobytes())
    return request


def sequence_request(value: float, start: bool = False) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fake")
    request.inputs.add(name="INPUT", datatype="FP32", shape=(1, 2))
    request.raw_input_contents.append(np.full((1, 2), value, np.float32).tobytes())
    request.parameters["sequence_id"].string_param = "s1"
    request.parameters["sequence_start"].bool_param = start
    return request


async def client_goes_away_while_it_waits(servicer: OipServicer, engine: Engine, request) -> None:
    """Sends `request` on a stream while the model is busy, and leaves before it is answered."""
    engine.runtime.gate.clear()
    busy = asyncio.ensure_future(engine.predict(np.zeros((1, 1, 2), np.float32)))
    await asyncio.sleep(0.05)  # the model is busy with it
    handler = asyncio.ensure_future(anext(servicer.ModelStreamInfer(OpenStream(request), None)))
    await asyncio.sleep(0.05)  # the request waits for the model
    handler.cancel()
    await asyncio.sleep(0.05)
    engine.runtime.gate.set()
    await busy


@pytest.fixture
async def engine():
    engine = Engine(FakeRuntime(), limits_with(max_batch_size=8, max_predict_batch=6), Metrics(CollectorRegistry()))
    await engine.start()
    try:
        yield engine
    finally:
        engine.runtime.gate.set()
        await engine.stop()


async def test_a_stateless_request_whose_client_went_away_while_it_waited_is_not_run(engine):
    servicer = OipServicer(OneEngine(engine), Metrics(CollectorRegistry()), stream_window=4)
    await client_goes_away_while_it_waits(servicer, engine, stateless_request(1.0))
    outputs, _, _ = await engine.predict(np.full((1, 1, 2), 2.0, np.float32))
    np.testing.assert_allclose(outputs[0, 0], 4.0)
    assert engine.runtime.batch_sizes == [1, 1]  # the busy one and the last: the one of the client that left never ran


async def test_a_sequence_request_whose_client_went_away_while_it_waited_still_applies(engine):
    servicer = OipServicer(OneEngine(engine), Metrics(CollectorRegistry()), stream_window=4)
    await client_goes_away_while_it_waits(servicer, engine, sequence_request(1.0, start=True))
    answer = pb.ModelStreamInferResponse.FromString(  # bytes: the servicer serializes its answers itself
        await anext(servicer.ModelStreamInfer(OpenStream(sequence_request(1.0)), None)))
    assert not answer.error_message
    output = np.frombuffer(answer.infer_response.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(output, 4.0)  # h = 2 from the first request, + 2: the first one was applied
