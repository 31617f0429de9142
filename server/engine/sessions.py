"""The session table: id -> slot and bookkeeping, kept in least-recently-used order."""

import asyncio
import collections
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Iterator

import numpy as np

from server.engine.errors import InvalidInput
from server.store import KeptAnswer, SessionRecord

SESSION_ID_BYTES = 16  # 128 bits from the OS's cryptographic random source
SESSION_ID_CHARACTERS = 22  # those bytes in URL-safe base64, unpadded
_SESSION_ID_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def check_session_id(session_id: str) -> None:
    """Refuses an id CreateSession cannot have made; by its length first, so a huge one costs nothing more."""
    if len(session_id) != SESSION_ID_CHARACTERS or not _SESSION_ID_ALPHABET.fullmatch(session_id):
        raise InvalidInput("session_id is malformed: expected the 22-character id CreateSession returned",
                           "session_id")


def inputs_digest(kind: bytes, *arrays: np.ndarray | None) -> bytes:
    """A cheap fingerprint of a request's inputs, kept beside its answer: a retry sends the same inputs, while a
    sequence number reused with other inputs is a client bug that must not be answered as if it were a retry."""
    digest = hashlib.blake2b(kind, digest_size=8)
    for array in arrays:
        if array is None:
            digest.update(b"-")
        else:
            digest.update(repr(array.shape).encode())
            digest.update(np.ascontiguousarray(array, np.float32).data)
    return digest.digest()


@dataclasses.dataclass(slots=True, eq=False)
class Work:
    """One state-changing request of a session, waiting to be applied in order."""

    seq: int
    future: asyncio.Future
    inputs: np.ndarray | None = None  # [T, input_size] for a step; None for a reset
    reset_state: tuple | None = None  # (h, c) for a reset
    with_state: bool = False  # answer (outputs, h, c) instead of outputs, for callers that return the state
    enqueued_at: float = 0.0
    digest: bytes | None = None  # of the inputs, see inputs_digest
    trace: object = None  # with tracing on, the span context of the RPC that queued it (see server.tracing)
    retries: list[asyncio.Future] | None = None  # the futures of retries sent while it waits, see retried

    @property
    def steps(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[0]

    def retried(self) -> asyncio.Future:
        """A future of this request's answer for a retry of it. Not `future` itself, nor a shield of it: the caller
        that awaits `future` cancels it when it is cancelled (a Stream handler whose client went away), and the
        retry of that request, a settling unary Step, then waited forever although the request still ran."""
        retry = asyncio.get_running_loop().create_future()
        self.retries = [*(self.retries or ()), retry]
        return retry

    def answer(self, answer) -> None:
        """Settles the request's future and its retries' with `answer`, or an exception standing in for it."""
        for future in (self.future, *(self.retries or ())):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


@dataclasses.dataclass(slots=True, eq=False)
class Session:
    id: str
    slot: int
    owner: str
    created_at: float  # wall clock
    last_used: float  # monotonic
    last_applied_seq: int = 0
    last_assigned_seq: int = 0
    steps_applied: int = 0
    kept_since: int = 0  # the answers of requests after this one are in the AnswerRing at this slot (answer_ring)
    pending: collections.deque | None = None  # Work in order; created on first use to keep idle sessions small
    in_flight: bool = False
    closed: bool = False  # closed while a batch held it: its slot is released when that batch ends

    @property
    def busy(self) -> bool:
        return self.in_flight or bool(self.pending)


class SessionTable:
    """Live sessions by id; iteration order is least recently used first."""

    def __init__(self, clock=time.monotonic):
        self._sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self._per_owner: collections.Counter[str] = collections.Counter()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def add(self, slot: int, owner: str, session_id: str | None = None, created_at: float | None = None
            ) -> Session:
        """A new session (or a restored one, keeping its id and creation time), most recently used."""
        created_at = time.time() if created_at is None else created_at
        session = Session(id=session_id or new_session_id(), slot=slot, owner=owner, created_at=created_at,
                          last_used=self._clock())
        self._sessions[session.id] = session
        self._per_owner[owner] += 1
        return session

    def count(self, owner: str) -> int:
        """Live sessions of `owner`."""
        return self._per_owner[owner]

    def find(self, session_id: str) -> Session | None:
        """The live session with this id on this replica, if any. A live session's id was checked when it was
        made, so the format is only checked (InvalidInput) when no session has it: once a step, the regex showed."""
        session = self._sessions.get(session_id) if len(session_id) == SESSION_ID_CHARACTERS else None
        if session is None:
            check_session_id(session_id)
        return session

    def find_many(self, session_ids: list[str]) -> list[Session | InvalidInput | None]:
        """`find` of each id in one pass, the InvalidInput of a malformed id in its place. An id of the right
        length is looked up at once and only one not found is checked further: a live session costs one lookup."""
        get, found = self._sessions.get, []
        for session_id in session_ids:
            session = get(session_id) if len(session_id) == SESSION_ID_CHARACTERS else None
            if session is None:
                try:
                    check_session_id(session_id)
                except InvalidInput as malformed:
                    session = malformed
            found.append(session)
        return found

    def touch_many(self, sessions: list[Session]) -> None:
        """`touch` of each session, at one time."""
        now, move_to_end = self._clock(), self._sessions.move_to_end
        for session in sessions:
            session.last_used = now
            move_to_end(session.id)

    def recently_used(self, since: float) -> list[Session]:
        """Sessions used at or after `since`, or with work queued."""
        return [s for s in reversed(self._sessions.values()) if s.last_used >= since or s.busy]

    def touch(self, session: Session) -> None:
        session.last_used = self._clock()
        self._sessions.move_to_end(session.id)

    def remove(self, session: Session) -> None:
        del self._sessions[session.id]
        self._per_owner[session.owner] -= 1
        if not self._per_owner[session.owner]:
            del self._per_owner[session.owner]

    def least_recently_used_idle(self, owner: str | None = None) -> Session | None:
        """The idle session (of `owner`, when given) unused for longest: the one to evict."""
        for session in self._sessions.values():
            if not session.busy and (owner is None or session.owner == owner):
                return session
        return None

    def still_idle(self, session: Session, deadline: float) -> bool:
        """Whether `session` is still live here, unused since `deadline` and with no work queued."""
        return self._sessions.get(session.id) is session and session.last_used < deadline and not session.busy

    def idle_since(self, deadline: float) -> list[Session]:
        """Sessions not used since `deadline` and with no work queued, oldest first."""
        expired = []
        for session in self._sessions.values():
            if session.last_used >= deadline:
                break
            if not session.busy:
                expired.append(session)
        return expired


def record_of(session: Session, model: str, h: np.ndarray, c: np.ndarray, answers: tuple[KeptAnswer, ...] = (),
              latest: KeptAnswer | None = None, steps: int = 0) -> SessionRecord:
    """The stored form of `session` with state (h, c) and kept `answers` (oldest first): as it is, or right after
    request `latest` (of `steps` more time steps) that is being committed, whose answer ends `answers`."""
    return SessionRecord(session.id, session.owner, model, session.created_at,
                         session.last_applied_seq if latest is None else latest.seq,
                         session.steps_applied + steps, h, c, answers)
