"""Merged Predicts on the real server: concurrent callers, native Predict and OIP ModelInfer without a sequence
id, each answered with exactly what the model computes in-process for its own request."""

import asyncio

import grpc
import numpy as np
import pytest
import torch
from inference import grpc_service_pb2 as oip_pb
from inference import grpc_service_pb2_grpc as oip_pb_grpc

from client import AsyncLstmClient
from tests.conftest import export_model
from tests.integration.reference import TOLERANCE, run_module
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

MODEL = "merge-lstm"
INPUT, HIDDEN, LAYERS, OUTPUT = 6, 16, 2, 5
SEQ_LEN = 40
ROUNDS = 5  # a round whose callers all arrive after the model went idle merges nothing: try a few


@pytest.fixture(scope="module")
def model(models_dir):
    return export_model(models_dir, MODEL, INPUT, HIDDEN, LAYERS, OUTPUT, seed=3)


@pytest.fixture(scope="module")
def server(model):
    with server_in_thread(model[0]) as server:
        yield server


def reference(module, x: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None):
    zeros = np.zeros((LAYERS, x.shape[1], HIDDEN), np.float32)
    h0, c0 = (zeros if h0 is None else h0), (zeros if c0 is None else c0)
    y, (h, c) = run_module(module, torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    return y.numpy(), h.numpy(), c.numpy()


def requests(rng, count: int) -> list[tuple]:
    """`(x, h0, c0)` of `count` Predicts: batches of 1 to 3 rows, every other one from a given state; one in
    four of another seq_len, which runs in a call of its own."""
    made = []
    for i in range(count):
        batch, seq_len = 1 + i % 3, SEQ_LEN if i % 4 else SEQ_LEN // 2
        x = rng.standard_normal((seq_len, batch, INPUT)).astype(np.float32)
        state = [(0.5 * rng.standard_normal((LAYERS, batch, HIDDEN))).astype(np.float32) for _ in "hc"]
        made.append((x, *(state if i % 2 else (None, None))))
    return made


def oip_request(x: np.ndarray, h0, c0) -> oip_pb.ModelInferRequest:
    request = oip_pb.ModelInferRequest(model_name=MODEL)
    for name, array in (("INPUT", x), ("H0", h0), ("C0", c0)):
        if array is not None:
            request.inputs.add(name=name, datatype="FP32", shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
    return request


async def oip_predict(stub, x, h0, c0):
    response = await stub.ModelInfer(oip_request(x, h0, c0))
    return [np.frombuffer(raw, np.float32).reshape(output.shape)
            for output, raw in zip(response.outputs, response.raw_output_contents)]


async def one_round(address: str, calls: list[tuple]) -> list:
    """A long Predict to keep the model busy, then every call at once, alternately native and OIP."""
    async with AsyncLstmClient(address) as client, grpc.aio.insecure_channel(address) as channel:
        stub = oip_pb_grpc.GRPCInferenceServiceStub(channel)
        busy = asyncio.ensure_future(client.predict(np.ones((4000, 16, INPUT), np.float32)))
        await asyncio.sleep(0.05)
        answers = await asyncio.gather(*(
            oip_predict(stub, *call) if i % 2 else client.predict(*call) for i, call in enumerate(calls)))
        await busy
    return [tuple(answer) for answer in answers]


def merged_total(server) -> float:
    return server.app.metrics.registry.get_sample_value("lstmserve_predict_merged_total",
                                                        {"model": MODEL, "version": "test"})


def test_concurrent_predicts_are_merged_and_each_equals_its_own_reference(server, model):
    rng = np.random.default_rng(11)
    for _ in range(ROUNDS):
        calls = requests(rng, 12)
        answers = asyncio.run(one_round(server.address, calls))
        for call, answer in zip(calls, answers, strict=True):
            for got, want in zip(answer, reference(model[1], *call), strict=True):
                np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
        if merged_total(server) > 0:
            return
    pytest.fail(f"no Predict was merged in {ROUNDS} rounds of concurrent callers")
