"""Triton-style sequences: a client-chosen sequence id mapped to an engine session, with START and END."""

import asyncio
import dataclasses

import numpy as np

from server.engine.engine import Engine
from server.engine.errors import InvalidInput, SessionNotFound
from server.logsafe import clip

SequenceId = int | str
_Key = tuple[str, SequenceId]  # (owner, sequence id): each principal has its own sequence ids


@dataclasses.dataclass(slots=True)
class _Live:
    session_id: str
    owner: str
    last_answer: asyncio.Future  # of the newest request; a retired session is closed once it is done


class Sequences:
    """Live sequences by id. Their steps go through `Engine.step`, so they batch with native sessions' steps,
    and a session the engine closes or expires takes its sequence with it."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._live: dict[_Key, _Live] = {}
        self._key_by_session: dict[str, _Key] = {}
        self._closing: set[asyncio.Task] = set()  # held so that the loop does not drop them half-done
        engine.on_session_closed(lambda session_id, _owner: self._forget(session_id))

    @property
    def engine(self) -> Engine:
        return self._engine

    def __len__(self) -> int:
        return len(self._live)

    def active(self, sequence_id: SequenceId, owner: str = "") -> bool:
        """Whether the sequence is live here: started, not ended, not expired."""
        return (owner, sequence_id) in self._live

    def session_of(self, sequence_id: SequenceId, owner: str = "") -> str | None:
        """The id of the engine session behind a live sequence."""
        live = self._live.get((owner, sequence_id))
        return live.session_id if live else None

    def end(self, sequence_id: SequenceId, owner: str = "") -> None:
        """Ends the sequence if it is live here, once its queued requests are answered (a START elsewhere, on
        another version of the model, replaced it)."""
        self._retire((owner, sequence_id))

    async def step(self, sequence_id: SequenceId, inputs: np.ndarray, start: bool = False, end: bool = False,
                   h0: np.ndarray | None = None, c0: np.ndarray | None = None, with_state: bool = False,
                   owner: str = "") -> asyncio.Future:
        """Queues `inputs[T, input_size]` for the sequence; the future answers as `Engine.step`'s does.

        START opens the sequence from `(h0, c0)` (zeros when absent); a live sequence with the same id is
        replaced, its queued requests still answered. END frees the sequence once this request is answered.
        A rejected request changes no sequence. Sequence ids are per `owner`: another principal's sequence
        with the same id is a different one.
        """
        key = (owner, sequence_id)
        if start:
            answer = await self._start(key, inputs, h0, c0, with_state)
        else:
            live = self._live.get(key)
            if live is None:
                raise SessionNotFound(f"sequence {clip(sequence_id)} is not active (never started, ended or "
                                      "expired): send sequence_start=true on its first request")
            if h0 is not None or c0 is not None:
                raise InvalidInput("H0 and C0 set a sequence's initial state: "
                                   "send them only with sequence_start=true")
            _, answer = await self._engine.step(live.session_id, inputs, with_state=with_state, owner=owner)
            live.last_answer = answer
        if end:
            self._retire(key)
        return answer

    async def _start(self, key: _Key, inputs: np.ndarray, h0, c0, with_state: bool) -> asyncio.Future:
        owner = key[0]
        session_id, _, answer = await self._engine.open_and_step(inputs, h0, c0, owner=owner, with_state=with_state)
        self._retire(key)
        self._live[key] = _Live(session_id, owner, answer)
        self._key_by_session[session_id] = key
        return answer

    def _retire(self, key: _Key) -> None:
        """Unmaps the sequence now and closes its session after the requests already queued for it."""
        live = self._live.pop(key, None)
        if live is None:
            return
        del self._key_by_session[live.session_id]
        live.last_answer.add_done_callback(lambda _: self._close_soon(live))

    def _close_soon(self, live: _Live) -> None:
        task = asyncio.get_running_loop().create_task(self._close_quietly(live))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, live: _Live) -> None:
        try:
            await self._engine.close_session(live.session_id, owner=live.owner)
        except SessionNotFound:
            pass  # expired or closed meanwhile: nothing left to free

    def _forget(self, session_id: str) -> None:
        key = self._key_by_session.pop(session_id, None)
        if key is not None:
            del self._live[key]
