"""The columnar path with a fake runtime: per-entry exactly-once, errors that stay with their entry, the fallback to
the ordinary queue, retries in flight, model failures and sessions closed mid-flight."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, InvalidInput, LimitExceeded, ModelFailure, SequenceError, SessionNotFound
from server.engine.flights import digests
from server.engine.sessions import inputs_digest
from server.metrics import Metrics
from tests.fakes import FAIL_MARKER, FakeRuntime, HeldStore
from tests.limits import limits_with

pytestmark = pytest.mark.unit


@pytest.fixture
async def engine():
    limits = limits_with(max_batch_size=4, initial_capacity=2, max_sessions=64, max_queued_requests=50,
                         answers_kept=2)
    engine = Engine(FakeRuntime(), limits, Metrics(CollectorRegistry()))
    await engine.start()
    yield engine
    await engine.stop()


def columns(*values, steps: int = 1) -> np.ndarray:
    """One entry per value, each of `steps` steps whose inputs sum to that value (the fake has 2 inputs)."""
    x = np.zeros((len(values), steps, 2), np.float32)
    x[:, :, 0] = np.asarray(values, np.float32)[:, None]
    return x


async def sessions(engine, count: int) -> list[str]:
    return [(await engine.create_session()).session_id for _ in range(count)]


async def answered(engine, ids, inputs, seqs=()):
    return await (await engine.step_columns(ids, list(seqs), inputs))


async def test_entries_apply_like_steps_over_several_messages_in_chunks_of_max_batch_size(engine):
    ids = await sessions(engine, 10)
    for message in range(3):
        answer = await answered(engine, ids, columns(*range(10)))
        assert answer.errors == {}
        assert answer.sequence_numbers == [message + 1] * 10
        assert answer.outputs[:, 0, 0].tolist() == [float(v * (message + 1)) for v in range(10)]
    assert engine.runtime.batch_sizes[-3:] == [4, 4, 2]  # max_batch_size=4
    seq, h, c = await engine.get_state(ids[9])
    assert (seq, float(h[0, 0]), float(c[0, 0])) == (3, 27.0, 3.0)
    assert engine.queued_requests == 0


async def test_a_failed_entry_changes_nothing_and_the_others_proceed(engine):
    ids = await sessions(engine, 3)
    other_owner = (await engine.create_session(owner="someone else")).session_id
    inputs = columns(1, 2, 3, 4, 5, 6)
    inputs[3, 0, 1] = np.nan
    answer = await answered(engine, [ids[0], "x" * 22, ids[1], ids[2], other_owner, "short"], inputs,
                            [1, 1, 2, 1, 1, 1])
    assert sorted(answer.errors) == [1, 2, 3, 4, 5]
    assert isinstance(answer.errors[1], SessionNotFound) and isinstance(answer.errors[4], SessionNotFound)
    assert isinstance(answer.errors[2], SequenceError) and answer.errors[2].expected == 1
    assert isinstance(answer.errors[3], InvalidInput) and answer.errors[3].field == "inputs[3]"
    assert isinstance(answer.errors[5], InvalidInput) and answer.errors[5].field == "session_ids[5]"
    assert answer.outputs[:, 0, 0].tolist() == [1.0, 0, 0, 0, 0, 0]
    for sid in (ids[1], ids[2]):
        assert (await engine.get_state(sid))[0] == 0
    assert (await engine.get_state(other_owner, owner="someone else"))[0] == 0


async def test_a_model_of_several_layers_gets_each_chunks_state_contiguous_as_cudnn_requires():
    limits = limits_with(max_batch_size=4, initial_capacity=2, max_sessions=64)
    engine = Engine(FakeRuntime(num_layers=2), limits, Metrics(CollectorRegistry()))
    await engine.start()
    try:
        ids = await sessions(engine, 10)
        answer = await answered(engine, ids, columns(*range(10)))
        assert answer.errors == {} and answer.outputs[:, 0, 0].tolist() == [float(v) for v in range(10)]
        assert engine.runtime.batch_sizes[-3:] == [4, 4, 2]
    finally:
        await engine.stop()


async def test_a_resent_message_is_answered_again_without_applying_it_twice(engine):
    ids = await sessions(engine, 3)
    first = await answered(engine, ids, columns(1, 2, 3), [1, 1, 1])
    again = await answered(engine, ids, columns(1, 2, 3), [1, 1, 1])
    assert again.errors == {} and np.array_equal(first.outputs, again.outputs)
    assert [(await engine.get_state(sid))[0] for sid in ids] == [1, 1, 1]
    reused = await answered(engine, ids, columns(1, 2, 4), [1, 1, 1])
    assert sorted(reused.errors) == [2] and "other inputs" in str(reused.errors[2])


async def test_a_session_twice_in_a_message_and_one_with_queued_work_take_the_queue_in_order(engine):
    ids = await sessions(engine, 2)
    engine.runtime.gate.clear()
    _, queued = await engine.step(ids[1], columns(5)[0])
    pending = await engine.step_columns([ids[0], ids[0], ids[1]], [], columns(1, 2, 3))
    engine.runtime.gate.set()
    answer = await pending
    assert answer.errors == {} and answer.sequence_numbers == [1, 2, 2]
    assert answer.outputs[:, 0, 0].tolist() == [1.0, 3.0, 8.0]
    assert (await queued).outputs[0, 0] == 5.0


async def test_a_retry_of_an_entry_in_flight_waits_for_its_answer(engine):
    ids = await sessions(engine, 2)
    engine.runtime.gate.clear()
    first = await engine.step_columns(ids, [1, 1], columns(1, 2))
    await asyncio.sleep(0.05)  # the first message is in the model call
    retry = await engine.step_columns(ids, [1, 1], columns(1, 2))
    engine.runtime.gate.set()
    assert np.array_equal((await first).outputs, (await retry).outputs)
    assert (await retry).errors == {}
    assert [(await engine.get_state(sid))[0] for sid in ids] == [1, 1]


async def test_an_entry_repeated_in_its_own_message_is_answered_as_a_retry_and_applied_once(engine):
    ids = await sessions(engine, 2)
    answer = await answered(engine, [ids[0], ids[0], ids[1], ids[1]], columns(3, 3, 4, 4), [1, 1, 0, 1])
    assert answer.errors == {} and answer.sequence_numbers == [1, 1, 1, 1]
    assert answer.outputs[:, 0, 0].tolist() == [3.0, 3.0, 4.0, 4.0]
    assert [(await engine.get_state(sid))[0] for sid in ids] == [1, 1] and engine.queued_requests == 0


async def test_a_model_failure_fails_the_flight_and_what_queued_behind_it(engine):
    ids = await sessions(engine, 2)
    answer = await answered(engine, [ids[0], ids[1], ids[0]], columns(1, FAIL_MARKER, 2))
    assert isinstance(answer.errors[0], ModelFailure) and isinstance(answer.errors[1], ModelFailure)
    assert isinstance(answer.errors[2], SequenceError)
    assert [(await engine.get_state(sid))[0] for sid in ids] == [0, 0]
    assert (await answered(engine, ids, columns(1, 2), [1, 1])).errors == {}
    assert engine.queued_requests == 0


async def test_a_session_closed_in_flight_fails_what_queued_behind_it_and_frees_its_slot(engine):
    (sid,) = await sessions(engine, 1)
    engine.runtime.gate.clear()
    pending = await engine.step_columns([sid, sid], [], columns(1, 2))
    await asyncio.sleep(0.05)
    await engine.close_session(sid)
    engine.runtime.gate.set()
    answer = await pending
    assert list(answer.errors) == [1] and isinstance(answer.errors[1], SessionNotFound)
    assert engine.queued_requests == 0


async def test_limits_refuse_entries_and_a_misshapen_message_is_refused_whole(engine):
    ids = await sessions(engine, 2)
    with pytest.raises(InvalidInput, match="inputs has shape"):
        await engine.step_columns(ids, [], columns(1, 2, 3))
    with pytest.raises(InvalidInput, match="sequence numbers"):
        await engine.step_columns(ids, [1], columns(1, 2))
    too_long = await answered(engine, ids, columns(1, 2, steps=engine.limits.max_steps_per_request + 1))
    assert all(isinstance(error, LimitExceeded) for error in too_long.errors.values()) and len(too_long.errors) == 2


def test_entry_digests_are_those_of_single_requests():
    inputs = np.random.default_rng(0).standard_normal((3, 4, 2)).astype(np.float32)
    digest = digests(inputs)
    assert [digest(i) for i in range(3)] == [inputs_digest(b"step", row) for row in inputs]


async def test_a_caller_that_goes_away_does_not_stop_its_message(engine):
    ids = await sessions(engine, 2)
    (await engine.step_columns(ids, [], columns(1, 2))).cancel()  # a stream cancelled before the answer
    retried = await answered(engine, ids, columns(1, 2), [1, 1])  # the client's retry finds it applied
    assert retried.errors == {} and retried.outputs[:, 0, 0].tolist() == [1.0, 2.0]
    assert [(await engine.get_state(sid))[0] for sid in ids] == [1, 1] and engine.queued_requests == 0


@pytest.mark.parametrize("wants_commits", [False, True], ids=["flight", "queue"])  # True: Redis's, no flights
async def test_a_session_closed_while_the_message_awaits_the_store_for_another_is_refused_and_its_slot_spared(
        wants_commits):
    store = HeldStore()
    store.wants_commits = wants_commits
    engine = Engine(FakeRuntime(), limits_with(max_batch_size=4), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    try:
        closed, held = await sessions(engine, 2)
        release = store.hold("refresh", held)
        message = asyncio.ensure_future(engine.step_columns([closed, held], [], columns(5, 7)))
        await asyncio.sleep(0.01)  # the first session is found, the second's refresh waits
        await engine.close_session(closed)
        (reused,) = await sessions(engine, 1)  # takes the closed session's slot
        release.set()
        answer = await (await message)
        assert list(answer.errors) == [0] and isinstance(answer.errors[0], SessionNotFound)
        assert answer.outputs[1, 0, 0] == 7.0
        seq, h, _ = await engine.get_state(reused)
        assert (seq, float(h[0, 0])) == (0, 0.0)
        assert engine.queued_requests == 0
    finally:
        await engine.stop()
