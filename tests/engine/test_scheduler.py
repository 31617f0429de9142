"""The batch loop on its own: order within a session, a failed head request, stopping with work queued."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from server.engine import Draining, ModelFailure, SequenceError, StepAnswer
from server.engine.scheduler import Scheduler
from server.engine.sessions import SessionTable, Work
from server.engine.state_pool import StatePool
from server.metrics import Metrics
from server.store import MemoryStore
from tests.fakes import FAIL_MARKER, FakeRuntime

pytestmark = pytest.mark.unit


@pytest.fixture
async def parts():
    """A started scheduler over a fake model, with a session table and pool to make sessions from."""
    runtime = FakeRuntime()
    pool = StatePool(1, 3, 4, 16)
    scheduler = Scheduler(runtime, pool, Metrics(CollectorRegistry()), max_batch_size=8, max_batch_delay=0.0,
                          answers_kept=4, torch_threads=1, store=MemoryStore(), model="fake")
    scheduler.start()
    yield runtime, pool, SessionTable(), scheduler
    await scheduler.stop()


def new_session(pool, table):
    return table.add(pool.allocate(torch.zeros(1, 3), torch.zeros(1, 3)), owner="")


def queue(scheduler, session, value: float, seq: int) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    scheduler.enqueue(session, Work(seq, future, inputs=np.array([[value, 0.0]], np.float32)))
    return future


async def test_a_sessions_requests_apply_in_order_each_on_the_state_the_last_left(parts):
    _, pool, table, scheduler = parts
    session = new_session(pool, table)
    answers = await asyncio.gather(*(queue(scheduler, session, v, seq) for seq, v in enumerate((1, 2, 3), 1)))
    assert [float(a.outputs[0, 0]) for a in answers] == [1.0, 3.0, 6.0]  # h accumulates the inputs in order
    assert all(isinstance(a, StepAnswer) and a.state is None for a in answers)
    assert (session.last_applied_seq, session.steps_applied) == (3, 3)
    assert [kept.seq for kept in session.answers] == [1, 2, 3]
    assert scheduler.queued == 0


async def test_sessions_ready_together_share_one_model_call(parts):
    runtime, pool, table, scheduler = parts
    runtime.gate.clear()
    sessions = [new_session(pool, table) for _ in range(5)]
    futures = [queue(scheduler, s, i, 1) for i, s in enumerate(sessions)]
    await asyncio.sleep(0.05)
    runtime.gate.set()
    await asyncio.gather(*futures)
    assert runtime.batch_sizes == [5]


async def test_a_failed_head_request_fails_those_behind_it_and_leaves_the_state(parts):
    _, pool, table, scheduler = parts
    session = new_session(pool, table)
    await queue(scheduler, session, 1, 1)
    doomed, behind = queue(scheduler, session, FAIL_MARKER, 2), queue(scheduler, session, 1, 3)
    with pytest.raises(ModelFailure):
        await doomed
    with pytest.raises(SequenceError, match="resend from sequence number 2"):
        await behind
    assert (session.last_applied_seq, session.last_assigned_seq) == (1, 1)
    assert float(pool.read(session.slot)[0][0, 0]) == 1.0  # the failed call changed nothing
    assert float((await queue(scheduler, session, 1, 2)).outputs[0, 0]) == 2.0  # resent, it goes on
    assert scheduler.queued == 0


async def test_stopping_fails_the_request_in_flight_and_those_queued_as_draining(parts):
    runtime, pool, table, scheduler = parts
    session = new_session(pool, table)
    runtime.gate.clear()
    in_flight, queued = queue(scheduler, session, 1, 1), queue(scheduler, session, 1, 2)
    await asyncio.sleep(0.05)
    threading.Timer(0.1, runtime.gate.set).start()  # stop() waits for the model thread, blocking the loop
    await scheduler.stop()
    with pytest.raises(Draining, match="stopped before request 1 ran"):
        await in_flight
    with pytest.raises(SequenceError, match="resend from sequence number 1"):
        await queued
    assert scheduler.queued == 0
