"""The model thread every engine shares: each lane's calls in order, lanes served in turn, errors handed back."""

import asyncio
import threading

import pytest

from server.engine.errors import Draining
from server.engine.model_thread import ModelThread

pytestmark = pytest.mark.unit


@pytest.fixture
def model_thread():
    thread = ModelThread(torch_threads=1)
    yield thread
    thread.close()


async def test_lanes_with_work_waiting_are_served_in_turn(model_thread):
    busy, quiet = model_thread.lane(), model_thread.lane()
    started, gate = threading.Event(), threading.Event()
    ran: list[str] = []
    blocker = asyncio.ensure_future(busy.run(lambda: started.set() or gate.wait()))  # holds the thread
    await asyncio.to_thread(started.wait)
    calls = [asyncio.ensure_future(busy.run(ran.append, f"busy{i}")) for i in range(4)]
    calls += [asyncio.ensure_future(quiet.run(ran.append, f"quiet{i}")) for i in range(2)]
    await asyncio.sleep(0)  # every call is queued once its task has started
    gate.set()
    await asyncio.gather(blocker, *calls)
    # first come first served would run every busy call first
    assert ran == ["busy0", "quiet0", "busy1", "quiet1", "busy2", "busy3"]


async def test_a_call_returns_its_result_or_raises_its_error(model_thread):
    lane = model_thread.lane()
    assert await lane.run(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await lane.run(lambda: 1 / 0)
    assert threading.current_thread().name != await lane.run(lambda: threading.current_thread().name)


async def test_a_closed_thread_takes_no_more_calls(model_thread):
    lane = model_thread.lane()
    await asyncio.to_thread(model_thread.close)
    with pytest.raises(RuntimeError, match="closed"):
        await lane.run(sum, [1])


async def test_calls_still_queued_at_close_are_refused_not_left_waiting(model_thread):
    lane = model_thread.lane()
    started, gate = threading.Event(), threading.Event()
    running = asyncio.ensure_future(lane.run(lambda: started.set() or gate.wait() and "finished"))
    await asyncio.to_thread(started.wait)
    queued = asyncio.ensure_future(lane.run(sum, [1]))
    await asyncio.sleep(0)  # queued behind the running call
    closing = asyncio.ensure_future(asyncio.to_thread(model_thread.close))
    while not model_thread._closing:  # the gate opens only once close() has begun, or the thread takes `queued`
        await asyncio.sleep(0.001)
    gate.set()
    await closing
    assert await running == "finished"  # the call in progress finishes
    with pytest.raises(Draining):
        await asyncio.wait_for(queued, 5)
