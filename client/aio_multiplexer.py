"""The asyncio multiplexer (`AsyncLstmClient.multiplexer()`): the blocking one's design (multiplexer.py) on the
event loop, a task that reads the stream and one that writes it."""

import asyncio

import grpc
import numpy as np

from client.columns import ColumnStep, Packer
from client.errors import LstmError
from client.messages import StepError, as_steps
from client.multiplexer import CLOSED, DEFAULT_MAX_ENTRIES, deliver, fail_all, late, retry_of
from client.resume import may_have_applied
from client.tracing import trace_metadata


class AsyncMultiplexer:
    """The asyncio multiplexer of an AsyncLstmClient: `async with client.multiplexer() as mux`, then
    `s = await mux.session()` and `await s.step(x)` from any number of tasks."""

    def __init__(self, client, max_in_flight: int = 2):
        self._client = client
        self._max_in_flight = max_in_flight
        self._packer: Packer | None = None
        self._turn = asyncio.Condition()
        self._closed = False
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "AsyncMultiplexer":
        self._packer = Packer((await self._client.info()).batching.max_batch_entries or DEFAULT_MAX_ENTRIES)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def session(self, h0=None, c0=None, session_id: str | None = None) -> "AsyncMultiplexedSession":
        return AsyncMultiplexedSession(self, await self._client.session(h0, c0, session_id).open())

    async def close(self) -> None:
        """Sends what is waiting, waits for the answers, then ends the stream."""
        async with self._turn:
            self._closed = True
            self._turn.notify_all()
        await self._task

    async def step(self, session_id: str, seq: int, steps: np.ndarray) -> np.ndarray:
        attempts = self._client.retry.start(self._client.timeout)
        while True:
            try:
                return await self._step_once(session_id, seq, steps, attempts.remaining())
            except StepError as refused:
                await asyncio.sleep(attempts.delay_after(refused))

    async def _step_once(self, session_id: str, seq: int, steps: np.ndarray, timeout: float | None) -> np.ndarray:
        done = asyncio.get_running_loop().create_future()
        async with self._turn:
            if self._closed:
                raise LstmError(grpc.StatusCode.CANCELLED, CLOSED)
            self._packer.add(ColumnStep(session_id, seq, steps, done))
            self._turn.notify_all()
        try:
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise late(self._client.timeout) from None

    async def _run(self) -> None:
        attempts = self._client.retry.start()
        while True:
            self._packer.rewind()  # what a broken call left unanswered is sent again, first
            async with self._turn:  # as in Multiplexer._run: a call is opened for something to send
                await self._turn.wait_for(lambda: self._closed or self._packer.pending)
            if self._closed and not self._packer.pending:
                return
            call = self._client.stub.StreamColumns(metadata=trace_metadata())
            writer = asyncio.get_running_loop().create_task(self._write(call))
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    async with self._turn:
                        results = self._packer.answered(response)
                        self._turn.notify_all()
                    attempts.progressed()
                    deliver(results)
            except grpc.RpcError as error:
                writer.cancel()  # now, not after the backoff: it would go on taking steps for the broken call
                call.cancel()
                try:
                    await asyncio.sleep(attempts.delay_after(error))
                except LstmError as final:
                    fail_all(self._packer.drop_all(), final)
                    attempts = self._client.retry.start()
            finally:
                writer.cancel()
                call.cancel()

    async def _write(self, call) -> None:
        """Sends messages while fewer than max_in_flight are unanswered; half-closes once closed and done. A write
        that fails is not reported here: the call's status, read by _run, says why."""
        try:
            while True:
                async with self._turn:
                    await self._turn.wait_for(lambda: self._closed or (
                        self._packer.pending and len(self._packer.in_flight) < self._max_in_flight))
                    if not self._packer.pending:
                        break
                    messages = self._packer.take()
                for message in messages:
                    await call.write(message)
            await call.done_writing()
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass


class AsyncMultiplexedSession:
    """`MultiplexedSession` for asyncio."""

    def __init__(self, mux: AsyncMultiplexer, session):
        self._mux = mux
        self._session = session
        self.id = session.id
        self._next_seq = session.next_sequence_number
        self._unsettled: tuple[int, np.ndarray] | None = None  # as in MultiplexedSession
        self._turn = asyncio.Lock()

    async def step(self, x) -> np.ndarray:
        steps, single = as_steps(x)
        async with self._turn:
            retried = retry_of(self._unsettled, steps)
            if self._unsettled is not None and retried is None:
                await self._mux.step(self.id, *self._unsettled)
            self._unsettled = None
            seq = self._next_seq if retried is None else retried
            try:
                outputs = await self._mux.step(self.id, seq, steps)
            except LstmError as error:
                if may_have_applied(error):
                    self._unsettled = (seq, steps)
                    self._next_seq += 0 if retried is not None else 1
                raise
            self._next_seq += 0 if retried is not None else 1
        return outputs[0] if single else outputs

    async def state(self) -> tuple[np.ndarray, np.ndarray]:
        return await self._session.state()

    async def close(self) -> None:
        await self._session.close()
