"""The engine's public face: session lifecycle, ordered exactly-once requests, stateless sequences."""

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from server.engine.errors import Draining, LimitExceeded, SequenceError, SessionNotFound
from server.engine.scheduler import Scheduler
from server.engine.sessions import Session, SessionTable, Work
from server.engine.state_pool import StatePool
from server.engine.validation import check_at_most, check_tensor
from server.metrics import Metrics
from server.model import ModelRuntime

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 256
    max_batch_delay: float = 0.0
    idle_timeout: float = 600.0
    max_sessions: int = 100_000
    initial_capacity: int = 1024
    max_steps_per_request: int = 1024
    max_sequence_length: int = 100_000
    max_queued_requests: int = 100_000
    allow_nonfinite: bool = False


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


class Engine:
    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics, clock=time.monotonic):
        self.runtime = runtime
        self.limits = limits
        self._metrics = metrics
        self._clock = clock
        m = runtime.metadata
        self._pool = StatePool(m.num_layers, m.hidden_size, limits.initial_capacity, limits.max_sessions,
                               device=str(runtime.device))
        self._sessions = SessionTable(clock)
        self._scheduler = Scheduler(runtime, self._pool, metrics, limits.max_batch_size, limits.max_batch_delay)
        self._expiry_task: asyncio.Task | None = None
        self._draining = False
        self._close_listeners: list[Callable[[str], None]] = []
        metrics.live_sessions.set_function(lambda: len(self._sessions))

    async def start(self) -> None:
        self._scheduler.start()
        self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever(), name="expiry")

    @property
    def draining(self) -> bool:
        """True once shutdown began: no new work is taken."""
        return self._draining

    async def drain(self, timeout: float) -> None:
        """Takes no new work and waits (up to `timeout`) for queued requests to be answered."""
        self._draining = True
        deadline = self._clock() + timeout
        while self._scheduler.queued and self._clock() < deadline:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._expiry_task:
            self._expiry_task.cancel()
        await self._scheduler.stop()

    # -- sessions -------------------------------------------------------------------------------

    async def create_session(self, h0: np.ndarray | None = None, c0: np.ndarray | None = None,
                       owner: str = "") -> SessionView:
        self._check_accepting()
        h, c = self._initial_state(h0, c0)
        slot = self._pool.allocate(h, c)
        session = self._sessions.add(slot, owner)
        self._metrics.sessions_created.inc()
        return self._view(session)

    async def get_session(self, session_id: str, owner: str = "") -> SessionView:
        return self._view(self._sessions.get(session_id, owner))

    async def get_state(self, session_id: str, owner: str = "") -> tuple[int, np.ndarray, np.ndarray]:
        """`(last applied sequence number, h, c)`, consistent with each other."""
        session = self._sessions.get(session_id, owner)
        h, c = self._pool.read(session.slot)
        return session.last_applied_seq, h.numpy(), c.numpy()

    async def close_session(self, session_id: str, owner: str = "") -> None:
        session = self._sessions.get(session_id, owner)
        self._close(session, SessionNotFound(f"session {session_id} was closed before this request ran"))
        self._metrics.sessions_closed.inc()

    def on_session_closed(self, listener: Callable[[str], None]) -> None:
        """Calls `listener(session_id)` whenever a session is closed or expires."""
        self._close_listeners.append(listener)

    async def step(self, session_id: str, inputs: np.ndarray, seq: int = 0, owner: str = "",
                   with_state: bool = False) -> tuple[int, asyncio.Future]:
        """Queues `inputs[T, input_size]`; returns its sequence number and a future of `outputs[T, output]`.

        With `with_state` the future holds `(outputs, h, c)`, `h` and `c` the state right after this request.
        """
        session = self._sessions.get(session_id, owner)
        self.check_step_inputs(inputs)
        return self._submit(session, seq,
                            lambda future, n: Work(n, future, inputs=inputs, with_state=with_state))

    def check_step_inputs(self, inputs: np.ndarray) -> None:
        """Raises InvalidInput unless `inputs` could be a step's `[T, input_size]`."""
        check_tensor("inputs", inputs, (None, self.runtime.metadata.input_size), self.limits.allow_nonfinite)
        check_at_most("inputs' time steps", inputs.shape[0], self.limits.max_steps_per_request,
                      "max_steps_per_request")

    async def reset(self, session_id: str, h: np.ndarray | None = None, c: np.ndarray | None = None,
              seq: int = 0, owner: str = "") -> tuple[int, asyncio.Future]:
        """Queues a reset to zeros or `(h, c)` behind the session's pending steps."""
        session = self._sessions.get(session_id, owner)
        state = self._initial_state(h, c)
        return self._submit(session, seq, lambda future, n: Work(n, future, reset_state=state))

    # -- stateless sequences --------------------------------------------------------------------

    async def predict(self, inputs: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs whole sequences `inputs[seq_len, batch, input]`; returns `(outputs, h_n, c_n)`."""
        self._check_accepting()
        m = self.runtime.metadata
        check_tensor("inputs", inputs, (None, None, m.input_size), self.limits.allow_nonfinite)
        check_at_most("inputs' seq_len", inputs.shape[0], self.limits.max_sequence_length, "max_sequence_length")
        check_at_most("inputs' batch", inputs.shape[1], self.limits.max_batch_size, "max_batch_size")
        h, c = self._initial_state(h0, c0, (m.num_layers, inputs.shape[1], m.hidden_size), names=("h0", "c0"))
        x = torch.from_numpy(np.array(inputs, dtype=np.float32))
        y, h_n, c_n = await self._scheduler.run_in_model_thread(self.runtime.run, x, h, c)
        return y.numpy(), h_n.numpy(), c_n.numpy()

    # -- internals ------------------------------------------------------------------------------

    def _submit(self, session: Session, seq: int, make_work) -> tuple[int, asyncio.Future]:
        """Applies the sequence-number rules, then queues the request behind the session's others."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        if seq == 0:
            seq = session.last_assigned_seq + 1
        elif seq <= session.last_assigned_seq:
            return seq, self._answer_again(session, seq, loop)
        elif seq != session.last_assigned_seq + 1:
            raise SequenceError(f"sequence number {seq} skips ahead; expected {session.last_assigned_seq + 1}")
        if self._scheduler.queued >= self.limits.max_queued_requests:
            raise LimitExceeded(f"the server's queue is full (max_queued_requests={self.limits.max_queued_requests})"
                                "; retry with backoff")
        future = loop.create_future()
        self._scheduler.enqueue(session, make_work(future, seq))
        session.last_assigned_seq = seq
        self._sessions.touch(session)
        return seq, future

    def _answer_again(self, session: Session, seq: int, loop) -> asyncio.Future:
        """A retried request: the queued original's future, or the stored answer; never applied twice."""
        for work in session.pending or ():
            if work.seq == seq:
                return asyncio.shield(work.future)
        if seq == session.last_applied_seq:
            future = loop.create_future()
            future.set_result(session.last_answer)
            return future
        raise SequenceError(f"sequence number {seq} was applied earlier and only the last answer is kept; "
                            f"expected {session.last_assigned_seq + 1}")

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
        if self._draining:
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

    async def _expire_forever(self) -> None:
        period = min(1.0, self.limits.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            for session in self._sessions.idle_since(self._clock() - self.limits.idle_timeout):
                self._close(session, SessionNotFound(f"session {session.id} expired"))
                self._metrics.sessions_expired.inc()
