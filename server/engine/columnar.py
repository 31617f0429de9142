"""The columnar multiplexed form: N sessions' steps of one length T in one `[N, T, input]` array, answered by one
`[N, T, output]` array and an error for each entry that failed.

Each entry is checked and applied exactly as a Stream request of its own (rate limit, owner, inputs, sequence
number, queue limit; a refused entry changes nothing). What differs is the cost per entry: the checks run over the
whole array at once, the sessions are looked up in one pass, and the entries whose sessions are idle (a
multiplexer steps each session once per message) skip the batch loop: their states are gathered by one slot index
array, run on the model thread in chunks of max_batch_size, scattered back at once, and their outputs land in one
array (flights.py). One future per message, none per entry. Entries whose sessions have work queued or in flight,
and retries, take the ordinary queue (ExactlyOnce), which orders them behind that work.
"""

import asyncio
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from server.engine.admission import Admission
from server.engine.errors import Draining, EngineError, InvalidInput, LimitExceeded
from server.engine.exactly_once import ExactlyOnce
from server.engine.flights import Flight, Flights, digests
from server.engine.limits import EngineLimits
from server.engine.live import LiveSessions
from server.engine.scheduler import Scheduler
from server.engine.sessions import Session, Work
from server.engine.validation import check_at_most, check_tensor
from server.metrics import Metrics
from server.model import ModelRuntime


class ColumnsAnswer(NamedTuple):
    """The answer to a message: every entry's outputs (zeros where it failed), the number each entry was applied
    or answered under (the number sent, where it failed), and the error of each failed entry by its index."""

    outputs: np.ndarray  # [N, T, output]
    sequence_numbers: list[int]
    errors: dict[int, Exception]


def check_lines_up(n: int, seqs: list[int], inputs: np.ndarray, input_size: int | None) -> None:
    """InvalidInput when a message of `n` session ids has inputs that are not `[n, T, input_size]` (any input size
    when None) or a number of sequence numbers that is neither n nor 0."""
    check_tensor("inputs", inputs, (n, None, input_size), allow_nonfinite=True)
    if len(seqs) not in (0, n):
        raise InvalidInput(f"{len(seqs)} sequence numbers for {n} session ids: send one per id, or none",
                           "sequence_numbers")


class Columnar:
    """Runs StepColumns messages; the engine's parts it works with are passed in."""

    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics, scheduler: Scheduler,
                 live: LiveSessions, order: ExactlyOnce, admission: Admission, flights: Flights):
        self._runtime = runtime
        self._scheduler = scheduler
        self._limits = limits
        self._metrics = metrics
        self._live = live
        self._order = order
        self._admission = admission
        self._flights = flights
        self._tasks: set[asyncio.Task] = set()  # held so that a message's task is not collected half-way

    async def submit(self, session_ids: list[str], seqs: list[int], inputs: np.ndarray, owner: str,
                     accepting: Callable[[], None]) -> asyncio.Future:
        """Queues entry i, `inputs[i]` `[T, input]` for session `session_ids[i]` numbered `seqs[i]` (0, or no
        numbers at all: the next one); returns one future of the ColumnsAnswer. InvalidInput refuses the whole
        message when its parts do not line up; every other refusal is its entry's alone."""
        n = len(session_ids)
        check_lines_up(n, seqs, inputs, self._runtime.metadata.input_size)
        seqs = list(seqs) if seqs else [0] * n
        errors: dict[int, Exception] = {}
        if self._limits.rate_limit:
            self._admit(owner, n, errors)
        sessions = await self._live.find_many(session_ids, owner, accepting, errors)
        for i, found in enumerate(sessions):
            if isinstance(found, EngineError):
                errors.setdefault(i, _entry_named(found, i))
        self._check_inputs(inputs, errors)
        try:
            accepting()
        except Draining as refusal:
            _fail_others(errors, n, refusal)
        flight, waits = self._take(sessions, seqs, inputs, errors)
        task = asyncio.get_running_loop().create_task(self._answer(flight, waits, seqs, inputs, errors))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A caller that goes away (a cancelled stream) must not cancel the message: its sessions are in flight
        return asyncio.shield(task)

    def _admit(self, owner: str, n: int, errors: dict) -> None:
        """Each entry is a request of `owner` for its rate limit, as on the other paths."""
        for i in range(n):
            try:
                self._admission.admit_request(owner)
            except LimitExceeded as refusal:
                errors[i] = self._counted(refusal)

    def _check_inputs(self, inputs: np.ndarray, errors: dict) -> None:
        """Per entry, in the order a Stream request is checked: finite values, then the steps' limit."""
        if not self._limits.allow_nonfinite:
            finite = np.isfinite(inputs.sum(axis=(1, 2), dtype=np.float64))
            for i in np.flatnonzero(~finite).tolist():
                try:
                    check_tensor(f"inputs[{i}]", inputs[i], (None, None), allow_nonfinite=False)
                except InvalidInput as refusal:
                    errors.setdefault(i, refusal)
        try:
            check_at_most("inputs' time steps", inputs.shape[1], self._limits.max_steps_per_request,
                          "max_steps_per_request")
        except LimitExceeded as refusal:
            refused = _fail_others(errors, inputs.shape[0], refusal)
            self._metrics.limit_refusals.labels(refusal.limit).inc(refused)

    def _take(self, sessions: list, seqs: list[int], inputs: np.ndarray, errors: dict
              ) -> tuple[Flight, list[tuple[int, asyncio.Future]]]:
        """Entries of idle sessions, numbered next, join the message's flight; the other entries go through
        ExactlyOnce (busy sessions queue behind their work, retries are answered again, gaps are refused)."""
        digest = digests(inputs)
        flight, waits = Flight(digest_of=digest), []
        scheduler, index, flying = self._scheduler, flight.index, flight.sessions
        # with a store that takes every new state first, all go through the batch loop, which commits them
        room = 0 if self._live.commits else self._limits.max_queued_requests - scheduler.queued
        counted = 0
        for i, session in enumerate(sessions):
            if i in errors:
                continue
            seq = seqs[i]
            if session.in_flight or session.pending or room <= 0 or (seq and seq != session.last_assigned_seq + 1):
                scheduler.count_queued(len(flying) - counted)
                counted = len(flying)
                waits.extend(self._queue(i, session, seqs, digest(i), inputs[i], errors))
                room = room and self._limits.max_queued_requests - scheduler.queued
                continue
            seqs[i] = session.last_assigned_seq = seq or session.last_assigned_seq + 1
            session.in_flight = True
            if not flying:
                self._flights.add(flight)  # now: a later entry of this message may retry this one
            index.append(i)
            flying.append(session)
            flight.seqs.append(seqs[i])
            room -= 1
        scheduler.count_queued(len(flying) - counted)
        if flying:
            self._live.table.touch_many(flying)
        return flight, waits

    def _queue(self, i: int, session: Session, seqs: list[int], digest: bytes, row: np.ndarray, errors: dict
               ) -> list[tuple[int, asyncio.Future]]:
        """Entry i on the ordinary path: `[(i, future of its StepAnswer)]`, or `[]` with its error kept."""
        try:
            seqs[i], future = self._order.submit(session, seqs[i], digest, lambda answer, n: Work(
                n, answer, inputs=row, digest=digest))
        except EngineError as refusal:
            errors[i] = self._counted(refusal) if isinstance(refusal, LimitExceeded) else refusal
            return []
        return [(i, future)]

    async def _answer(self, flight: Flight, waits: list, seqs: list[int], inputs: np.ndarray, errors: dict
                      ) -> ColumnsAnswer:
        n, steps = inputs.shape[0], inputs.shape[1]
        flown = await self._flights.run(flight, inputs, errors) if flight.sessions else None
        if flown is not None and len(flight.index) == n:
            outputs = flown  # every entry flew, in order: their outputs are the answer as they are
        else:
            outputs = np.zeros((n, steps, self._runtime.metadata.output_size), np.float32)
            if flown is not None:
                outputs[flight.index] = flown
        for i, future in waits:
            try:
                outputs[i] = (await future).outputs
            except Exception as error:  # noqa: BLE001 - the entry's error, answered in-band
                errors[i] = error
        return ColumnsAnswer(outputs, seqs, errors)

    def _counted(self, refusal: LimitExceeded) -> LimitExceeded:
        self._metrics.limit_refusals.labels(refusal.limit).inc()
        return refusal


def _entry_named(error: EngineError, i: int) -> EngineError:
    """An entry's refusal names its place in the message: `session_ids[3]`, not the `session_id` of one request."""
    if isinstance(error, InvalidInput) and error.field == "session_id":
        error.field = f"session_ids[{i}]"
    return error


def _fail_others(errors: dict, n: int, error: Exception) -> int:
    """`error` for every entry not failed yet; how many that was."""
    refused = 0
    for i in range(n):
        if i not in errors:
            errors[i] = error
            refused += 1
    return refused

