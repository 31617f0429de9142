"""Pipelining for bidirectional streams, shared by every streaming servicer."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from server.engine import Draining


def refused(error: Exception) -> asyncio.Future:
    """A failed future standing in for the answer of a request refused before it was queued. It keeps the
    error without its traceback: the traceback's frames hold the request, and the submitting frame holds
    this future, a cycle that kept refused requests in memory until the cycle collector ran."""
    answer = asyncio.get_running_loop().create_future()
    answer.set_exception(error.with_traceback(None))
    return answer


async def read_ahead(request_iterator: AsyncIterator, submit: Callable[..., Awaitable], window: int,
                     draining: asyncio.Event, refusal: Callable[[str], Draining] = Draining) -> AsyncIterator:
    """Yields `await submit(request)` for each request in order while reading up to `window` requests ahead.

    `submit` queues the request's work and returns without waiting for its answer, and requests are
    submitted one at a time in stream order, so a client that sends requests back to back has them
    batched instead of answered one round trip at a time. Once `draining` is set it stops reading,
    yields what it took, and ends the stream with Draining (UNAVAILABLE, made by `refusal`, e.g. the
    engine's, which says how long to wait), so the client resumes elsewhere instead of waiting for the
    shutdown grace to run out.
    """
    submitted: asyncio.Queue = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    done = object()

    async def read():
        try:
            async for request in request_iterator:
                await slots.acquire()
                submitted.put_nowait(await submit(request))
        finally:
            submitted.put_nowait(done)

    async def stop_reading_on_drain():
        await draining.wait()
        reader.cancel()

    reader = asyncio.create_task(read())
    watcher = asyncio.create_task(stop_reading_on_drain())
    try:
        while (item := await submitted.get()) is not done:
            yield item
            slots.release()
        if reader.cancelled():
            raise refusal("the server is shutting down; reconnect and resume on another replica")
        await reader  # re-raises a failure to read the stream
    finally:
        reader.cancel()
        watcher.cancel()
