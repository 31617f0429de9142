"""Triton-style sequences in the engine: START and END, restarts, expiry, batching with native steps."""

import asyncio

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from server.engine import Engine, InvalidInput, Sequences, SessionNotFound
from server.metrics import Metrics
from server.model import ModelRuntime
from tests.conftest import export_model
from tests.limits import limits_with
from tests.metric_samples import total

pytestmark = pytest.mark.unit

INPUT, HIDDEN, LAYERS, OUTPUT = 3, 4, 2, 5


@pytest.fixture(scope="module")
def model(models_dir):
    return export_model(models_dir, "sequences", INPUT, HIDDEN, LAYERS, OUTPUT, seed=3)


@pytest.fixture
def metrics():
    return Metrics(CollectorRegistry())


def live_sessions(metrics: Metrics) -> float:
    return total(metrics.registry, "lstmserve_live_sessions")


@pytest.fixture
async def engine(model, metrics, request):
    """An engine whose sessions outlive any test, unless the test is marked with a shorter idle timeout."""
    marker = request.node.get_closest_marker("idle_timeout")
    idle_timeout = marker.args[0] if marker else 600.0
    engine = Engine(ModelRuntime.load(model[0]), limits_with(idle_timeout=idle_timeout), metrics)
    await engine.start()
    yield engine
    await engine.stop()


def reference(model, x: np.ndarray, h0=None, c0=None):
    """The scripted module run in-process over `x[T, input]` from `(h0, c0)`: `(y[T, out], h, c)`."""
    zeros = np.zeros((LAYERS, HIDDEN), np.float32)
    h = torch.from_numpy(zeros if h0 is None else h0)[:, None]
    c = torch.from_numpy(zeros if c0 is None else c0)[:, None]
    with torch.no_grad():
        y, (h_n, c_n) = model[1](torch.from_numpy(x)[:, None], (h, c))
    return y[:, 0].numpy(), h_n[:, 0].numpy(), c_n[:, 0].numpy()


async def answer(sequences: Sequences, *args, **kwargs):
    """Submits a request and waits for its outputs (and state, when asked for)."""
    answer = await (await sequences.step(*args, **kwargs))
    return (answer.outputs, *answer.state) if answer.state else answer.outputs


async def settle() -> None:
    """Lets the callbacks and tasks an answer scheduled (such as closing an ended sequence) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def chunk(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((steps, INPUT)).astype(np.float32)


async def test_a_sequence_carries_state_from_start_to_end_and_end_frees_it(engine, model, metrics):
    sequences = Sequences(engine)
    x1, x2 = chunk(3, 1), chunk(2, 2)
    h0 = np.random.default_rng(3).standard_normal((LAYERS, HIDDEN)).astype(np.float32)
    c0 = np.random.default_rng(4).standard_normal((LAYERS, HIDDEN)).astype(np.float32)
    y1 = await answer(sequences, 7, x1, start=True, h0=h0, c0=c0)
    y2, h, c = await answer(sequences, 7, x2, end=True, with_state=True)
    expected_y, expected_h, expected_c = reference(model, np.concatenate([x1, x2]), h0, c0)
    np.testing.assert_allclose(np.concatenate([y1, y2]), expected_y, atol=1e-5)
    np.testing.assert_allclose(h, expected_h, atol=1e-5)
    np.testing.assert_allclose(c, expected_c, atol=1e-5)
    await settle()  # the session closes right after END's answer
    assert len(sequences) == 0
    assert live_sessions(metrics) == 0
    with pytest.raises(SessionNotFound, match="sequence_start=true"):
        await sequences.step(7, x1)


async def test_a_request_without_start_for_an_unknown_id_is_refused(engine):
    with pytest.raises(SessionNotFound, match="sequence 'abc' is not active.*sequence_start=true"):
        await Sequences(engine).step("abc", chunk(1, 0))


async def test_start_on_a_live_id_restarts_it_after_answering_what_was_queued(engine, model, metrics):
    sequences = Sequences(engine)
    x1, x2, x3 = chunk(2, 1), chunk(2, 2), chunk(2, 3)
    first = await sequences.step(5, x1, start=True)
    queued = await sequences.step(5, x2)
    restarted = await sequences.step(5, x3, start=True)
    np.testing.assert_allclose((await first).outputs, reference(model, x1)[0], atol=1e-5)
    np.testing.assert_allclose((await queued).outputs, reference(model, np.concatenate([x1, x2]))[0][2:], atol=1e-5)
    np.testing.assert_allclose((await restarted).outputs, reference(model, x3)[0], atol=1e-5)
    await settle()
    assert len(sequences) == 1
    assert live_sessions(metrics) == 1  # the replaced session was freed


async def test_rejected_requests_change_no_sequence(engine, model):
    sequences = Sequences(engine)
    x1, x2 = chunk(2, 1), chunk(3, 2)
    await answer(sequences, 9, x1, start=True)
    with pytest.raises(InvalidInput, match="shape"):
        await sequences.step(9, chunk(2, 5)[:, :2], start=True)  # a bad START must not restart the sequence
    with pytest.raises(InvalidInput, match="only with sequence_start"):
        await sequences.step(9, x2, h0=np.zeros((LAYERS, HIDDEN), np.float32))
    with pytest.raises(InvalidInput, match="shape"):
        await sequences.step(9, x2[None])
    y2 = await answer(sequences, 9, x2, end=True)
    np.testing.assert_allclose(y2, reference(model, np.concatenate([x1, x2]))[0][2:], atol=1e-5)


@pytest.mark.idle_timeout(0.2)
async def test_an_idle_sequence_expires_with_its_session(engine):
    sequences = Sequences(engine)
    await answer(sequences, 1, chunk(1, 0), start=True)
    for _ in range(200):  # the engine checks every idle_timeout / 4 = 0.05 s
        if not len(sequences):
            break
        await asyncio.sleep(0.05)
    assert len(sequences) == 0
    with pytest.raises(SessionNotFound, match="not active"):
        await sequences.step(1, chunk(1, 0))


async def test_sequence_steps_share_a_model_call_with_native_steps(engine, model, metrics):
    sequences = Sequences(engine)
    native = (await engine.create_session()).session_id
    x = chunk(1, 4)
    _, native_answer = await engine.step(native, x)
    sequence_answer = await sequences.step(3, x, start=True)
    y_native, y_sequence = (await native_answer).outputs, (await sequence_answer).outputs
    registry = metrics.registry
    assert total(registry, "lstmserve_batch_size_count") == 1  # one model call ...
    assert total(registry, "lstmserve_batch_size_sum") == 2  # ... for both sessions
    np.testing.assert_allclose(y_sequence, reference(model, x)[0], atol=1e-5)
    np.testing.assert_allclose(y_native, y_sequence, atol=1e-6)


async def test_sequence_ids_belong_to_their_principal(engine, model, metrics):
    sequences = Sequences(engine)
    x1, x2 = np.full((2, INPUT), 0.5, np.float32), np.full((1, INPUT), -0.3, np.float32)
    await answer(sequences, 7, x1, start=True, owner="alice")
    with pytest.raises(SessionNotFound, match="not active"):  # bob cannot drive alice's sequence 7...
        await sequences.step(7, x2, owner="bob")
    await answer(sequences, 7, x2, start=True, end=True, owner="bob")  # ...and his own 7 is another one
    await settle()
    y, _, _ = reference(model, np.concatenate([x1, x2]))
    np.testing.assert_allclose(await answer(sequences, 7, x2, end=True, owner="alice"), y[2:], atol=1e-5)
    await settle()
    assert live_sessions(metrics) == 0
