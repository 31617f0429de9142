"""asyncio client: `async with AsyncLstmClient(addr) as c, c.session() as s: y = await s.step(x)`."""

from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import messages
from client.channel import Credentials, open_channel


class AsyncLstmClient:
    """With `credentials` (TLS roots, client certificate, token) the channel is TLS, else plaintext."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 credentials: Credentials | None = None):
        self._channel = open_channel(grpc.aio, address, credentials)
        self.stub = pb_grpc.LstmServiceStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> "AsyncLstmClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def info(self) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    async def predict(self, inputs, h0=None, c0=None) -> messages.Prediction:
        return messages.prediction(
            await self.stub.Predict(messages.predict_request(inputs, h0, c0), timeout=self.timeout))

    def session(self, h0=None, c0=None, session_id: str | None = None) -> "AsyncSession":
        """A session opened on `async with` (or `await session.open()`), closed on leaving it."""
        return AsyncSession(self, h0, c0, session_id)


class AsyncSession(messages.NumberedRequests):
    def __init__(self, client: AsyncLstmClient, h0=None, c0=None, session_id: str | None = None):
        self._client = client
        self._initial_state = (h0, c0)
        self.id = session_id
        self._next_seq = 1

    async def __aenter__(self) -> "AsyncSession":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> "AsyncSession":
        stub, timeout = self._client.stub, self._client.timeout
        if self.id is None:
            info = await stub.CreateSession(messages.create_request(*self._initial_state), timeout=timeout)
        else:
            info = await stub.GetSession(pb.SessionRef(session_id=self.id), timeout=timeout)
        self.id, self._next_seq = info.session_id, info.last_sequence_number + 1
        return self

    async def step(self, x) -> np.ndarray:
        request, single = messages.step_request(self.id, self._next_seq, x)
        response = await self._client.stub.Step(request, timeout=self._client.timeout)
        self._next_seq += 1
        return messages.step_outputs(response, single)

    async def stream(self, xs: Iterable) -> AsyncIterator[np.ndarray]:
        """Streams each x and yields its output as it arrives (requests are sent ahead of answers)."""
        singles = []
        call = self._client.stub.Stream(self._numbered_steps(xs, singles))
        try:
            i = 0
            async for response in call:
                yield messages.step_outputs(response, singles[i])
                i += 1
        except messages.StepError as error:
            self._next_seq = error.sequence_number
            raise
        finally:
            call.cancel()

    async def state(self) -> tuple[np.ndarray, np.ndarray]:
        return messages.state(await self._client.stub.GetState(pb.SessionRef(session_id=self.id),
                                                               timeout=self._client.timeout))

    async def reset(self, h=None, c=None) -> None:
        request = messages.reset_request(self.id, self._next_seq, h, c)
        await self._client.stub.ResetSession(request, timeout=self._client.timeout)
        self._next_seq += 1

    async def info(self) -> pb.SessionInfo:
        return await self._client.stub.GetSession(pb.SessionRef(session_id=self.id), timeout=self._client.timeout)

    async def close(self) -> None:
        await self._client.stub.CloseSession(pb.SessionRef(session_id=self.id), timeout=self._client.timeout)
