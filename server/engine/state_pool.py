"""Hidden states of all live sessions in two preallocated tensors, one slot per session."""

import torch

from server.engine.errors import LimitExceeded


class StatePool:
    """`h, c: [num_layers, capacity, hidden]`, grown by doubling up to `max_capacity`, with a free list.

    Slots are left uninitialised (`torch.empty`) because `allocate` writes every slot it hands out and
    no other path reads a free slot. On the CPU that keeps never-used capacity out of resident memory:
    the OS maps a page only when a slot on it is first written, so memory follows the sessions, not
    the doubling.
    """

    def __init__(self, num_layers: int, hidden_size: int, initial_capacity: int, max_capacity: int,
                 device: str = "cpu"):
        self.max_capacity = max_capacity
        capacity = min(initial_capacity, max_capacity)
        self._h = torch.empty(num_layers, capacity, hidden_size, device=device)
        self._c = torch.empty_like(self._h)
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self._h.shape[1]

    @property
    def in_use(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors, used or free."""
        return 2 * self._h.numel() * self._h.element_size()

    @property
    def device(self) -> torch.device:
        return self._h.device

    @property
    def slot_shape(self) -> tuple[int, int]:
        return self._h.shape[0], self._h.shape[2]

    def allocate(self, h: torch.Tensor, c: torch.Tensor) -> int:
        """Takes a free slot (growing the pool when none is left) and writes `(h, c)` into it."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.write(slot, h, c)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def read(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host copies of one slot's `(h, c)`, each `[num_layers, hidden]`."""
        return self._h[:, slot].to("cpu", copy=True), self._c[:, slot].to("cpu", copy=True)

    def write(self, slot: int, h: torch.Tensor, c: torch.Tensor) -> None:
        """Writes `(h, c)` (on any device) into a slot."""
        self._h[:, slot] = h.to(self.device)
        self._c[:, slot] = c.to(self.device)

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(h, c)` of a batch of slots, each `[num_layers, len(slots), hidden]`."""
        slots = slots.to(self.device)  # a no-op on the CPU
        return self._h.index_select(1, slots), self._c.index_select(1, slots)

    def scatter(self, slots: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> None:
        """Writes `(h, c)` (on any device) into a batch of slots."""
        slots = slots.to(self.device)
        self._h.index_copy_(1, slots, h.to(self.device))
        self._c.index_copy_(1, slots, c.to(self.device))

    def _grow(self) -> None:
        old = self.capacity
        new = min(max(1, 2 * old), self.max_capacity)
        if new == old:
            raise LimitExceeded(f"state memory is full: all {old} session slots are in use", "max_sessions")
        for name in ("_h", "_c"):
            grown = torch.empty(self._h.shape[0], new, self._h.shape[2], device=self._h.device)
            grown[:, :old] = getattr(self, name)
            setattr(self, name, grown)
        self._free.extend(range(new - 1, old - 1, -1))
