"""The engine with a fake runtime: ordering, batching limits, exactly-once numbering, failure isolation."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import (
    Engine,
    InvalidInput,
    LimitExceeded,
    ModelFailure,
    SequenceError,
    SessionNotFound,
)
from server.metrics import Metrics
from tests.fakes import FAIL_MARKER, FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit


@pytest.fixture
async def engine():
    runtime = FakeRuntime()
    limits = limits_with(max_batch_size=4, initial_capacity=2, max_sessions=64, max_queued_requests=50,
                         answers_kept=2)
    engine = Engine(runtime, limits, Metrics(CollectorRegistry()))
    await engine.start()
    yield engine
    await engine.stop()


async def applied(engine, session_id, inputs, seq=0) -> np.ndarray:
    """Submits a step and waits for its outputs."""
    _, answer = await engine.step(session_id, inputs, seq)
    return (await answer).outputs


STATE_OF_ONES = np.ones((1, 3), np.float32)  # one session's h or c in the fake (1 layer, hidden 3)


def x(*values) -> np.ndarray:
    """Steps of the fake's 2 inputs whose sum is each given value."""
    return np.array([[v, 0.0] for v in values], dtype=np.float32)


async def test_requests_of_a_session_apply_in_order_with_state_carried(engine):
    sid = (await engine.create_session()).session_id
    futures = [(await engine.step(sid, x(v)))[1] for v in (1, 2, 3)]
    outputs = [float(y.outputs[0, 0]) for y in await asyncio.gather(*futures)]
    assert outputs == [1.0, 3.0, 6.0]
    seq, h, c = await engine.get_state(sid)
    assert (seq, float(h[0, 0]), float(c[0, 0])) == (3, 6.0, 3.0)


async def test_many_sessions_share_a_model_call_up_to_max_batch_size(engine):
    engine.runtime.gate.clear()  # hold the first batch so the rest queue up behind it
    sids = [(await engine.create_session()).session_id for _ in range(10)]
    futures = [(await engine.step(sid, x(i)))[1] for i, sid in enumerate(sids)]
    await asyncio.sleep(0.05)
    engine.runtime.gate.set()
    outputs = await asyncio.gather(*futures)
    assert [float(y.outputs[0, 0]) for y in outputs] == list(range(10))
    assert max(engine.runtime.batch_sizes) == 4
    assert sum(engine.runtime.batch_sizes) == 10
    assert len(engine.runtime.batch_sizes) < 10


async def test_chunks_of_different_lengths_are_each_applied_whole(engine):
    a, b = (await engine.create_session()).session_id, (await engine.create_session()).session_id
    ya = (await engine.step(a, x(1, 1, 1)))[1]
    yb = (await engine.step(b, x(5)))[1]
    assert (await ya).outputs[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert (await yb).outputs[:, 0].tolist() == [5.0]


async def test_retried_sequence_number_returns_stored_answer_without_applying_again(engine):
    sid = (await engine.create_session()).session_id
    first = await applied(engine, sid, x(2), seq=1)
    again = await applied(engine, sid, x(2), seq=1)
    np.testing.assert_array_equal(first, again)
    assert (await engine.get_state(sid))[1][0, 0] == 2.0
    assert (await engine.get_session(sid)).steps_applied == 1


async def test_a_sequence_number_reused_with_other_inputs_is_refused_without_change(engine):
    sid = (await engine.create_session()).session_id
    await applied(engine, sid, x(2), seq=1)
    for other in (x(100), x(2, 2)):  # other values, or another shape
        with pytest.raises(SequenceError, match="sequence number 1 was already applied with other inputs"):
            await engine.step(sid, other, seq=1)
    _, reset_to_zeros = await engine.reset(sid, seq=2)
    await reset_to_zeros
    with pytest.raises(SequenceError, match="sequence number 2 was already applied with other inputs"):
        await engine.reset(sid, STATE_OF_ONES, STATE_OF_ONES, seq=2)
    assert (await engine.get_state(sid))[0] == 2
    assert (await engine.get_session(sid)).steps_applied == 1


async def test_a_queued_request_retried_with_other_inputs_is_refused(engine):
    sid = (await engine.create_session()).session_id
    _, queued = await engine.step(sid, x(3), seq=1)  # not applied yet: the batch loop has not run
    with pytest.raises(SequenceError, match="sequence number 1 was already applied with other inputs"):
        await engine.step(sid, x(4), seq=1)
    _, retried = await engine.step(sid, x(3), seq=1)
    np.testing.assert_array_equal((await queued).outputs, (await retried).outputs)
    assert (await engine.get_state(sid))[1][0, 0] == 3.0


async def test_gap_or_old_sequence_number_is_rejected_without_change(engine):
    sid = (await engine.create_session()).session_id
    for seq in (1, 2, 3):
        await applied(engine, sid, x(1), seq=seq)
    with pytest.raises(SequenceError, match="expected 4"):
        await engine.step(sid, x(1), seq=5)
    with pytest.raises(SequenceError, match="last 2 requests are kept; expected 4"):
        await engine.step(sid, x(1), seq=1)  # answers_kept=2: only 2 and 3 can still be replayed
    assert (await engine.get_state(sid))[0] == 3


async def test_the_last_answers_kept_are_replayed_in_any_order_without_applying(engine):
    sid = (await engine.create_session()).session_id
    answers = [await applied(engine, sid, x(v), seq=seq) for seq, v in ((1, 1), (2, 2), (3, 3))]
    for seq in (2, 3, 2):
        np.testing.assert_array_equal(await applied(engine, sid, x(seq), seq=seq), answers[seq - 1])
    assert (await engine.get_session(sid)).steps_applied == 3
    assert float((await engine.get_state(sid))[1][0, 0]) == 6.0


async def test_failing_model_call_fails_only_its_batch_and_changes_no_state(engine):
    healthy, doomed = (await engine.create_session()).session_id, (await engine.create_session()).session_id
    await applied(engine, healthy, x(1))
    await applied(engine, doomed, x(1))
    before = await engine.get_state(doomed)
    engine.runtime.gate.clear()
    blocker = (await engine.step(healthy, x(1)))[1]  # in flight while the next two queue
    await asyncio.sleep(0.05)
    bad = (await engine.step(doomed, x(FAIL_MARKER)))[1]
    behind_bad = (await engine.step(doomed, x(1)))[1]
    engine.runtime.gate.set()
    assert float((await blocker).outputs[0, 0]) == 2.0
    with pytest.raises(ModelFailure):
        await bad
    with pytest.raises(SequenceError, match="resend from sequence number 2"):
        await behind_bad
    after = await engine.get_state(doomed)
    assert after[0] == before[0] == 1
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[2], before[2])
    assert float((await applied(engine, doomed, x(1), seq=2))[0, 0]) == 2.0  # the session goes on


async def test_reset_is_ordered_behind_pending_steps(engine):
    sid = (await engine.create_session()).session_id
    engine.runtime.gate.clear()
    step = (await engine.step(sid, x(4)))[1]
    _, reset = await engine.reset(sid, h=np.full((1, 3), 10.0, np.float32))
    engine.runtime.gate.set()
    await step
    await reset
    _, h, c = await engine.get_state(sid)
    assert h.tolist() == [[10.0] * 3] and c.tolist() == [[0.0] * 3]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((1, 3), np.float32), "expected \\[N, 2\\]"),
    (np.zeros((0, 2), np.float32), "empty"),
    (np.array([[np.nan, 0]], np.float32), "NaN or Inf"),
])
async def test_invalid_steps_are_rejected_before_queueing(engine, bad, message):
    sid = (await engine.create_session()).session_id
    with pytest.raises(InvalidInput, match=message):
        await engine.step(sid, bad, seq=1)
    assert (await engine.get_session(sid)).last_sequence_number == 0
    assert float((await applied(engine, sid, x(1), seq=1))[0, 0]) == 1.0


async def test_requests_over_the_step_limit_are_refused_naming_the_limit(engine):
    sid = (await engine.create_session()).session_id
    with pytest.raises(LimitExceeded, match="max_steps_per_request"):
        await engine.step(sid, np.zeros((2000, 2), np.float32), seq=1)
    assert (await engine.get_session(sid)).last_sequence_number == 0


async def test_closed_session_is_gone_and_its_slot_reused(engine):
    sid = (await engine.create_session()).session_id
    await applied(engine, sid, x(7))
    await engine.close_session(sid)
    with pytest.raises(SessionNotFound):
        await engine.get_session(sid)
    fresh = (await engine.create_session()).session_id
    assert (await engine.get_state(fresh))[1].tolist() == [[0.0, 0.0, 0.0]]


async def test_state_pool_grows_to_max_sessions_then_refuses(engine):
    for _ in range(64):
        await engine.create_session()
    with pytest.raises(LimitExceeded, match="max_sessions"):
        await engine.create_session()


async def test_idle_sessions_expire():
    engine = Engine(FakeRuntime(), limits_with(idle_timeout=0.05), Metrics(CollectorRegistry()))
    await engine.start()
    try:
        sid = (await engine.create_session()).session_id
        for _ in range(100):
            await asyncio.sleep(0.02)
            try:
                await engine.get_session(sid)
            except SessionNotFound:
                break
        with pytest.raises(SessionNotFound):
            await engine.get_session(sid)
    finally:
        await engine.stop()


async def test_a_retry_is_answered_when_the_original_caller_went_away(engine):
    """A stream handler cancelled while it awaits an answer cancels that future (a task's cancel cancels what it
    awaits): retries of the request, sent before or after, are still answered when it runs. They waited forever,
    the request applied but its answer given to nobody (an abandoned Stream, settled by a unary Step)."""
    sid = (await engine.create_session()).session_id
    engine.runtime.gate.clear()  # hold the model: every request below is queued or in flight meanwhile
    originals = [(await engine.step(sid, x(v), seq))[1] for seq, v in ((1, 1), (2, 2), (3, 3))]
    early = (await engine.step(sid, x(2), seq=2))[1]
    handlers = [asyncio.create_task(_answer_of(future)) for future in originals[:2]]
    await asyncio.sleep(0)  # the handlers await the answers
    for handler in handlers:
        handler.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    late = [(await engine.step(sid, x(v), seq))[1] for seq, v in ((1, 1), (2, 2))]
    engine.runtime.gate.set()
    answers = await asyncio.wait_for(asyncio.gather(early, *late, originals[2]), 10)  # a bound, not a timing
    assert [float(a.outputs[0, 0]) for a in answers] == [3.0, 1.0, 3.0, 6.0]
    assert (await engine.get_session(sid)).steps_applied == 3


async def _answer_of(future: asyncio.Future):
    return await future
