"""Merged stateless sequences: Predicts of equal seq_len that wait while the model thread is busy run as one
model call, concatenated on the batch axis, and are split back. A model call costs nearly the same for a
batch of 1 as for a few, so concurrent small Predicts go several times faster merged than one after another."""

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch

from server.engine.errors import Draining, ModelFailure
from server.metrics import Metrics
from server.tracing import Tracing

log = logging.getLogger(__name__)

# The most bytes (inputs, outputs and states) of requests merged into one call beyond its first: a merged
# call holds all of them at once, and a Predict may be as large as the server's largest message (64 MiB).
MAX_MERGED_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(slots=True, eq=False)
class PendingPredict:
    """One Predict waiting for the model: `x[seq_len, rows, input]` from state `(h, c)[layers, rows, hidden]`."""

    x: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor
    nbytes: int  # of its inputs, outputs and states: what it adds to a merged call
    future: asyncio.Future
    queued: float = 0.0  # perf_counter when it was queued
    trace: object = None  # with tracing on, the span context of the RPC that queued it (see server.tracing)

    @property
    def seq_len(self) -> int:
        return self.x.shape[0]

    @property
    def rows(self) -> int:
        return self.x.shape[1]


def take_merge(waiting: collections.deque, max_rows: int, max_bytes: int) -> list[PendingPredict]:
    """Removes from `waiting` and returns the requests of the next model call: the oldest request still
    awaited, whatever its size, then each later one of the same seq_len while the call stays within
    `max_rows` rows and `max_bytes` bytes beyond the first. Requests no longer awaited (their caller gave up)
    are dropped; the others keep their order."""
    while waiting and waiting[0].future.done():
        waiting.popleft()
    if not waiting:
        return []
    first = waiting.popleft()
    taken, rows, nbytes, kept = [first], first.rows, 0, []
    while waiting:
        candidate = waiting.popleft()
        if candidate.future.done():
            continue
        if candidate.seq_len == first.seq_len and rows + candidate.rows <= max_rows \
                and nbytes + candidate.nbytes <= max_bytes:
            taken.append(candidate)
            rows, nbytes = rows + candidate.rows, nbytes + candidate.nbytes
        else:
            kept.append(candidate)
    waiting.extend(kept)
    return taken


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]


class PredictMerger:
    """Queues Predicts and runs them, merged where it can, one model call at a time: `compute(x, h, c)` is the
    call, `(y, h_n, c_n)` as host arrays, and `run_in_model_thread(fn, *args)` runs `fn` on the model thread.
    With tracing, each call is traced as a batch of the requests it serves, like a batch of steps."""

    def __init__(self, run_in_model_thread: Callable[..., Awaitable], compute: Callable[..., Arrays],
                 metrics: Metrics, max_rows: int, max_bytes: int = MAX_MERGED_BYTES, tracing: Tracing | None = None):
        self._run_in_model_thread = run_in_model_thread
        self._compute = compute
        self._tracing = tracing
        self._metrics = metrics
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._waiting: collections.deque[PendingPredict] = collections.deque()
        self._runner: asyncio.Task | None = None

    async def predict(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, nbytes: int) -> Arrays:
        """`(outputs, h_n, c_n)` of `x` from `(h, c)`, computed alone or beside other waiting Predicts."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        trace = self._tracing.request_context() if self._tracing else None
        self._waiting.append(PendingPredict(x, h, c, nbytes, future, time.perf_counter(), trace))
        if self._runner is None:
            # a context of its own: the runner serves many RPCs and must not carry the first one's (span, principal)
            self._runner = loop.create_task(self._run_waiting(), name="predict-merge", context=contextvars.Context())
            self._runner.add_done_callback(self._on_runner_exit)
        return await future

    async def _run_waiting(self) -> None:
        """Runs calls until nothing waits; what arrives during a call waits for the next one, and merges."""
        while group := take_merge(self._waiting, self._max_rows, self._max_bytes):
            try:
                await self._run_group(group)
            except BaseException as error:
                _fail(group, Draining("the server stopped before this Predict ran") if isinstance(
                    error, asyncio.CancelledError) else ModelFailure("Predict runner failed"))
                raise
        self._runner = None  # in the same step as the emptiness check: no request can slip in between

    async def _run_group(self, group: list[PendingPredict]) -> None:
        try:
            with self._trace(group):
                answers = await self._run_in_model_thread(self._compute_split, group)
        except Exception:
            log.exception("model call failed for %d merged Predict requests", len(group))
            self._metrics.model_failures.inc()
            _fail(group, ModelFailure("the model failed on this Predict; retry it"))
            return
        for pending, answer in zip(group, answers, strict=True):
            if not pending.future.done():
                pending.future.set_result(answer)
        if len(group) > 1:
            self._metrics.predict_merged.inc(len(group))

    def _trace(self, group: list[PendingPredict]):
        if self._tracing is None:
            return contextlib.nullcontext()
        return self._tracing.batch(((p.trace, p.queued) for p in group), group[0].seq_len)

    def _compute_split(self, group: list[PendingPredict]) -> list[Arrays]:
        """On the model thread: one call over the group's rows, and each request's share as arrays of its own,
        contiguous (so encoding them copies nothing more, and no copy of megabytes holds up the event loop)."""
        if len(group) == 1:
            return [self._compute(group[0].x, group[0].h, group[0].c)]
        merged = self._compute(*(torch.cat([getattr(p, name) for p in group], dim=1) for name in "xhc"))
        answers, start = [], 0
        for pending in group:
            end = start + pending.rows
            answers.append(tuple(np.ascontiguousarray(array[:, start:end]) for array in merged))
            start = end
        return answers

    def _on_runner_exit(self, task: asyncio.Task) -> None:
        """If the runner ever dies, no caller may wait forever on a call it would have made."""
        if task.cancelled() or task.exception() is not None:
            self._runner = None
            error = Draining("the server is stopping") if task.cancelled() else ModelFailure("Predict runner failed")
            _fail(self._waiting, error)
            self._waiting.clear()


def _fail(pending, error: Exception) -> None:
    for one in pending:
        if not one.future.done():
            one.future.set_exception(error)
