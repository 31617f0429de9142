"""The engine's public face: session lifecycle, ordered exactly-once requests, stateless sequences."""

import asyncio
import time
from collections.abc import Callable

import numpy as np
import torch

from server.engine.admission import Admission, SharedQuotas
from server.engine.columnar import Columnar
from server.engine.errors import DRAINING_RETRY_SECONDS, Draining, SessionNotFound
from server.engine.exactly_once import ExactlyOnce
from server.engine.flights import Flights
from server.engine.limits import EngineLimits, RefusalCounter
from server.engine.live import LiveSessions
from server.engine.model_thread import ModelThread
from server.engine.predicts import Predicts
from server.engine.scheduler import Scheduler
from server.engine.sessions import Session, Work, inputs_digest
from server.engine.state_pool import StatePool
from server.engine.turnover import Turnover
from server.engine.validation import check_at_most, check_tensor, initial_state
from server.engine.views import ModelDescription, SessionView
from server.metrics import Metrics
from server.model import ModelRuntime
from server.store import MemoryStore, SessionRecord, SessionStore, model_identity
from server.tracing import Tracing


class Engine:
    """Sessions of one model: their lifecycle, their ordered exactly-once requests, and stateless sequences.
    Sessions are kept beyond this process by one SessionStore, whichever it is."""

    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics, clock=time.monotonic,
                 store: SessionStore | None = None, tracing: Tracing | None = None,
                 model_thread: ModelThread | None = None, quotas: SharedQuotas | None = None):
        self.runtime = runtime
        self.limits = limits
        m = runtime.metadata
        self._metrics = metrics = metrics.for_model(m.name, m.version)
        self._clock = clock
        self._admission = Admission(limits, m.state_bytes, clock, quotas)
        self._pool = StatePool(m.num_layers, m.hidden_size, limits.initial_capacity, self._admission.capacity,
                               device=str(runtime.device))
        store, model = store or MemoryStore(), model_identity(m)
        self.model_identity = model  # what a stored session's record names, to find the engine that carries it on
        # an engine of its own when none is shared (one engine per process, the engine's tests)
        self._own_thread = None if model_thread else ModelThread(limits.torch_threads)
        self._scheduler = Scheduler(runtime, self._pool, metrics, limits.max_batch_size, limits.max_batch_delay,
                                    limits.answers_kept, (model_thread or self._own_thread).lane(), store, model,
                                    tracing)
        self._live = LiveSessions(self._pool, store, self._scheduler, self._admission, model, clock)
        self._sessions = self._live.table
        self._uncount_quotas = self._admission.shared.count_in(self._sessions)
        flights = Flights(runtime, limits, metrics, self._scheduler, self._pool)
        self._order = ExactlyOnce(self._scheduler, self._sessions, limits.answers_kept, limits.max_queued_requests,
                                  flights.waiter)
        self._columnar = Columnar(runtime, limits, metrics, self._scheduler, self._live, self._order,
                                  self._admission, flights)
        self._refusal_counter = RefusalCounter(metrics)
        self._turnover = Turnover(self._live, self._admission, metrics, self._refusal_counter, limits.idle_timeout,
                                  clock)
        self._predicts = Predicts(runtime, limits, metrics, self._scheduler.run_in_model_thread,
                                  self._refusal_counter, tracing)
        self._tasks: list[asyncio.Task] = []
        self._draining = asyncio.Event()
        self._drain_deadline = 0.0  # on the engine's clock, once drain() starts
        self._retired: Callable[[], Exception] | None = None  # once retire()d: the refusal of new work
        metrics.live_sessions.set_function(lambda: len(self._sessions))

    def describe(self) -> ModelDescription:
        return ModelDescription(self.runtime.metadata, self.limits)

    @property
    def draining(self) -> asyncio.Event:
        """Set once drain() starts: open streams stop taking requests."""
        return self._draining

    def draining_refusal(self, message: str) -> Draining:
        """The error that refuses work while draining, with how long a client should wait before retrying."""
        grace_left = max(0.0, self._drain_deadline - self._clock())
        return Draining(message, min(grace_left, DRAINING_RETRY_SECONDS))

    @property
    def queued_requests(self) -> int:
        """Requests accepted and not yet answered, server-wide."""
        return self._scheduler.queued

    async def start(self) -> None:
        """Restores stored sessions, warms the model up on its own thread, then starts taking work."""
        self._live.restore()
        await self._scheduler.run_in_model_thread(self.runtime.warm_up, self.limits.max_batch_size)
        self._scheduler.start()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._turnover.expire_forever(), name="expiry"))
        self._tasks.append(loop.create_task(self._live.maintain_forever(), name="state-store"))

    async def drain(self, timeout: float) -> None:
        """Takes no new work and waits (up to `timeout`) for queued requests to be answered."""
        self._drain_deadline = self._clock() + timeout
        self._draining.set()
        while self.queued_requests and self._clock() < self._drain_deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stops the batch loop, then hands every live session to the store (a snapshot, other replicas)."""
        for task in self._tasks:
            task.cancel()
        await self._scheduler.stop()
        await self._live.hand_over()
        self._metrics.forget()  # an unloaded version leaves no series behind: labels stay bounded
        self._uncount_quotas()
        if self._own_thread:
            await asyncio.to_thread(self._own_thread.close)

    def retire(self, refusal: Callable[[], Exception] | None) -> None:
        """From now on new sessions and stateless calls are refused with `refusal()`; live sessions go on.
        None takes new work again (a version rolled back to while it drained)."""
        self._retired = refusal

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def has_session(self, session_id: str) -> bool:
        """Whether the session is live here (whoever owns it)."""
        return self._sessions.find(session_id) is not None

    def idle_record(self, session_id: str) -> SessionRecord | None:
        """The record of a live session with no request queued or running (None otherwise), to carry it on
        elsewhere."""
        session = self._sessions.find(session_id)
        return None if session is None or session.busy else self._live.record(session)

    async def adopt(self, record: SessionRecord) -> None:
        """Makes a session from another engine live here, as it was (its id, owner, numbering and answers), and
        stored under this engine's model."""
        await self._live.take(record)

    async def let_go(self, session_id: str) -> None:
        """Forgets a session that another engine has adopted; the store keeps it (under its new engine)."""
        if session := self._sessions.find(session_id):
            await self._live.let_go(session, SessionNotFound(f"session {session_id} moved to another version",
                                                             session_id))

    async def end_all(self, error: Exception) -> list[str]:
        """Ends every live session; their queued requests fail with `error`. Returns their ids."""
        return await self._live.end_all(error)

    # -- sessions: each call is one request of `owner`, who sees only the sessions it created -------

    async def create_session(self, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                       owner: str = "") -> SessionView:
        self._check_accepting(new_work=True)
        self._admit(owner)
        return self._view(await self._open(h0, c0, owner))

    async def get_session(self, session_id: str, owner: str = "") -> SessionView:
        return self._view(await self._session(session_id, owner))

    async def get_state(self, session_id: str, owner: str = "") -> tuple[int, np.ndarray, np.ndarray]:
        """`(last applied sequence number, h, c)`, consistent with each other."""
        session = await self._session(session_id, owner)
        h, c = self._pool.read(session.slot)
        return session.last_applied_seq, h.numpy(), c.numpy()

    async def close_session(self, session_id: str, owner: str = "") -> None:
        await self._turnover.close(await self._session(session_id, owner))

    def on_session_closed(self, listener: Callable[[str, str], None]) -> None:
        """Calls `listener(session_id, owner)` whenever a session is closed or expires."""
        self._live.on_closed(listener)

    async def step(self, session_id: str, inputs: np.ndarray, seq: int = 0, owner: str = "",
                   with_state: bool = False) -> tuple[int, asyncio.Future]:
        """Queues `inputs[T, input_size]`; returns its sequence number and a future of its StepAnswer, whose
        `state` is the session's `(h, c)` right after this request when `with_state` is set."""
        return self._queue_step(await self._session(session_id, owner), inputs, seq, with_state)

    async def open_and_step(self, inputs: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                            seq: int = 0, owner: str = "", with_state: bool = False
                            ) -> tuple[str, int, asyncio.Future]:
        """Opens a session and queues its first request; a rejected request leaves no session behind.
        Returns (session id, sequence number, future) like step()."""
        self.check_step_inputs(inputs)  # before the session exists, so a bad request costs nothing
        self._check_accepting(new_work=True)
        self._admit(owner)  # once: opening the session and its first step are one request
        session = await self._open(h0, c0, owner)
        try:
            return session.id, *self._queue_step(session, inputs, seq, with_state)
        except Exception:
            await self._turnover.close(session)
            raise

    def check_step_inputs(self, inputs: np.ndarray) -> None:
        """Raises InvalidInput unless `inputs` could be a step's `[T, input_size]`."""
        check_tensor("inputs", inputs, (None, self.runtime.metadata.input_size), self.limits.allow_nonfinite)
        with self._counting_refusals():
            check_at_most("inputs' time steps", inputs.shape[0], self.limits.max_steps_per_request,
                          "max_steps_per_request")

    async def step_columns(self, session_ids: list[str], seqs: list[int], inputs: np.ndarray, owner: str = ""
                           ) -> asyncio.Future:
        """Queues one request per entry, `inputs[i]` `[T, input]` for `session_ids[i]` numbered `seqs[i]`; returns
        one future of their ColumnsAnswer, in which each refused entry has its error (see columnar.py)."""
        return await self._columnar.submit(session_ids, seqs, inputs, owner, self._check_accepting)

    async def reset(self, session_id: str, h: np.ndarray | None = None, c: np.ndarray | None = None,
              seq: int = 0, owner: str = "") -> tuple[int, asyncio.Future]:
        """Queues a reset to zeros or `(h, c)` behind the session's pending steps."""
        return self._queue_reset(await self._session(session_id, owner), h, c, seq)

    async def reset_session(self, session_id: str, h: np.ndarray | None = None, c: np.ndarray | None = None,
                            seq: int = 0, owner: str = "") -> SessionView:
        """reset(), applied: the session as it is right after, read as part of the same request of `owner` (not a
        second one, which the rate limit could refuse once the reset was done)."""
        session = await self._session(session_id, owner)
        _, done = self._queue_reset(session, h, c, seq)
        await done
        return self._view(session)

    def _queue_reset(self, session: Session, h: np.ndarray | None, c: np.ndarray | None, seq: int
                     ) -> tuple[int, asyncio.Future]:
        state = self._initial_state(h, c)
        digest = inputs_digest(b"reset", h, c)
        self._check_accepting()
        with self._counting_refusals():
            return self._order.submit(session, seq, digest,
                                      lambda future, n: Work(n, future, reset_state=state, digest=digest))

    # -- stateless sequences --------------------------------------------------------------------

    async def predict(self, inputs: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                      owner: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs whole sequences `inputs[seq_len, batch, input]`; returns `(outputs, h_n, c_n)` (see predicts.py)."""
        self._check_accepting(new_work=True)
        self._admit(owner)
        return await self._predicts.predict(inputs, h0, c0)

    # -- internals ------------------------------------------------------------------------------

    async def _session(self, session_id: str, owner: str) -> Session:
        """Counts a request of `owner`, then finds the session (see LiveSessions.find)."""
        self._admit(owner)
        return await self._live.find(session_id, owner, self._check_accepting)

    async def _open(self, h0: np.ndarray | None, c0: np.ndarray | None, owner: str) -> Session:
        return await self._turnover.open(owner, *self._initial_state(h0, c0, names=("h0", "c0")))

    def _queue_step(self, session: Session, inputs: np.ndarray, seq: int, with_state: bool
                    ) -> tuple[int, asyncio.Future]:
        self.check_step_inputs(inputs)
        digest = inputs_digest(b"step", inputs)
        self._check_accepting()
        with self._counting_refusals():
            return self._order.submit(session, seq, digest, lambda future, n: Work(
                n, future, inputs=inputs, with_state=with_state, digest=digest))

    def _admit(self, owner: str) -> None:
        """Every request of `owner` passes its rate limit first."""
        with self._counting_refusals():
            self._admission.admit_request(owner)

    def _counting_refusals(self) -> RefusalCounter:
        return self._refusal_counter

    def _initial_state(self, h: np.ndarray | None, c: np.ndarray | None,
                       names: tuple[str, str] = ("h", "c")) -> tuple[torch.Tensor, torch.Tensor]:
        """One session's `(h, c)`, zeros where not given."""
        return initial_state(h, c, self._pool.slot_shape, self.runtime.device, self.limits.allow_nonfinite, names)

    def _check_accepting(self, new_work: bool = False) -> None:
        """Refuses while draining; `new_work` (a new session, a stateless call) is refused once retired too."""
        if new_work and self._retired:
            raise self._retired()
        if self.draining.is_set():
            raise self.draining_refusal("the server is shutting down; retry on another replica")

    def _view(self, session: Session) -> SessionView:
        return SessionView.of(session, self._clock(), self.limits.idle_timeout)
