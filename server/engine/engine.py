"""The engine's public face: session lifecycle, ordered exactly-once requests, stateless sequences."""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from server.engine.admission import Admission, Eviction
from server.engine.errors import (
    Draining,
    InvalidInput,
    LimitExceeded,
    SequenceError,
    SessionNotFound,
    StateUnavailable,
)
from server.engine.limits import EngineLimits
from server.engine.scheduler import Scheduler, StepAnswer
from server.engine.sessions import Session, SessionTable, Work, check_session_id, inputs_digest, record_of
from server.engine.state_pool import StatePool
from server.engine.validation import check_at_most, check_tensor
from server.logsafe import fingerprint
from server.metrics import Metrics
from server.model import ModelMetadata, ModelRuntime
from server.store import (
    LiveSession,
    MemoryStore,
    SessionGone,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    model_identity,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What clients may know of the served model and the limits its requests meet."""

    metadata: ModelMetadata
    limits: EngineLimits


@dataclasses.dataclass(frozen=True)
class SessionView:
    """A snapshot of a session's bookkeeping, in wall-clock seconds."""

    session_id: str
    steps_applied: int
    last_sequence_number: int
    created_at: float
    last_used_at: float
    expires_at: float
    idle_timeout: float


def _check_same_inputs(seq: int, applied: bytes | None, retried: bytes) -> None:
    if applied is not None and applied != retried:
        raise SequenceError(f"sequence number {seq} was already applied with other inputs; a retry must resend "
                            "the same inputs, and a new request takes the next sequence number")


class Engine:
    """Sessions of one model: their lifecycle, their ordered exactly-once requests, and stateless sequences.
    Sessions are kept beyond this process by one SessionStore, whichever it is."""

    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics, clock=time.monotonic,
                 store: SessionStore | None = None):
        self.runtime = runtime
        self.limits = limits
        self._metrics = metrics
        self._clock = clock
        m = runtime.metadata
        self._admission = Admission(limits, m.state_bytes, clock)
        self._pool = StatePool(m.num_layers, m.hidden_size, limits.initial_capacity, self._admission.capacity,
                               device=str(runtime.device))
        self._sessions = SessionTable(clock)
        self._store = store or MemoryStore()
        self._model = model_identity(m)
        self._scheduler = Scheduler(runtime, self._pool, metrics, limits.max_batch_size, limits.max_batch_delay,
                                    limits.answers_kept, limits.torch_threads, self._store, self._model)
        self._tasks: list[asyncio.Task] = []
        self._draining = asyncio.Event()
        self._close_listeners: list[Callable[[str], None]] = []
        metrics.live_sessions.set_function(lambda: len(self._sessions))

    def describe(self) -> ModelDescription:
        return ModelDescription(self.runtime.metadata, self.limits)

    @property
    def draining(self) -> asyncio.Event:
        """Set once drain() starts: open streams stop taking requests."""
        return self._draining

    @property
    def queued_requests(self) -> int:
        """Requests accepted and not yet answered, server-wide."""
        return self._scheduler.queued

    async def start(self) -> None:
        """Restores stored sessions, warms the model up on its own thread, then starts taking work."""
        self._store.restore(self._import)
        await self._scheduler.run_in_model_thread(self.runtime.warm_up, self.limits.max_batch_size)
        self._scheduler.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._expire_forever(), name="expiry"))
        if self._store.maintenance_period:
            self._tasks.append(loop.create_task(self._maintain_store_forever(), name="state-store"))

    async def drain(self, timeout: float) -> None:
        """Takes no new work and waits (up to `timeout`) for queued requests to be answered."""
        self._draining.set()
        deadline = self._clock() + timeout
        while self.queued_requests and self._clock() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops the batch loop, then hands every live session to the store (a snapshot, other replicas)."""
        for task in self._tasks:
            task.cancel()
        await self._scheduler.stop()
        await self._store.hand_over([self._record(s) for s in self._sessions])

    # -- sessions: each call is one request of `owner`, who sees only the sessions it created -------

    async def create_session(self, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                       owner: str = "") -> SessionView:
        self._check_accepting()
        self._admit(owner)
        h, c = self._initial_state(h0, c0)
        with self._counting_refusals():
            evictions = self._admission.room_for_session(owner, self._sessions)
            for eviction in evictions:
                self._evict(eviction)
            slot = self._pool.allocate(h, c)
        for eviction in evictions:
            await self._store.release(eviction.session.id, delete=True)
        session = self._sessions.add(slot, owner)
        try:
            with _store_errors():
                await self._store.created(self._record(session))
        except Exception:
            self._sessions.remove(session)
            self._pool.release(slot)
            raise
        self._metrics.sessions_created.inc()
        log.debug("session %s opened for principal %r", fingerprint(session.id), owner)
        return self._view(session)

    async def get_session(self, session_id: str, owner: str = "") -> SessionView:
        return self._view(await self._session(session_id, owner))

    async def get_state(self, session_id: str, owner: str = "") -> tuple[int, np.ndarray, np.ndarray]:
        """`(last applied sequence number, h, c)`, consistent with each other."""
        session = await self._session(session_id, owner)
        h, c = self._pool.read(session.slot)
        return session.last_applied_seq, h.numpy(), c.numpy()

    async def close_session(self, session_id: str, owner: str = "") -> None:
        session = await self._session(session_id, owner)
        self._close(session, SessionNotFound(f"session {session_id} was closed before this request ran"))
        await self._store.release(session.id, delete=True)
        self._metrics.sessions_closed.inc()
        log.debug("session %s closed by its principal", fingerprint(session_id))

    def on_session_closed(self, listener: Callable[[str], None]) -> None:
        """Calls `listener(session_id)` whenever a session is closed or expires."""
        self._close_listeners.append(listener)

    async def step(self, session_id: str, inputs: np.ndarray, seq: int = 0, owner: str = "",
                   with_state: bool = False) -> tuple[int, asyncio.Future]:
        """Queues `inputs[T, input_size]`; returns its sequence number and a future of its StepAnswer, whose
        `state` is the session's `(h, c)` right after this request when `with_state` is set."""
        session = await self._session(session_id, owner)
        self.check_step_inputs(inputs)
        digest = inputs_digest(b"step", inputs)
        with self._counting_refusals():
            return self._submit(session, seq, digest, lambda future, n: Work(
                n, future, inputs=inputs, with_state=with_state, digest=digest))

    async def open_and_step(self, inputs: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                            seq: int = 0, owner: str = "", with_state: bool = False
                            ) -> tuple[str, int, asyncio.Future]:
        """Opens a session and queues its first request; a rejected request leaves no session behind.
        Returns (session id, sequence number, future) like step()."""
        self.check_step_inputs(inputs)  # before the session exists, so a bad request costs nothing
        session_id = (await self.create_session(h0, c0, owner=owner)).session_id
        try:
            return session_id, *await self.step(session_id, inputs, seq, owner=owner, with_state=with_state)
        except Exception:
            await self.close_session(session_id, owner=owner)
            raise

    def check_step_inputs(self, inputs: np.ndarray) -> None:
        """Raises InvalidInput unless `inputs` could be a step's `[T, input_size]`."""
        check_tensor("inputs", inputs, (None, self.runtime.metadata.input_size), self.limits.allow_nonfinite)
        with self._counting_refusals():
            check_at_most("inputs' time steps", inputs.shape[0], self.limits.max_steps_per_request,
                          "max_steps_per_request")

    async def reset(self, session_id: str, h: np.ndarray | None = None, c: np.ndarray | None = None,
              seq: int = 0, owner: str = "") -> tuple[int, asyncio.Future]:
        """Queues a reset to zeros or `(h, c)` behind the session's pending steps."""
        session = await self._session(session_id, owner)
        state = self._initial_state(h, c)
        digest = inputs_digest(b"reset", h, c)
        with self._counting_refusals():
            return self._submit(session, seq, digest,
                                lambda future, n: Work(n, future, reset_state=state, digest=digest))

    # -- stateless sequences --------------------------------------------------------------------

    async def predict(self, inputs: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                      owner: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs whole sequences `inputs[seq_len, batch, input]`; returns `(outputs, h_n, c_n)`."""
        self._check_accepting()
        self._admit(owner)
        m = self.runtime.metadata
        check_tensor("inputs", inputs, (None, None, m.input_size), self.limits.allow_nonfinite)
        with self._counting_refusals():
            check_at_most("inputs' seq_len", inputs.shape[0], self.limits.max_sequence_length,
                          "max_sequence_length")
            check_at_most("inputs' batch", inputs.shape[1], self.limits.max_batch_size, "max_batch_size")
        h, c = self._initial_state(h0, c0, (m.num_layers, inputs.shape[1], m.hidden_size), names=("h0", "c0"))
        x = torch.from_numpy(np.array(inputs, dtype=np.float32))
        return await self._scheduler.run_in_model_thread(self._predict_on_host, x, h, c)

    def _predict_on_host(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """On the model thread: the call and the copies of its results to host memory."""
        return tuple(t.cpu().numpy() for t in self.runtime.run(x, h, c))

    # -- internals ------------------------------------------------------------------------------

    async def _session(self, session_id: str, owner: str) -> Session:
        """Counts a request of `owner`, then finds the session, from the store if it is kept there but not live
        here yet. Another owner's session is reported exactly like one that does not exist."""
        self._admit(owner)
        session = self._sessions.find(session_id)
        with _store_errors():
            if session is None:
                record = await self._store.load(session_id, owner)
                # concurrent requests of the owner share one takeover: the first to get here adopts the record
                session = self._sessions.find(session_id) or (record and self._adopt(record))
            elif session.owner == owner and not session.busy:
                try:
                    record = await self._store.refresh(session_id)
                except SessionGone:
                    self._close(session, SessionNotFound(f"session {session_id} was closed elsewhere"))
                    session = None
                else:
                    if record is not None:
                        self._load(session, record)
        if session is None or session.owner != owner:
            raise SessionNotFound(f"session {session_id} does not exist (closed, expired or never created)")
        return session

    def _adopt(self, record: SessionRecord) -> Session:
        """A session taken over from the store, live here from now on."""
        self._check_accepting()
        self._import([record])
        return self._sessions.find(record.session_id)

    def _load(self, session: Session, record: SessionRecord) -> None:
        """Replaces a live session's state and numbering with a newer stored record."""
        self._pool.write(session.slot, torch.from_numpy(record.h), torch.from_numpy(record.c))
        session.last_applied_seq = session.last_assigned_seq = record.last_applied_seq
        session.steps_applied = record.steps_applied
        session.answers = collections.deque(record.answers, maxlen=self.limits.answers_kept)

    def _submit(self, session: Session, seq: int, digest: bytes, make_work) -> tuple[int, asyncio.Future]:
        """Applies the sequence-number rules, then queues the request behind the session's others."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        if seq == 0:
            seq = session.last_assigned_seq + 1
        elif seq <= session.last_assigned_seq:
            return seq, self._answer_again(session, seq, digest, loop)
        elif seq != session.last_assigned_seq + 1:
            raise SequenceError(f"sequence number {seq} skips ahead; expected {session.last_assigned_seq + 1}")
        if self._scheduler.queued >= self.limits.max_queued_requests:
            raise LimitExceeded(f"the server's queue is full (max_queued_requests={self.limits.max_queued_requests})"
                                "; retry with backoff", "max_queued_requests")
        future = loop.create_future()
        self._scheduler.enqueue(session, make_work(future, seq))
        session.last_assigned_seq = seq
        self._sessions.touch(session)
        return seq, future

    def _answer_again(self, session: Session, seq: int, digest: bytes, loop) -> asyncio.Future:
        """A retried request: the queued original's future, or the stored answer; never applied twice.
        A number reused with other inputs is refused: answering it would hand back another request's outputs."""
        for work in session.pending or ():
            if work.seq == seq:
                _check_same_inputs(seq, work.digest, digest)
                return asyncio.shield(work.future)
        kept = session.kept_answer(seq)
        if kept is not None:
            _check_same_inputs(seq, kept.digest, digest)
            future = loop.create_future()
            future.set_result(StepAnswer(kept.answer, None))
            return future
        raise SequenceError(f"sequence number {seq} was applied earlier and only the answers of the last "
                            f"{self.limits.answers_kept} requests are kept; "
                            f"expected {session.last_assigned_seq + 1}")

    def _evict(self, eviction: Eviction) -> None:
        victim, limit = eviction
        self._close(victim, SessionNotFound(f"session {victim.id} was evicted to make room ({limit})"))
        self._metrics.sessions_evicted.labels(limit).inc()

    def _admit(self, owner: str) -> None:
        """Every request of `owner` passes its rate limit first."""
        with self._counting_refusals():
            self._admission.admit_request(owner)

    @contextlib.contextmanager
    def _counting_refusals(self):
        try:
            yield
        except LimitExceeded as refusal:
            self._metrics.limit_refusals.labels(refusal.limit).inc()
            raise

    def _initial_state(self, h: np.ndarray | None, c: np.ndarray | None, shape: tuple | None = None,
                       names: tuple[str, str] = ("h", "c")) -> tuple[torch.Tensor, torch.Tensor]:
        """`(h, c)` as float32 tensors of `shape` (one session's by default), zeros where not given."""
        shape = shape or self._pool.slot_shape
        state = []
        for name, given in zip(names, (h, c)):
            if given is None:
                state.append(torch.zeros(shape, device=self.runtime.device))
            else:
                check_tensor(name, given, shape, self.limits.allow_nonfinite)
                state.append(torch.from_numpy(np.array(given, dtype=np.float32)))
        return state[0], state[1]

    def _check_accepting(self) -> None:
        if self.draining.is_set():
            raise Draining("the server is shutting down; retry on another replica")

    def _close(self, session: Session, error: Exception) -> None:
        self._scheduler.fail_pending(session, error)
        self._sessions.remove(session)
        if session.in_flight:
            session.closed = True
        else:
            self._pool.release(session.slot)
        for listener in self._close_listeners:
            listener(session.id)

    def _view(self, session: Session) -> SessionView:
        now_wall, now = time.time(), self._clock()
        last_used_at = now_wall - (now - session.last_used)
        return SessionView(session.id, session.steps_applied, session.last_applied_seq, session.created_at,
                           last_used_at, last_used_at + self.limits.idle_timeout, self.limits.idle_timeout)

    # -- the store ------------------------------------------------------------------------------

    def _record(self, session: Session) -> SessionRecord:
        h, c = self._pool.read(session.slot)
        return record_of(session, self._model, h.cpu().numpy(), c.cpu().numpy())

    def _import(self, records: list[SessionRecord]) -> None:
        """Makes stored sessions live, all or none: every record is checked before the first one is added."""
        self._admission.room_for(len(records), len(self._sessions))
        for r in records:
            check_session_id(r.session_id)
            check_tensor("h", r.h, self._pool.slot_shape, allow_nonfinite=True)
            check_tensor("c", r.c, self._pool.slot_shape, allow_nonfinite=True)
            if self._sessions.find(r.session_id):
                raise InvalidInput(f"session {r.session_id} is already live")
        for r in records:
            slot = self._pool.allocate(torch.from_numpy(r.h), torch.from_numpy(r.c))
            self._load(self._sessions.add(slot, r.owner, r.session_id, r.created_at), r)

    async def _maintain_store_forever(self) -> None:
        """Lets the store renew its claims and write checkpoints; drops sessions another replica took."""
        while True:
            await asyncio.sleep(self._store.maintenance_period)
            now = self._clock()
            live = [LiveSession(s.id, 0.0 if s.busy else now - s.last_used, s.steps_applied) for s in self._sessions]
            try:
                lost = await self._store.maintain(live, lambda sid: self._record(self._sessions.find(sid)))
            except StoreUnavailable:
                continue  # counted by the store, which reconnects by itself
            for session_id in lost:
                if session := self._sessions.find(session_id):
                    self._close(session, SessionNotFound(f"session {session_id} moved to another replica"))

    async def _expire_forever(self) -> None:
        period = min(1.0, self.limits.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for session in self._sessions.idle_since(self._clock() - self.limits.idle_timeout):
                self._close(session, SessionNotFound(f"session {session.id} expired"))
                self._metrics.sessions_expired.inc()
                log.debug("session %s expired", fingerprint(session.id))
                await self._store.release(session.id, delete=True)


@contextlib.contextmanager
def _store_errors():
    """The store's own errors, as the engine's."""
    try:
        yield
    except StoreUnavailable as error:
        raise StateUnavailable(str(error), error.retry_after) from error
