"""Every output path of the real server equals the same TorchScript model run in-process."""

import asyncio

import numpy as np
import pytest
import torch

from client import AsyncLstmClient, LstmClient
from client.messages import step_request
from tests.conftest import MODEL_SHAPES, export_model
from tests.integration.reference import TOLERANCE, Reference, run_module
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=sorted(MODEL_SHAPES))
def served(request, models_dir):
    """(server, reference module, metadata) for each model shape."""
    input_size, hidden_size, layers, output = MODEL_SHAPES[request.param]
    path, module = export_model(models_dir, request.param, input_size, hidden_size, layers, output, seed=7)
    with server_in_thread(path) as server, LstmClient(server.address) as client:
        yield server, module, client.info()


def random_steps(rng, steps: int, input_size: int) -> np.ndarray:
    return rng.standard_normal((steps, input_size)).astype(np.float32)


def assert_close(got, want):
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_streamed_one_step_at_a_time(served):
    server, module, info = served
    xs = random_steps(np.random.default_rng(1), 20, info.input_size)
    reference = Reference(module, info.num_layers, info.hidden_size)
    with LstmClient(server.address) as client, client.session() as session:
        outputs = list(session.stream(xs))
        for x, y in zip(xs, outputs):
            assert_close(y, reference.step(x[None])[0])
        for got, want in zip(session.state(), reference.state):
            assert_close(got, want)


def test_streamed_in_uneven_chunks_from_a_given_state(served):
    server, module, info = served
    rng = np.random.default_rng(2)
    h0 = rng.standard_normal((info.num_layers, info.hidden_size)).astype(np.float32)
    c0 = rng.standard_normal((info.num_layers, info.hidden_size)).astype(np.float32)
    chunks = [random_steps(rng, n, info.input_size) for n in (3, 1, 7, 2, 11)]
    reference = Reference(module, info.num_layers, info.hidden_size, h0, c0)
    with LstmClient(server.address) as client, client.session(h0, c0) as session:
        for chunk, y in zip(chunks, session.stream(chunks)):
            assert y.shape == (len(chunk), info.output_size)
            assert_close(y, reference.step(chunk))


def test_unary_steps(served):
    server, module, info = served
    xs = random_steps(np.random.default_rng(3), 6, info.input_size)
    reference = Reference(module, info.num_layers, info.hidden_size)
    with LstmClient(server.address) as client, client.session() as session:
        for x in xs:
            assert_close(session.step(x), reference.step(x[None])[0])
        assert session.info().steps_applied == 6


def test_predict_whole_batched_sequences_from_a_given_state(served):
    server, module, info = served
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 5, info.input_size)).astype(np.float32)
    h0 = rng.standard_normal((info.num_layers, 5, info.hidden_size)).astype(np.float32)
    c0 = rng.standard_normal((info.num_layers, 5, info.hidden_size)).astype(np.float32)
    with LstmClient(server.address) as client:
        result = client.predict(x, h0, c0)
    y, (h_n, c_n) = run_module(module, torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    for got, want in ((result.outputs, y), (result.h_n, h_n), (result.c_n, c_n)):
        assert_close(got, want.numpy())


def test_stepping_and_predicting_the_same_sequence_agree(served):
    server, _, info = served
    xs = random_steps(np.random.default_rng(5), 12, info.input_size)
    with LstmClient(server.address) as client, client.session() as session:
        streamed = np.stack(list(session.stream(xs)))
        whole = client.predict(xs[:, None, :])
        assert_close(streamed, whole.outputs[:, 0])
        for got, want in zip(session.state(), (whole.h_n[:, 0], whole.c_n[:, 0])):
            assert_close(got, want)


def test_64_concurrent_interleaved_sessions_each_match_their_own_reference(served):
    server, module, info = served

    async def drive(client, seed):
        rng = np.random.default_rng(100 + seed)
        chunks = [random_steps(rng, int(n), info.input_size) for n in rng.integers(1, 4, size=8)]
        reference = Reference(module, info.num_layers, info.hidden_size)
        async with client.session() as session:
            outputs = [y async for y in session.stream(chunks)]
            state = await session.state()
        for chunk, y in zip(chunks, outputs):
            assert_close(y, reference.step(chunk))
        for got, want in zip(state, reference.state):
            assert_close(got, want)

    async def main():
        async with AsyncLstmClient(server.address) as client:
            await asyncio.gather(*(drive(client, seed) for seed in range(64)))

    asyncio.run(main())


def test_several_sessions_driven_over_one_stream(served):
    """Requests for different sessions interleaved on one Stream are each applied to their own state."""
    server, module, info = served
    rng = np.random.default_rng(6)
    with LstmClient(server.address) as client:
        sessions = [client.session() for _ in range(3)]
        references = [Reference(module, info.num_layers, info.hidden_size) for _ in sessions]
        plan = [(i % 3, random_steps(rng, 1 + i % 2, info.input_size)) for i in range(12)]
        requests = [step_request(sessions[k].id, 1 + i // 3, x)[0] for i, (k, x) in enumerate(plan)]
        for (k, x), response in zip(plan, client.stub.Stream(iter(requests))):
            assert response.session_id == sessions[k].id
            assert_close(np.frombuffer(response.outputs.data, np.float32).reshape(len(x), -1),
                         references[k].step(x))
