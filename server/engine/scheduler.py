"""The batch loop: applies each session's requests in order, many sessions per model call."""

import asyncio
import collections
import contextlib
import logging
import time
from typing import NamedTuple

import numpy as np
import torch

from server.engine.answer_ring import AnswerRing
from server.engine.batching import take_batch
from server.engine.errors import Draining, ModelFailure, SequenceError, SessionNotFound, StateUnavailable
from server.engine.model_thread import Lane
from server.engine.sessions import Session, Work, record_of
from server.engine.state_pool import StatePool
from server.metrics import ModelMetrics, observe_all
from server.model import ModelRuntime
from server.store import KeptAnswer, SessionStore, StoreUnavailable
from server.tracing import Tracing

log = logging.getLogger(__name__)


class StepAnswer(NamedTuple):
    """The answer to a step: its outputs [T, output], and the session's (h, c) right after it when asked for."""

    outputs: np.ndarray | None  # None for a reset
    state: tuple[np.ndarray, np.ndarray] | None = None


class Scheduler:
    """One task owns the loop; the model runs on the model thread (its lane there) so the event loop keeps serving
    I/O."""

    def __init__(self, runtime: ModelRuntime, pool: StatePool, metrics: ModelMetrics,
                 max_batch_size: int, max_batch_delay: float, answers_kept: int, model_thread: Lane,
                 store: SessionStore, model: str, tracing: Tracing | None = None):
        self._runtime = runtime
        self._pool = pool
        self._metrics = metrics
        self.max_batch_size = max_batch_size
        self._max_batch_delay = max_batch_delay
        self.kept = AnswerRing(answers_kept)  # every session's latest answers, for retries and resumes
        self._ready: collections.deque[Session] = collections.deque()
        self._wakeup = asyncio.Event()
        self._model_thread = model_thread  # every torch call runs there, shared fairly with other engines
        self._task: asyncio.Task | None = None
        self._queued = 0
        self._latest_batch_seconds = 0.0  # the latest model call's, for room_expected_in
        self._store = store  # new states are committed to it before they are acknowledged
        self._model = model
        self._tracing = tracing

    @property
    def queued(self) -> int:
        """Requests accepted and not yet answered."""
        return self._queued

    @property
    def room_expected_in(self) -> float:
        """Seconds until a full queue is expected to have room: the batch being gathered or run ends by then
        (its wait for company, and a model call as long as the latest one), answering up to max_batch_size."""
        return self._max_batch_delay + self._latest_batch_seconds

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-loop")
        self._task.add_done_callback(self._on_loop_exit)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def run_in_model_thread(self, fn, *args):
        """Runs `fn` on the model thread, so whole-sequence calls queue behind (not beside) batches."""
        return await self._model_thread.run(fn, *args)

    def _step_model(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """On the model thread: one call, and its outputs as host memory `[B, T, output]` (so a GPU's
        synchronising copy never blocks the event loop); the new state stays on the device."""
        y, h_n, c_n = self._runtime.run(x, h, c)
        return y.transpose(0, 1).cpu().numpy(), h_n, c_n

    def enqueue(self, session: Session, work: Work) -> None:
        if session.pending is None:
            session.pending = collections.deque()
        work.enqueued_at = time.perf_counter()
        if self._tracing is not None:
            work.trace = self._tracing.request_context()
        session.pending.append(work)
        self._queued += 1
        if len(session.pending) == 1 and not session.in_flight:
            self._ready.append(session)
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._max_batch_delay and len(self._ready) < self.max_batch_size:
                await asyncio.sleep(self._max_batch_delay)
            await self._apply_resets()
            batch = take_batch(self._ready, self.max_batch_size)
            if not self._ready:
                self._wakeup.clear()
            if batch:
                await self._run_batch(batch)

    async def _apply_resets(self) -> None:
        """Resets need no model call: apply them as soon as they reach the head of their session."""
        resetting = [s for s in self._ready if s.pending[0].inputs is None]
        if not resetting:
            return
        for session in resetting:
            self._ready.remove(session)
            session.in_flight = True
        works = [s.pending[0] for s in resetting]
        h = torch.stack([w.reset_state[0] for w in works], dim=1)
        c = torch.stack([w.reset_state[1] for w in works], dim=1)
        await self._commit(resetting, works, h, c, answers=None)

    async def _run_batch(self, batch: list[Session]) -> None:
        works = [s.pending[0] for s in batch]
        for session in batch:
            session.in_flight = True
        started = time.perf_counter()
        observe_all(self._metrics.queue_wait,
                    started - np.fromiter((work.enqueued_at for work in works), np.float64, len(works)))
        slots = _slots(batch)
        x = torch.from_numpy(np.stack([w.inputs for w in works], axis=1))
        h, c = self._pool.gather(slots)
        try:
            with self._batch_trace(works):
                answers, h_n, c_n = await self.run_in_model_thread(self._step_model, x, h, c)
        except asyncio.CancelledError:
            self._fail_batch(batch, lambda seq: Draining(f"the server stopped before request {seq} ran"))
            raise
        except Exception:
            log.exception("model call failed for a batch of %d sessions", len(batch))
            self._metrics.model_failures.inc()
            self._fail_batch(batch, lambda seq: ModelFailure(
                f"the model failed on request {seq}; the session's state is unchanged, retry it"))
            return
        finally:
            self._latest_batch_seconds = time.perf_counter() - started
            self._metrics.compute_time.observe(self._latest_batch_seconds)
            self._metrics.batch_size.observe(len(batch))
        await self._commit(batch, works, h_n, c_n, answers=answers)
        self._metrics.steps_applied.inc(len(batch) * works[0].steps)

    def _batch_trace(self, works: list[Work]):
        if self._tracing is None:
            return _UNTRACED
        return self._tracing.batch(((work.trace, work.enqueued_at) for work in works), works[0].steps)

    async def _commit(self, batch: list[Session], works: list[Work], h_n, c_n, answers) -> None:
        """Commits the new states to the store, then writes them to the pool, keeps the answers in the ring and
        answers the requests, each with a view of the batch's outputs (the ring holds the kept copy)."""
        errors = await self._store_commit(batch, works, h_n, c_n, answers) if self._store.wants_commits else None
        committed = range(len(batch)) if errors is None else [i for i, error in enumerate(errors) if error is None]
        if committed:
            self._keep(batch, works, h_n, c_n, answers, committed)
        for i in committed:
            session, work = batch[i], works[i]
            session.in_flight = False
            session.pending.popleft()
            session.steps_applied += work.steps
            session.last_applied_seq = work.seq
            self._queued -= 1
            if not work.future.done() or work.retries:
                state = (h_n[:, i].cpu().numpy().copy(), c_n[:, i].cpu().numpy().copy()) if work.with_state \
                    else None
                work.answer(StepAnswer(None if answers is None else answers[i], state))
            self._after_flight(session)
        for session, error in zip(batch, errors or ()):
            if error is not None:
                self._fail_head(session, error)

    def _keep(self, batch: list[Session], works: list[Work], h_n, c_n, answers, committed) -> None:
        """Writes the new states of the `committed` sessions (indices into the batch) to the pool and their
        answers to the ring: one scatter and one ring write for the batch."""
        if len(committed) < len(batch):
            index = torch.tensor(committed, dtype=torch.int64, device=h_n.device)
            h_n, c_n = h_n.index_select(1, index), c_n.index_select(1, index)
            answers = None if answers is None else answers[committed]
            batch, works = [batch[i] for i in committed], [works[i] for i in committed]
        slots = _slots(batch)
        self._pool.scatter(slots, h_n, c_n)
        self.kept.put_batch(slots.numpy(), np.fromiter((w.seq for w in works), np.int64, len(works)),
                            [w.digest for w in works], answers)

    async def _store_commit(self, batch: list[Session], works: list[Work], h_n, c_n, answers) -> list:
        """Per session None, or the engine error its request is answered with instead. Records are built only for
        the sessions the store takes now (checkpoint mode: a few of them), each one a copy of the state and the
        kept answers."""
        due = [i for i, (session, work) in enumerate(zip(batch, works))
               if self._store.takes(session.id, session.steps_applied + work.steps)]
        errors: list = [None] * len(batch)
        if not due:
            return errors
        h, c = h_n.cpu().numpy(), c_n.cpu().numpy()
        records = []
        for i in due:
            session, work = batch[i], works[i]
            latest = KeptAnswer(work.seq, None if answers is None else answers[i], work.digest)
            records.append(record_of(session, self._model, h[:, i], c[:, i], self.kept.answers_of(session, latest),
                                     latest, work.steps))
        for i, error in zip(due, await self._store.commit(records), strict=True):
            errors[i] = None if error is None else _engine_error(error)
        return errors

    def release(self, slot: int) -> None:
        """Frees a closed session's slot: its state's and its kept answers'."""
        self._pool.release(slot)
        self.kept.release(slot)

    def count_queued(self, change: int) -> None:
        """Requests the columnar path (columnar.py) runs outside the batch loop count as queued too."""
        self._queued += change

    def landed(self, session: Session) -> None:
        """A session the columnar path advanced outside the batch loop is free again: what queued behind it goes
        on, or fails if the session was closed meanwhile (close kept it, taking it for the in-flight head)."""
        session.in_flight = False
        if session.closed:
            self.fail_pending(session, SessionNotFound(f"session {session.id} was closed before this request ran",
                                                       session.id))
        self._after_flight(session)

    def _after_flight(self, session: Session) -> None:
        if session.closed:
            self.release(session.slot)
        else:
            self._requeue(session)

    def _requeue(self, session: Session) -> None:
        if session.pending:
            self._ready.append(session)
            self._wakeup.set()
        else:
            session.pending = None  # an idle session keeps no deque: 760 bytes of each one's memory

    def _fail_batch(self, batch: list[Session], error_for) -> None:
        for session in batch:
            self._fail_head(session, error_for(session.pending[0].seq))

    def _fail_head(self, session: Session, error: Exception) -> None:
        """Fails a session's head request and everything queued behind it: those were sent assuming success.
        When the store could not take the head's state, those behind it are as retryable as the head."""
        session.in_flight = False
        failed = session.pending.popleft()
        self._queued -= 1
        failed.answer(error)
        self.fail_pending(session, error if isinstance(error, StateUnavailable) else SequenceError(
            f"request {failed.seq} failed before this one; resend from sequence number {failed.seq}", failed.seq))
        session.last_assigned_seq = session.last_applied_seq
        if session.closed:
            self.release(session.slot)

    def fail_pending(self, session: Session, error: Exception) -> None:
        """Fails every queued (not in-flight) request of a session, e.g. when it is closed."""
        if not session.pending:
            return
        keep = [session.pending.popleft()] if session.in_flight else []
        while session.pending:
            session.pending.popleft().answer(error)
            self._queued -= 1
        session.pending.extend(keep)
        if session in self._ready:
            self._ready.remove(session)

    def _on_loop_exit(self, task: asyncio.Task) -> None:
        """If the batch loop ever dies, nobody may wait forever on a request it would have served."""
        error = Draining("the server is stopping") if task.cancelled() else ModelFailure("the batch loop failed")
        if not task.cancelled() and task.exception():
            log.error("batch loop died", exc_info=task.exception())
        for session in list(self._ready):
            self.fail_pending(session, error)


_UNTRACED = contextlib.nullcontext()


def _engine_error(error: StoreUnavailable) -> StateUnavailable:
    return StateUnavailable(str(error), error.retry_after)


def _slots(sessions: list[Session]) -> torch.Tensor:
    return torch.from_numpy(np.fromiter((s.slot for s in sessions), dtype=np.int64, count=len(sessions)))
