"""One stored session, the same wherever it is kept (a snapshot file, Redis), and its one binary codec."""

import dataclasses
import json
import struct
from typing import NamedTuple

import numpy as np

_HEADER_LENGTH = struct.Struct("<I")


class KeptAnswer(NamedTuple):
    """An applied request's answer, kept for retries and resumes; `digest` is its inputs' (None: not known)."""

    seq: int
    answer: np.ndarray | None  # outputs [T, output], None for a reset
    digest: bytes | None = None


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """What a session needs to carry on elsewhere (after a restart, on another replica): its owner, the model
    it runs on, its bookkeeping, its state after request `last_applied_seq` and its kept answers."""

    session_id: str
    owner: str
    model: str  # model_identity() of the model the state belongs to
    created_at: float  # wall clock
    last_applied_seq: int
    steps_applied: int
    h: np.ndarray  # [num_layers, hidden]
    c: np.ndarray
    answers: tuple[KeptAnswer, ...] = ()  # oldest first


class RecordRejected(Exception):
    """A record (or a file of them) that is corrupt, or that belongs to another model."""


def model_identity(metadata) -> str:
    """The model a state belongs to: name, version and every size; a state is only carried on by the same."""
    return json.dumps(dataclasses.asdict(metadata), sort_keys=True)


def check_model(stored: str, serving: str) -> None:
    """Raises RecordRejected unless a record written under model `stored` may be carried on by `serving`."""
    if stored != serving:
        raise RecordRejected(f"written for model {_readable(stored)}, this server runs {_readable(serving)}")


def encode(record: SessionRecord) -> bytes:
    """Header length, a JSON header (bookkeeping and shapes), then the float32 arrays; no pickles."""
    arrays = [record.h, record.c, *(kept.answer for kept in record.answers if kept.answer is not None)]
    header = json.dumps({
        "id": record.session_id, "owner": record.owner, "model": record.model, "created_at": record.created_at,
        "seq": record.last_applied_seq, "steps": record.steps_applied, "state_shape": list(record.h.shape),
        "answers": [[kept.seq, None if kept.answer is None else list(kept.answer.shape),
                     kept.digest.hex() if kept.digest else None] for kept in record.answers],
        "data_bytes": sum(4 * array.size for array in arrays),
    }).encode()
    return b"".join([_HEADER_LENGTH.pack(len(header)), header,
                     *(np.ascontiguousarray(array, "<f4").tobytes() for array in arrays)])


def decode(data: bytes | memoryview, offset: int = 0) -> tuple[SessionRecord, int]:
    """The record encoded at `offset`, and the offset just past it; RecordRejected if it is not one."""
    try:
        (length,) = _HEADER_LENGTH.unpack_from(data, offset)
        start = offset + _HEADER_LENGTH.size
        header = json.loads(bytes(data[start:start + length]))
        cursor, end = start + length, start + length + int(header["data_bytes"])
        if end > len(data):
            raise ValueError("the record runs past the end of the data")

        def take(shape) -> np.ndarray:
            nonlocal cursor
            size = 4 * int(np.prod(shape, dtype=np.int64))
            if size < 0 or cursor + size > end:
                raise ValueError("arrays run past the record's data")
            array = np.frombuffer(data, "<f4", size // 4, cursor).reshape(shape).astype(np.float32)
            cursor += size
            return array

        state_shape = tuple(int(d) for d in header["state_shape"])
        h, c = take(state_shape), take(state_shape)
        answers = tuple(KeptAnswer(int(seq), None if shape is None else take(tuple(int(d) for d in shape)),
                                   bytes.fromhex(digest) if digest else None)
                        for seq, shape, digest in header["answers"])
        record = SessionRecord(str(header["id"]), str(header["owner"]), str(header["model"]),
                               float(header["created_at"]), int(header["seq"]), int(header["steps"]), h, c, answers)
    except (struct.error, ValueError, KeyError, TypeError, OverflowError) as error:
        raise RecordRejected(f"corrupt record: {error}") from error
    return record, end


def _readable(identity: str):
    try:
        return json.loads(identity)
    except ValueError:
        return identity
