"""The one model thread every engine shares: all torch calls run on it, and its queue serves the engines in
turn, so a model with a long queue of work cannot starve another model's steps."""

import asyncio
import collections
import contextlib
import threading

import torch

from server.engine.errors import Draining


class Lane:
    """One engine's place in the model thread's queue: its calls run in the order it makes them."""

    def __init__(self, thread: "ModelThread"):
        self._thread = thread
        self.jobs: collections.deque = collections.deque()

    async def run(self, fn, *args):
        """Runs `fn(*args)` on the model thread, in its turn, and returns (or raises) what it does."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._thread.submit(self, (fn, args, loop, future))
        return await future


class ModelThread:
    """A single worker thread; each lane with work waiting gets one call in turn (round robin)."""

    def __init__(self, torch_threads: int):
        self._torch_threads = torch_threads
        self._ready: collections.deque[Lane] = collections.deque()  # lanes with jobs, each at most once
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="model", daemon=True)
        self._thread.start()

    def lane(self) -> Lane:
        return Lane(self)

    def submit(self, lane: Lane, job: tuple) -> None:
        with self._wakeup:
            if self._closing:
                raise RuntimeError("the model thread is closed")
            lane.jobs.append(job)
            if len(lane.jobs) == 1:
                self._ready.append(lane)
                self._wakeup.notify()

    def close(self) -> None:
        """Lets the call in progress finish, then ends the thread; calls still queued are not run: their callers
        get Draining, so none waits forever."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join()
        while self._ready:
            lane = self._ready.popleft()
            while lane.jobs:
                _, _, loop, future = lane.jobs.popleft()
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits any more
                    loop.call_soon_threadsafe(_settle, future, None,
                                              Draining("the server stopped before this model call ran"))

    def _serve(self) -> None:
        # OpenMP's thread count is a per-thread setting, so it is set here: a model thread left at the default
        # (one OpenMP worker per core) fights the event loop for the cores and ran a 1000-step sequence 10x
        # slower than in-process (measured: 94 ms against 8 ms).
        torch.set_num_threads(self._torch_threads)
        while (job := self._next()) is not None:
            fn, args, loop, future = job
            try:
                result, error = fn(*args), None
            except BaseException as raised:  # noqa: BLE001 - handed to the caller, who decides
                result, error = None, raised
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error)

    def _next(self) -> tuple | None:
        """The oldest job of the lane whose turn it is; None once closing."""
        with self._wakeup:
            while not self._ready and not self._closing:
                self._wakeup.wait()
            if self._closing:
                return None
            lane = self._ready.popleft()
            job = lane.jobs.popleft()
            if lane.jobs:
                self._ready.append(lane)  # to the back: every other waiting lane goes first
            return job


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
