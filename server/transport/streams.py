"""Pipelining for bidirectional streams, shared by every streaming servicer."""

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from server.engine import Draining


def refused(error: Exception) -> asyncio.Future:
    """A failed future standing in for the answer of a request refused before it was queued. It keeps the
    error without its traceback: the traceback's frames hold the request, and the submitting frame holds
    this future, a cycle that kept refused requests in memory until the cycle collector ran."""
    answer = asyncio.get_running_loop().create_future()
    answer.set_exception(error.with_traceback(None))
    return answer


async def read_ahead(request_iterator: AsyncIterator, submit: Callable[..., Awaitable], window: int,
                     draining: asyncio.Event, refusal: Callable[[str], Draining] = Draining,
                     awaited: Callable[[Any], Any] = lambda item: None,
                     cancellable: Callable[[Any], bool] = lambda item: False) -> AsyncIterator:
    """Yields `await submit(request)` for each request in order while reading up to `window` requests ahead.

    `submit` queues the request's work and returns without waiting for its answer, and requests are
    submitted one at a time in stream order, so a client that sends requests back to back has them
    batched instead of answered one round trip at a time. Once `draining` is set it stops reading,
    yields what it took, and ends the stream with Draining (UNAVAILABLE, made by `refusal`, e.g. the
    engine's, which says how long to wait), so the client resumes elsewhere instead of waiting for the
    shutdown grace to run out. `awaited(item)`: the future the consumer awaits first when it takes the item (its
    answer), if any; when the stream ends early (the client went away, the server stopped) nobody awaits those of
    the items never handed out, and their errors are retrieved so that asyncio does not log them. Those answers run
    on (a session's step still applies, and is kept for a retry), but where `cancellable(item)` says that nothing of
    the item's work outlives its answer (a stateless call): that one is cancelled, its client having left.

    Per request this costs a deque append and pop and at most one wake-up of the side that waits: a queue
    and a semaphore per stream cost several futures and callbacks per message (see _Pipeline).
    """
    pipeline = _Pipeline(window)

    async def read():
        try:
            async for request in request_iterator:
                await pipeline.room()
                item = await submit(request)
                pipeline.put(item, awaited(item))
        finally:
            pipeline.close()

    async def stop_reading_on_drain():
        await draining.wait()
        reader.cancel()

    reader = asyncio.create_task(read())
    watcher = asyncio.create_task(stop_reading_on_drain())
    try:
        while (item := await pipeline.take()) is not _ENDED:
            yield item
            pipeline.release()
        if reader.cancelled():
            raise refusal("the server is shutting down; reconnect and resume on another replica")
        await reader  # re-raises a failure to read the stream
    finally:
        reader.cancel()
        watcher.cancel()
        pipeline.abandon(awaited, cancellable)


_ENDED = object()


def retrieved(answer: asyncio.Future) -> None:
    """A done-callback for an answer nobody awaits: asyncio logs a future's exception that nobody retrieved."""
    if not answer.cancelled():
        answer.exception()


class _Pipeline:
    """The submitted requests not yet handed out, in order, and how many are held (submitted, not yet released
    by the consumer). The reader waits for room only while `window` are held, the consumer for an item only
    while none is queued; each side has one future to wait on, made only when it has to wait."""

    __slots__ = ("_items", "_held", "_window", "_reader", "_consumer", "_closed")

    def __init__(self, window: int):
        self._items: collections.deque = collections.deque()
        self._held = 0
        self._window = window
        self._reader: asyncio.Future | None = None  # set while the reader waits for room
        self._consumer: asyncio.Future | None = None  # set while the consumer waits for an item
        self._closed = False

    async def room(self) -> None:
        while self._held >= self._window:
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader

    def put(self, item, awaited=None) -> None:
        """`awaited`: the future the consumer awaits first when it takes `item`. A consumer waiting for an item is
        woken only once that is done: a client that waits for each answer before it sends the next request would
        otherwise wake the consumer twice per message, once for the item and once for its answer."""
        self._items.append(item)
        self._held += 1
        if self._consumer is None or self._consumer.done():
            return
        if isinstance(awaited, asyncio.Future) and not awaited.done():
            awaited.add_done_callback(self._wake_consumer)
        else:
            self._consumer.set_result(None)

    def _wake_consumer(self, _=None) -> None:
        _wake(self._consumer)  # a wake-up that finds no item (the consumer took it meanwhile) waits again

    async def take(self):
        """The next item, or _ENDED once the reader closed and every item was taken."""
        while not self._items:
            if self._closed:
                return _ENDED
            self._consumer = asyncio.get_running_loop().create_future()
            await self._consumer
        return self._items.popleft()

    def release(self) -> None:
        self._held -= 1
        _wake(self._reader)

    def close(self) -> None:
        self._closed = True
        _wake(self._consumer)

    def abandon(self, awaited: Callable[[Any], Any], cancellable: Callable[[Any], bool]) -> None:
        """Drops the items never handed out, the head one included: the consumer waits on its own future, so its
        being cancelled cancels no answer. Those that are `cancellable` are cancelled here; the others run on.
        Either way an error they end with is retrieved."""
        while self._items:
            item = self._items.popleft()
            if isinstance(answer := awaited(item), asyncio.Future):
                if cancellable(item):
                    answer.cancel()
                answer.add_done_callback(retrieved)


def _wake(waiter: asyncio.Future | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
