"""Triton-style sequences: a client-chosen sequence id mapped to an engine session, with START and END."""

import asyncio
import dataclasses

import numpy as np

from server.engine.engine import Engine
from server.engine.errors import InvalidInput, SessionNotFound

SequenceId = int | str


@dataclasses.dataclass(slots=True)
class _Live:
    session_id: str
    last_answer: asyncio.Future  # of the newest request; a retired session is closed once it is done


class Sequences:
    """Live sequences by id. Their steps go through `Engine.step`, so they batch with native sessions' steps,
    and a session the engine closes or expires takes its sequence with it."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._live: dict[SequenceId, _Live] = {}
        self._id_by_session: dict[str, SequenceId] = {}
        self._closing: set[asyncio.Task] = set()  # held so that the loop does not drop them half-done
        engine.on_session_closed(self._forget)

    def __len__(self) -> int:
        return len(self._live)

    async def step(self, sequence_id: SequenceId, inputs: np.ndarray, start: bool = False, end: bool = False,
                   h0: np.ndarray | None = None, c0: np.ndarray | None = None, with_state: bool = False
                   ) -> asyncio.Future:
        """Queues `inputs[T, input_size]` for the sequence; the future answers as `Engine.step`'s does.

        START opens the sequence from `(h0, c0)` (zeros when absent); a live sequence with the same id is
        replaced, its queued requests still answered. END frees the sequence once this request is answered.
        A rejected request changes no sequence.
        """
        if start:
            answer = await self._start(sequence_id, inputs, h0, c0, with_state)
        else:
            live = self._live.get(sequence_id)
            if live is None:
                raise SessionNotFound(f"sequence {sequence_id!r} is not active (never started, ended or "
                                      "expired): send sequence_start=true on its first request")
            if h0 is not None or c0 is not None:
                raise InvalidInput("H0 and C0 set a sequence's initial state: "
                                   "send them only with sequence_start=true")
            _, answer = await self._engine.step(live.session_id, inputs, with_state=with_state)
            live.last_answer = answer
        if end:
            self._retire(sequence_id)
        return answer

    async def _start(self, sequence_id: SequenceId, inputs: np.ndarray, h0, c0, with_state: bool
                     ) -> asyncio.Future:
        self._engine.check_step_inputs(inputs)  # before a session exists, so a bad START costs nothing
        session_id = (await self._engine.create_session(h0, c0)).session_id
        try:
            _, answer = await self._engine.step(session_id, inputs, with_state=with_state)
        except Exception:
            await self._engine.close_session(session_id)
            raise
        self._retire(sequence_id)
        self._live[sequence_id] = _Live(session_id, answer)
        self._id_by_session[session_id] = sequence_id
        return answer

    def _retire(self, sequence_id: SequenceId) -> None:
        """Unmaps the sequence now and closes its session after the requests already queued for it."""
        live = self._live.pop(sequence_id, None)
        if live is None:
            return
        del self._id_by_session[live.session_id]
        live.last_answer.add_done_callback(lambda _: self._close_soon(live.session_id))

    def _close_soon(self, session_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._close_quietly(session_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, session_id: str) -> None:
        try:
            await self._engine.close_session(session_id)
        except SessionNotFound:
            pass  # expired or closed meanwhile: nothing left to free

    def _forget(self, session_id: str) -> None:
        sequence_id = self._id_by_session.pop(session_id, None)
        if sequence_id is not None:
            del self._live[sequence_id]
