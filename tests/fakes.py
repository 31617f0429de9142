"""An in-process stand-in for ModelRuntime, for engine tests that need no real model."""

import asyncio
import threading

import torch

from server.model import ModelMetadata
from server.store import MemoryStore

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
        if (x == FAIL_MARKER).any():
            raise RuntimeError("injected model failure")
        outputs = []
        for t in range(x.shape[0]):
            h = h + x[t].sum(dim=-1)[None, :, None]
            c = c + 1
            outputs.append(h[-1])
        return torch.stack(outputs), h, c


class HeldRefreshStore(MemoryStore):
    """A store kept elsewhere (every lookup of an idle session asks it), whose next refresh of an id in `held` waits
    until its event is set: the window in which another request can close the session."""

    local = False

    def __init__(self):
        super().__init__()
        self.held: dict[str, asyncio.Event] = {}

    async def refresh(self, session_id):
        if (event := self.held.pop(session_id, None)) is not None:
            await event.wait()
        return None
