"""The engine through its one seam to stored sessions, with an in-process fake store that records each call."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, SessionNotFound, StateUnavailable
from server.engine.sessions import inputs_digest
from server.metrics import Metrics
from server.store import KeptAnswer, MemoryStore, SessionGone, SessionRecord, StoreUnavailable
from tests.fakes import FakeRuntime, HeldStore
from tests.limits import limits_with

pytestmark = pytest.mark.unit

OWNER = "alice"
STORED_ID = "S" * 22
RETRIED = np.zeros((1, 2), np.float32)  # the inputs of the stored session's last request


class FakeStore(MemoryStore):
    """Records what the engine asks; `stored` plays the records other processes wrote."""

    local = False
    wants_commits = True
    local = False

    def __init__(self):
        self.calls: list[tuple] = []
        self.stored: dict[str, SessionRecord] = {}
        self.commit_error: StoreUnavailable | None = None
        self.gone: set[str] = set()
        self.every = 1  # takes the record of every `every`-th step, as checkpoint mode does

    def takes(self, session_id, steps_applied):
        return steps_applied % self.every == 0

    async def load(self, session_id, owner):
        self.calls.append(("load", session_id, owner))
        record = self.stored.get(session_id)
        return record if record is not None and record.owner == owner else None

    async def refresh(self, session_id):
        self.calls.append(("refresh", session_id))
        if session_id in self.gone:
            raise SessionGone("ended elsewhere")
        return self.stored.pop(session_id, None)

    async def created(self, record):
        self.calls.append(("created", record))

    async def commit(self, records):
        self.calls.append(("commit", records))
        return [self.commit_error] * len(records)

    async def release(self, session_id, delete):
        self.calls.append(("release", session_id, delete))

    async def hand_over(self, records):
        self.calls.append(("hand_over", records))

    def of(self, kind: str) -> list[tuple]:
        return [call for call in self.calls if call[0] == kind]


@pytest.fixture
async def engine_and_store():
    store = FakeStore()
    engine = Engine(FakeRuntime(), limits_with(answers_kept=2), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    yield engine, store
    await engine.stop()


def x(value: float) -> np.ndarray:
    return np.array([[value, 0.0]], np.float32)


def stored_record(seq: int = 7, h: float = 5.0) -> SessionRecord:
    state = np.full((1, 3), h, np.float32)
    kept = KeptAnswer(seq, state, inputs_digest(b"step", RETRIED))
    return SessionRecord(STORED_ID, OWNER, "model", 1234.5, seq, 9, state, state, (kept,))


async def test_a_new_session_is_handed_to_the_store_before_it_is_acknowledged(engine_and_store):
    engine, store = engine_and_store
    view = await engine.create_session(owner=OWNER)
    (_, record), = store.of("created")
    assert (record.session_id, record.owner, record.created_at) == (view.session_id, OWNER, view.created_at)
    assert (record.last_applied_seq, record.steps_applied, record.answers) == (0, 0, ())


async def test_each_committed_step_carries_its_state_and_kept_answers(engine_and_store):
    engine, store = engine_and_store
    sid = (await engine.create_session(owner=OWNER)).session_id
    for seq, value in enumerate((1.0, 2.0, 3.0), 1):
        await (await engine.step(sid, x(value), seq=seq, owner=OWNER))[1]
    records = [call[1][0] for call in store.of("commit")]
    assert [r.last_applied_seq for r in records] == [1, 2, 3]
    assert [[kept.seq for kept in r.answers] for r in records] == [[1], [1, 2], [2, 3]]  # answers_kept=2
    assert float(records[-1].h[0, 0]) == 6.0 and float(records[-1].answers[-1].answer[0, 0]) == 6.0


async def test_only_the_records_the_store_takes_are_built_and_committed(engine_and_store):
    engine, store = engine_and_store
    store.every = 2
    sid = (await engine.create_session(owner=OWNER)).session_id
    outputs = [(await (await engine.step(sid, x(1.0), seq=seq, owner=OWNER))[1]).outputs for seq in range(1, 5)]
    assert [float(o[0, 0]) for o in outputs] == [1.0, 2.0, 3.0, 4.0]  # every step applied and answered
    assert [(r.steps_applied, float(r.h[0, 0])) for call in store.of("commit") for r in call[1]] == [(2, 2.0), (4, 4.0)]


async def test_a_commit_the_store_refuses_is_unavailable_and_changes_nothing(engine_and_store):
    engine, store = engine_and_store
    sid = (await engine.create_session(owner=OWNER)).session_id
    await (await engine.step(sid, x(1.0), seq=1, owner=OWNER))[1]
    store.commit_error = StoreUnavailable("store down", retry_after=0.5)
    _, refused = await engine.step(sid, x(1.0), seq=2, owner=OWNER)
    with pytest.raises(StateUnavailable, match="store down") as error:
        await refused
    assert error.value.retry_after == 0.5
    seq, h, _ = await engine.get_state(sid, owner=OWNER)
    assert (seq, float(h[0, 0])) == (1, 1.0)


async def test_a_session_not_live_here_is_loaded_from_the_store_for_its_owner_only(engine_and_store):
    engine, store = engine_and_store
    store.stored[STORED_ID] = stored_record()
    with pytest.raises(SessionNotFound):
        await engine.get_session(STORED_ID, owner="mallory")
    view = await engine.get_session(STORED_ID, owner=OWNER)
    assert (view.last_sequence_number, view.steps_applied, view.created_at) == (7, 9, 1234.5)
    replay = await (await engine.step(STORED_ID, RETRIED, seq=7, owner=OWNER))[1]
    assert float(replay.outputs[0, 0]) == 5.0  # the stored kept answer, not a recomputation
    assert [call[2] for call in store.of("load")] == ["mallory", OWNER]


async def test_a_newer_record_replaces_a_live_sessions_state_and_a_gone_one_is_not_found(engine_and_store):
    engine, store = engine_and_store
    sid = (await engine.create_session(owner=OWNER)).session_id
    store.stored[sid] = SessionRecord(sid, OWNER, "model", 1.0, 4, 4, np.full((1, 3), 8.0, np.float32),
                                      np.zeros((1, 3), np.float32))
    seq, h, _ = await engine.get_state(sid, owner=OWNER)
    assert (seq, float(h[0, 0])) == (4, 8.0)
    store.gone.add(sid)
    with pytest.raises(SessionNotFound):
        await engine.get_state(sid, owner=OWNER)


async def test_closing_and_stopping_release_and_hand_over(engine_and_store):
    engine, store = engine_and_store
    closed = (await engine.create_session(owner=OWNER)).session_id
    kept = (await engine.create_session(owner=OWNER)).session_id
    await engine.close_session(closed, owner=OWNER)
    assert store.of("release") == [("release", closed, True)]
    await engine.stop()
    (_, records), = store.of("hand_over")
    assert [r.session_id for r in records] == [kept]


async def test_columnar_entries_are_looked_up_in_and_committed_to_the_store(engine_and_store):
    engine, store = engine_and_store
    store.stored[STORED_ID] = stored_record(seq=7, h=5.0)
    sid = (await engine.create_session(owner=OWNER)).session_id
    answer = await (await engine.step_columns([sid, STORED_ID], [1, 8], np.stack([x(1.0), x(2.0)]), owner=OWNER))
    assert answer.errors == {} and answer.outputs[:, 0, 0].tolist() == [1.0, 7.0]
    assert ("load", STORED_ID, OWNER) in store.calls and ("refresh", sid) in store.calls
    committed = sorted((r.session_id, r.last_applied_seq) for call in store.of("commit") for r in call[1])
    assert committed == sorted([(sid, 1), (STORED_ID, 8)])


async def test_a_session_closed_while_its_step_awaits_the_store_is_refused_and_its_slot_spared():
    store = HeldStore()
    engine = Engine(FakeRuntime(), limits_with(), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    try:
        closed = (await engine.create_session()).session_id
        release = store.hold("refresh", closed)
        step = asyncio.ensure_future(engine.step(closed, x(5.0)))
        await asyncio.sleep(0.01)  # the step found the session and waits for the store's refresh of it
        await engine.close_session(closed)
        reused = (await engine.create_session()).session_id  # takes the closed session's slot
        release.set()
        with pytest.raises(SessionNotFound):
            await step
        seq, h, _ = await engine.get_state(reused)
        assert (seq, float(h[0, 0])) == (0, 0.0) and engine.queued_requests == 0
    finally:
        await engine.stop()


@pytest.mark.parametrize("meanwhile", ["closed", "used"])
async def test_expiry_spares_a_session_closed_or_used_while_it_awaits_the_store_for_an_earlier_one(meanwhile):
    now = [0.0]
    store = HeldStore()
    engine = Engine(FakeRuntime(), limits_with(idle_timeout=0.04), Metrics(CollectorRegistry()),
                    clock=lambda: now[0], store=store)
    await engine.start()
    try:
        first, other = [(await engine.create_session()).session_id for _ in range(2)]
        release = store.hold("release", first)
        now[0] = 10.0  # both unused past the timeout: the expiry ends the first and waits for the store
        await asyncio.wait_for(store.waiting.wait(), 5)
        later = (await engine.create_session()).session_id
        if meanwhile == "closed":
            await engine.close_session(other)
        else:
            now[0] = 11.0
            await (await engine.step(other, x(1.0)))[1]
        release.set()
        now[0] = 11.03  # the later session is unused past the timeout, the one used at 11 is not
        async with asyncio.timeout(5):  # a later pass ends it: the expiry goes on
            while engine.has_session(later):
                await asyncio.sleep(0.01)
        assert engine.has_session(other) == (meanwhile == "used")
    finally:
        await engine.stop()


async def test_a_session_made_while_an_eviction_awaits_the_store_does_not_take_the_evicting_ones_room():
    store = HeldStore()
    engine = Engine(FakeRuntime(), limits_with(max_sessions=2, initial_capacity=2, full_policy="evict"),
                    Metrics(CollectorRegistry()), store=store)
    await engine.start()
    try:
        oldest, older = [(await engine.create_session()).session_id for _ in range(2)]
        release = store.hold("release", oldest)
        evicting = asyncio.ensure_future(engine.create_session())
        await asyncio.wait_for(store.waiting.wait(), 5)  # the oldest is evicted, its release waits for the store
        meanwhile = (await engine.create_session()).session_id  # takes the room that eviction made
        release.set()
        made = (await evicting).session_id  # evicts again instead of finding the pool full
        assert [engine.has_session(sid) for sid in (oldest, older, meanwhile, made)] == [False, False, True, True]
    finally:
        await engine.stop()


class CheckpointingStore(HeldStore):
    """Maintains as Redis does: awaits the store (held by "maintain"), then takes the record of each session it was
    told of whose lease it still holds (one closed here without being released keeps it)."""

    maintenance_period = 0.01

    def __init__(self):
        super().__init__()
        self.checkpointed: list[str] = []
        self.maintained = asyncio.Event()

    async def maintain(self, live, record_of):
        live = list(live)
        await self._wait("maintain", "")
        self.checkpointed += [r.session_id for s in live if (r := record_of(s.session_id)) is not None]
        self.maintained.set()
        return []


async def test_a_session_closed_while_maintenance_awaits_the_store_is_not_checkpointed_and_maintenance_goes_on():
    store = CheckpointingStore()
    engine = Engine(FakeRuntime(), limits_with(), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    try:
        gone, kept = [(await engine.create_session()).session_id for _ in range(2)]
        release = store.hold("maintain", "")
        await asyncio.wait_for(store.waiting.wait(), 5)  # maintenance was told of both and waits for the store
        store.gone.add(gone)
        with pytest.raises(SessionNotFound):  # it ended on another replica: closed here, its lease not released
            await engine.step(gone, x(1.0))
        release.set()
        for _ in range(2):  # the held call ends, and maintenance goes on
            await asyncio.wait_for(store.maintained.wait(), 5)
            store.maintained.clear()
        assert gone not in store.checkpointed and kept in store.checkpointed
    finally:
        await engine.stop()


async def test_a_newer_record_refreshed_while_another_request_queued_work_does_not_renumber_that_work():
    """Two requests of an idle session both refresh it (with Redis: both find its lapsed lease re-taken); the
    one answered first loads the newer record and queues its step, and the other must not load it again under
    that step: its numbering went back below the queued step's, and both steps were given one number."""
    store, runtime = HeldStore(), FakeRuntime()
    engine = Engine(runtime, limits_with(), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    try:
        sid = (await engine.create_session(owner=OWNER)).session_id
        store.newer[sid] = SessionRecord(sid, OWNER, "model", 1.0, 3, 3, np.full((1, 3), 10.0, np.float32),
                                         np.zeros((1, 3), np.float32))
        release = store.hold("refresh", sid)
        runtime.gate.clear()  # the first step queued stays in the model until both are queued
        later = asyncio.ensure_future(engine.step(sid, x(1.0), owner=OWNER))
        await store.waiting.wait()
        first_seq, first = await engine.step(sid, x(2.0), owner=OWNER)
        release.set()
        later_seq, later_answer = await later
        del store.newer[sid]  # held now: later refreshes have nothing newer
        runtime.gate.set()
        answers = [float((await future).outputs[0, 0]) for future in (first, later_answer)]
        seq, h, _ = await engine.get_state(sid, owner=OWNER)
        assert (first_seq, later_seq, answers) == (4, 5, [12.0, 13.0])
        assert (seq, float(h[0, 0])) == (5, 13.0)
    finally:
        runtime.gate.set()
        await engine.stop()
