"""A columnar message's own batch, its *flight*: the entries whose sessions were idle, run outside the batch loop.

Their states are gathered by one slot index array, run on the model thread in chunks of max_batch_size, scattered
back at once, and their outputs land in one array. While in flight the sessions are `in_flight`, so the batch loop
leaves them alone and their other requests queue behind, as behind one of its own batches; they count as queued
requests (the queue limit, the drain).
"""

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from server.engine.errors import Draining, ModelFailure, SequenceError
from server.engine.exactly_once import check_same_inputs
from server.engine.limits import EngineLimits
from server.engine.scheduler import Scheduler, StepAnswer
from server.engine.sessions import Session
from server.engine.state_pool import StatePool
from server.metrics import Metrics
from server.model import ModelRuntime

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True, eq=False)
class Flight:
    """The entries of one message that it runs itself: their indices in it, sessions and numbers."""

    index: list[int] = dataclasses.field(default_factory=list)
    sessions: list[Session] = dataclasses.field(default_factory=list)
    seqs: list[int] = dataclasses.field(default_factory=list)
    digest_of: Callable[[int], bytes] | None = None  # an entry's inputs' digest, by its index in the message
    digests: list[bytes] = dataclasses.field(default_factory=list)  # the flight's, once it runs
    waiters: list[tuple[int, asyncio.Future]] = dataclasses.field(default_factory=list)  # retries meanwhile


class Flights:
    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics, scheduler: Scheduler,
                 pool: StatePool):
        self._runtime = runtime
        self._limits = limits
        self._metrics = metrics
        self._scheduler = scheduler
        self._pool = pool
        self._flying: set[Flight] = set()

    def add(self, flight: Flight) -> None:
        """A flight as its first entry joins it: a later entry of the same message may be a retry of one in it."""
        self._flying.add(flight)

    def waiter(self, session: Session, seq: int, digest: bytes) -> asyncio.Future | None:
        """For a retry of an entry that a flight is running right now: a future of that entry's StepAnswer."""
        if not seq or not session.in_flight:
            return None
        for flight in self._flying:
            for k, flying in enumerate(flight.sessions):
                if flying is session and flight.seqs[k] == seq:
                    check_same_inputs(seq, flight.digest_of(flight.index[k]), digest, session.last_assigned_seq + 1)
                    waiter = asyncio.get_running_loop().create_future()
                    flight.waiters.append((k, waiter))
                    return waiter
        return None

    async def run(self, flight: Flight, inputs: np.ndarray, errors: dict) -> np.ndarray | None:
        """Runs the flight's entries of `inputs`: their outputs `[F, T, output]`, or None when the model failed
        them (their errors are then in `errors`)."""
        # [T, F, input] in memory of its own (the message's bytes are read-only, which torch warns about)
        rows = inputs if len(flight.index) == len(inputs) else inputs[flight.index]
        x = torch.from_numpy(rows.transpose(1, 0, 2).copy())
        slots = torch.from_numpy(np.fromiter((s.slot for s in flight.sessions), np.int64, len(flight.sessions)))
        h, c = self._pool.gather(slots)
        # Not while the model runs: its thread would wait for the GIL (up to the switch interval) after each chunk
        flight.digests = [flight.digest_of(i) for i in flight.index]
        try:
            outputs, h_n, c_n, seconds = await self._scheduler.run_in_model_thread(self._run, x, h, c)
        except asyncio.CancelledError:
            self._fail(flight, errors, lambda seq: Draining(f"the server stopped before request {seq} ran"))
            raise
        except Exception:
            log.exception("model call failed for a columnar message of %d sessions", len(flight.sessions))
            self._metrics.model_failures.inc()
            self._fail(flight, errors, lambda seq: ModelFailure(
                f"the model failed on request {seq}; the session's state is unchanged, retry it"))
            return None
        self._pool.scatter(slots, h_n, c_n)
        self._land(flight, outputs, inputs.shape[1])
        for part, took in zip(_chunks(len(flight.sessions), self._limits.max_batch_size), seconds, strict=True):
            self._metrics.batch_size.observe(part.stop - part.start)
            self._metrics.compute_time.observe(took)
        self._metrics.steps_applied.inc(len(flight.sessions) * inputs.shape[1])
        return outputs

    def _run(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """On the model thread: chunks of at most max_batch_size sessions; the outputs as host memory
        `[F, T, output]` in one array, the new states `[layers, F, hidden]` where the pool lives."""
        outputs = np.empty((x.shape[1], x.shape[0], self._runtime.metadata.output_size), np.float32)
        h_n, c_n, seconds = torch.empty_like(h), torch.empty_like(c), []
        for part in _chunks(x.shape[1], self._limits.max_batch_size):
            started = time.perf_counter()
            # a chunk of several layers' states is a strided view, and cuDNN's LSTM refuses those
            y, h_n[:, part], c_n[:, part] = self._runtime.run(x[:, part], h[:, part].contiguous(),
                                                              c[:, part].contiguous())
            outputs[part] = y.transpose(0, 1).cpu().numpy()
            seconds.append(time.perf_counter() - started)
        return outputs, h_n, c_n, seconds

    def _land(self, flight: Flight, outputs: np.ndarray, steps: int) -> None:
        """The flight's requests are applied: numbered, counted, their answers kept for retries."""
        scheduler = self._scheduler
        scheduler.kept.put_batch(np.fromiter((s.slot for s in flight.sessions), np.int64, len(flight.sessions)),
                                 np.asarray(flight.seqs, np.int64), flight.digests, outputs)
        for session, seq in zip(flight.sessions, flight.seqs):
            session.last_applied_seq = seq
            session.steps_applied += steps
            if session.pending or session.closed:
                scheduler.landed(session)
            else:
                session.in_flight = False
        self._ended(flight, lambda k: StepAnswer(outputs[k].copy()))

    def _fail(self, flight: Flight, errors: dict, error_for) -> None:
        """Nothing of the flight was applied; what queued behind its entries assumed it would be."""
        for i, session, seq in zip(flight.index, flight.sessions, flight.seqs):
            errors[i] = error_for(seq)
            session.in_flight = False
            session.last_assigned_seq = session.last_applied_seq
            self._scheduler.fail_pending(session, SequenceError(
                f"request {seq} failed before this one; resend from sequence number {seq}", seq))
            self._scheduler.landed(session)
        self._ended(flight, lambda k: errors[flight.index[k]])

    def _ended(self, flight: Flight, answer_of) -> None:
        self._scheduler.count_queued(-len(flight.sessions))
        self._flying.discard(flight)
        for k, waiter in flight.waiters:
            if not waiter.done():
                answer = answer_of(k)
                if isinstance(answer, Exception):
                    waiter.set_exception(answer)
                else:
                    waiter.set_result(answer)


def digests(inputs: np.ndarray) -> Callable[[int], bytes]:
    """Entry i's inputs' digest, the same as `inputs_digest(b"step", inputs[i])` (so a retry on another path is
    recognised), from one hash state of the common prefix and a view of the message's bytes."""
    base = hashlib.blake2b(b"step", digest_size=8)
    base.update(repr(inputs.shape[1:]).encode())
    data = memoryview(np.ascontiguousarray(inputs, np.float32)).cast("B")
    size = inputs[0].nbytes if len(inputs) else 0

    def digest(i: int) -> bytes:
        one = base.copy()
        one.update(data[i * size:(i + 1) * size])
        return one.digest()

    return digest


def _chunks(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]
