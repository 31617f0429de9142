"""What a replica writes about a session, and the lease that lets it write."""

import dataclasses

import numpy as np


class StoreUnavailable(Exception):
    """The state store cannot be reached, or another replica holds the session for longer than we wait."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SessionMoved(StoreUnavailable):
    """This replica's lease on the session was lost: another replica (or a Redis restart) took it."""


@dataclasses.dataclass(frozen=True)
class Lease:
    """The right to write one session's state; `fence` grows with every new holder."""

    session_id: str
    fence: int


@dataclasses.dataclass
class SessionRecord:
    """A session's state after request `seq`, as stored; `answer` is that request's outputs (for retries)."""

    session_id: str
    owner: str
    model: str  # "name@version": a record is only restored into the same model
    seq: int
    steps_applied: int
    h: np.ndarray  # [num_layers, hidden]
    c: np.ndarray
    answer: np.ndarray | None = None
    answer_digest: bytes | None = None  # of the inputs of request `seq`: a replay must match it

    def to_fields(self) -> dict[str, bytes | str | int]:
        answer = self.answer if self.answer is not None else np.zeros((0, 0), np.float32)
        return {"owner": self.owner, "model": self.model, "seq": self.seq, "steps": self.steps_applied,
                "state_shape": _shape(self.h), "h": _bytes(self.h), "c": _bytes(self.c),
                "answer_shape": _shape(answer), "answer": _bytes(answer),
                "answer_digest": self.answer_digest or b""}

    @classmethod
    def from_fields(cls, session_id: str, fields: dict[bytes, bytes]) -> "SessionRecord":
        f = {k.decode(): v for k, v in fields.items()}
        state_shape = _parse_shape(f["state_shape"])
        answer_shape = _parse_shape(f["answer_shape"])
        answer = np.frombuffer(f["answer"], np.float32).reshape(answer_shape).copy() if answer_shape[0] else None
        return cls(session_id=session_id, owner=f["owner"].decode(), model=f["model"].decode(),
                   seq=int(f["seq"]), steps_applied=int(f["steps"]),
                   h=np.frombuffer(f["h"], np.float32).reshape(state_shape).copy(),
                   c=np.frombuffer(f["c"], np.float32).reshape(state_shape).copy(), answer=answer,
                   answer_digest=f.get("answer_digest") or None)


def _bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _shape(array: np.ndarray) -> str:
    return ",".join(str(d) for d in array.shape)


def _parse_shape(text: bytes) -> tuple[int, ...]:
    return tuple(int(d) for d in text.decode().split(","))
