"""Python client for lstmserve: `LstmClient` (blocking) and `AsyncLstmClient` (asyncio)."""

from client.aio import AsyncLstmClient, AsyncSession
from client.aio_multiplexer import AsyncMultiplexedSession, AsyncMultiplexer
from client.channel import Credentials
from client.errors import LstmError
from client.messages import Prediction, StepError
from client.multiplexer import MultiplexedSession, Multiplexer
from client.sync import LstmClient, Session

__all__ = ["AsyncLstmClient", "AsyncMultiplexedSession", "AsyncMultiplexer", "AsyncSession", "Credentials",
           "LstmClient", "LstmError", "MultiplexedSession", "Multiplexer", "Prediction", "Session", "StepError"]
