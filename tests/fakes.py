"""An in-process stand-in for ModelRuntime, for engine tests that need no real model."""

import asyncio
import threading

import torch

from server.model import ModelMetadata
from server.store import MemoryStore, SessionGone, SessionRecord

FAIL_MARKER = 666.0  # an input value that makes the fake model raise, failing the batch it is in


class FakeRuntime:
    """A recurrence simple enough to check by hand: h' = h + x.sum(), c' = c + 1, y = h' (per step).

    Each call can be held until released, so tests can queue requests while a batch is in flight.
    """

    def __init__(self, input_size: int = 2, hidden_size: int = 3, num_layers: int = 1):
        self.metadata = ModelMetadata("fake", "0", input_size, hidden_size, num_layers, hidden_size)
        self.device = torch.device("cpu")
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def warm_up(self, max_batch_size: int) -> None:
        """Nothing to warm up in a fake."""

    def initial_state(self, batch: int):
        shape = (self.metadata.num_layers, batch, self.metadata.hidden_size)
        return torch.zeros(shape), torch.zeros(shape)

    def run(self, x, h, c):
        self.gate.wait(10)
        self.batch_sizes.append(x.shape[1])
        if not (h.is_contiguous() and c.is_contiguous()):  # cuDNN's LSTM refuses such states: so does the fake
            raise RuntimeError("rnn: hx is not contiguous")
        if (x == FAIL_MARKER).any():
            raise RuntimeError("injected model failure")
        outputs = []
        for t in range(x.shape[0]):
            h = h + x[t].sum(dim=-1)[None, :, None]
            c = c + 1
            outputs.append(h[-1])
        return torch.stack(outputs), h, c


class HeldStore(MemoryStore):
    """A store kept elsewhere (every lookup of an idle session asks it) whose next call `hold` names waits until
    the returned event is set: the window in which other requests can close or use the session."""

    local = False

    def __init__(self):
        super().__init__()
        self._held: dict[tuple[str, str], asyncio.Event] = {}
        self.waiting = asyncio.Event()  # set once a held call waits
        self.gone: set[str] = set()  # ended on another replica: refresh says so
        self.newer: dict[str, SessionRecord] = {}  # written by another replica: each refresh returns it

    def hold(self, call: str, session_id: str) -> asyncio.Event:
        event = self._held[(call, session_id)] = asyncio.Event()
        return event

    async def refresh(self, session_id):
        await self._wait("refresh", session_id)
        if session_id in self.gone:
            raise SessionGone(f"session {session_id} ended on another replica")
        return self.newer.get(session_id)

    async def release(self, session_id, delete):
        await self._wait("release", session_id)

    async def _wait(self, call: str, session_id: str) -> None:
        if (event := self._held.pop((call, session_id), None)) is not None:
            self.waiting.set()
            await event.wait()
