"""Merged Predicts: the batch formation as a pure function, then the engine with a fake runtime."""

import asyncio
import collections
import contextlib

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from server.engine import Engine, ModelFailure
from server.engine.predict_merge import PendingPredict, take_merge
from server.metrics import Metrics
from tests.fakes import FAIL_MARKER, FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit


def pending(seq_len: int, rows: int, nbytes: int = 0, done: bool = False) -> PendingPredict:
    future = asyncio.get_running_loop().create_future()
    if done:
        future.cancel()
    state = torch.zeros(1, rows, 3)
    return PendingPredict(torch.zeros(seq_len, rows, 2), state, state, nbytes, future)


def waiting(*requests: PendingPredict) -> collections.deque:
    return collections.deque(requests)


async def test_the_oldest_request_goes_first_with_later_ones_of_its_seq_len():
    a, b, c, d = pending(5, 1), pending(7, 1), pending(5, 2), pending(5, 1)
    queue = waiting(a, b, c, d)
    assert take_merge(queue, max_rows=64, max_bytes=1 << 20) == [a, c, d]
    assert list(queue) == [b]
    assert take_merge(queue, max_rows=64, max_bytes=1 << 20) == [b]
    assert take_merge(queue, max_rows=64, max_bytes=1 << 20) == [] and not queue


async def test_a_merged_call_stays_within_its_rows_and_bytes_the_first_request_always_runs():
    big, a, b, c = pending(5, 10), pending(5, 3), pending(5, 2), pending(5, 1)
    queue = waiting(big, a, b, c)
    assert take_merge(queue, max_rows=4, max_bytes=1 << 20) == [big]  # alone, though larger than max_rows
    assert take_merge(queue, max_rows=4, max_bytes=1 << 20) == [a, c]  # b would make 5 rows
    assert list(queue) == [b]
    heavy = [pending(5, 1, nbytes=600) for _ in range(4)]
    queue = waiting(*heavy)
    assert take_merge(queue, max_rows=64, max_bytes=1000) == heavy[:2]  # the first's bytes do not count


async def test_requests_whose_callers_gave_up_are_dropped():
    gone, a, also_gone, b = pending(5, 1, done=True), pending(5, 1), pending(5, 1, done=True), pending(5, 1)
    queue = waiting(gone, a, also_gone, b)
    assert take_merge(queue, max_rows=1, max_bytes=1 << 20) == [a]
    assert list(queue) == [b]


async def test_max_rows_of_one_never_merges():
    queue = waiting(pending(5, 1), pending(5, 1))
    assert len(take_merge(queue, max_rows=1, max_bytes=1 << 20)) == 1 and len(queue) == 1


# -- the engine ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started(**limits):
    """A started engine over a FakeRuntime, and its metrics' registry."""
    registry = CollectorRegistry()
    engine = Engine(FakeRuntime(), limits_with(**limits), Metrics(registry))
    await engine.start()
    try:
        yield engine, registry
    finally:
        await engine.stop()


@pytest.fixture
async def engine():
    async with started(max_batch_size=8, max_predict_batch=6) as served:
        yield served


def sequences(seq_len: int, batch: int, value: float) -> np.ndarray:
    """Inputs whose every step sums to `value` (the fake's 2 inputs)."""
    x = np.zeros((seq_len, batch, 2), np.float32)
    x[..., 0] = value
    return x


async def predicts_behind_a_busy_model(engine, calls: list[tuple]) -> list:
    """Holds the model on a first Predict, queues `calls` behind it, releases; returns each call's outcome."""
    engine.runtime.gate.clear()
    first = asyncio.ensure_future(engine.predict(sequences(1, 1, 0.0)))
    await asyncio.sleep(0.05)  # the first call is on the model thread now
    queued = [asyncio.ensure_future(engine.predict(*call)) for call in calls]
    await asyncio.sleep(0.05)
    engine.runtime.gate.set()
    await first
    return await asyncio.gather(*queued, return_exceptions=True)


def merged_total(registry) -> float:
    return registry.get_sample_value("lstmserve_predict_merged_total", {"model": "fake", "version": "0"})


async def test_predicts_waiting_for_the_model_share_one_call_and_are_split_back(engine):
    engine, registry = engine
    h0 = np.full((1, 2, 3), 10.0, np.float32)
    calls = [(sequences(4, 1, 1.0),), (sequences(4, 2, 2.0), h0, h0), (sequences(3, 1, 5.0),),
             (sequences(4, 3, 3.0),)]
    (y1, h1, c1), (y2, h2, c2), (y3, _, _), (y4, _, _) = await predicts_behind_a_busy_model(engine, calls)
    assert engine.runtime.batch_sizes == [1, 6, 1]  # 1 + 2 + 3 rows of seq_len 4 merged; seq_len 3 alone
    assert merged_total(registry) == 3
    np.testing.assert_allclose(y1[:, 0, 0], [1, 2, 3, 4])
    np.testing.assert_allclose(y2[:, :, 0], [[12, 12], [14, 14], [16, 16], [18, 18]])  # from h0 = 10
    np.testing.assert_allclose(c2[0, :, 0], [14, 14])
    np.testing.assert_allclose(y3[:, 0, 0], [5, 10, 15])
    assert y4.shape == (4, 3, 3) and h1.shape == c1.shape == (1, 1, 3) and h2.shape == (1, 2, 3)


async def test_a_failed_call_fails_only_its_own_requests(engine):
    engine, _ = engine
    poisoned = sequences(4, 1, 1.0)
    poisoned[2, 0, 1] = FAIL_MARKER
    calls = [(sequences(4, 1, 1.0),), (poisoned,), (sequences(2, 1, 1.0),)]
    first, second, other = await predicts_behind_a_busy_model(engine, calls)
    assert isinstance(first, ModelFailure) and isinstance(second, ModelFailure)
    np.testing.assert_allclose(other[0][:, 0, 0], [1, 2])
    np.testing.assert_allclose((await engine.predict(sequences(4, 1, 1.0)))[0][:, 0, 0], [1, 2, 3, 4])


async def test_with_max_predict_batch_one_each_predict_has_its_own_call():
    async with started(max_predict_batch=1) as (engine, registry):
        await predicts_behind_a_busy_model(engine, [(sequences(4, 1, 1.0),)] * 3)
        assert engine.runtime.batch_sizes == [1, 1, 1, 1] and merged_total(registry) == 0


async def test_a_cancelled_predict_fails_none_of_the_predicts_merged_with_it(engine):
    """Cancelled while it waits, it leaves the next call; cancelled while its merged call runs, its share is
    dropped: either way the others are answered (a stream's Predict is cancelled when its client goes away)."""
    engine, _ = engine
    engine.runtime.gate.clear()
    running = [asyncio.ensure_future(engine.predict(sequences(4, 1, value))) for value in (1.0, 2.0, 3.0)]
    await asyncio.sleep(0.05)  # merged into one call, held on the model thread
    waiting = [asyncio.ensure_future(engine.predict(sequences(4, 1, value))) for value in (4.0, 5.0, 6.0)]
    await asyncio.sleep(0.05)
    running[1].cancel()
    waiting[1].cancel()
    engine.runtime.gate.set()
    answers = await asyncio.gather(*running, *waiting, return_exceptions=True)
    assert engine.runtime.batch_sizes == [3, 2]
    assert isinstance(answers[1], asyncio.CancelledError) and isinstance(answers[4], asyncio.CancelledError)
    for (outputs, _, _), value in zip([answers[i] for i in (0, 2, 3, 5)], (1.0, 3.0, 4.0, 6.0), strict=True):
        np.testing.assert_allclose(outputs[:, 0, 0], value * np.arange(1, 5))
