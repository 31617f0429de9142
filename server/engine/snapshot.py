"""Live sessions across a restart: one file written atomically, with a version header, the model's identity
and a checksum; loaded whole or not at all."""

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from server.engine.sessions import KeptAnswer

log = logging.getLogger(__name__)

MAGIC = b"lstmserve-snapshot"
VERSION = 2  # 2: kept answers carry their inputs' digest
READABLE_VERSIONS = (1, VERSION)  # version 1's answers have no digest: their replays are not checked
FILE_NAME = "sessions.snapshot"


@dataclasses.dataclass(frozen=True)
class SessionRecord:
    """What a session needs to carry on after a restart: its applied state and its kept answers."""

    session_id: str
    owner: str
    created_at: float
    last_applied_seq: int
    steps_applied: int
    h: np.ndarray  # [num_layers, hidden]
    c: np.ndarray
    answers: tuple  # KeptAnswer, oldest first


class SnapshotRejected(Exception):
    """A snapshot that is corrupt, of another format version, or written for another model."""


def save(directory: str | Path, engine) -> int:
    """Writes the engine's live sessions (call after it stopped); returns how many."""
    records = engine.export_sessions()
    path = Path(directory) / FILE_NAME
    write(path, engine.runtime.metadata, records)
    log.info("wrote %d sessions to snapshot %s", len(records), path)
    return len(records)


def restore(directory: str | Path, engine) -> int:
    """Loads a snapshot into the engine, if there is one; a rejected file is moved aside with a log line.

    A loaded snapshot is removed, so that a crash later can never bring back state older than what clients
    have since seen acknowledged.
    """
    path = Path(directory) / FILE_NAME
    if not path.exists():
        return 0
    try:
        records = read(path, engine.runtime.metadata)
        engine.import_sessions(records)
    except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, start empty and say why
        aside = path.with_name(f"{FILE_NAME}.rejected-{int(time.time())}")
        os.replace(path, aside)
        log.error("refused snapshot %s: %s; starting with no sessions (file moved to %s)", path, error, aside)
        return 0
    os.remove(path)
    log.info("restored %d sessions from snapshot %s", len(records), path)
    return len(records)


def write(path: Path, metadata, records: list[SessionRecord]) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the whole new one, never a torn write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _encode(records)
    header = {
        "version": VERSION,
        "model": dataclasses.asdict(metadata),
        "sessions": len(records),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(temp, "wb") as f:
        f.write(MAGIC + b" " + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read(path: Path, metadata) -> list[SessionRecord]:
    """The records of a snapshot written for this model; SnapshotRejected says why not."""
    data = path.read_bytes()
    first_line, _, payload = data.partition(b"\n")
    magic, _, header_text = first_line.partition(b" ")
    if magic != MAGIC:
        raise SnapshotRejected("not an lstmserve snapshot (bad magic)")
    try:
        header = json.loads(header_text)
    except ValueError as error:
        raise SnapshotRejected(f"corrupt header: {error}") from error
    if not isinstance(header, dict):
        raise SnapshotRejected("corrupt header: not a JSON object")
    if header.get("version") not in READABLE_VERSIONS:
        raise SnapshotRejected(
            f"format version {header.get('version')!r}, this server reads version {VERSION}"
        )
    if header.get("model") != dataclasses.asdict(metadata):
        raise SnapshotRejected(
            f"written for model {header.get('model')}, this server runs {dataclasses.asdict(metadata)}"
        )
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header.get(
        "sha256"
    ):
        raise SnapshotRejected("checksum mismatch: the file is truncated or corrupt")
    try:
        return _decode(payload, (metadata.num_layers, metadata.hidden_size))
    except (ValueError, KeyError, TypeError) as error:
        raise SnapshotRejected(f"corrupt payload: {error}") from error


def _encode(records: list[SessionRecord]) -> bytes:
    """An .npz (no pickles): the sessions' bookkeeping as JSON, their states stacked, answers concatenated."""
    meta, answers = [], []
    for r in records:
        shapes = []
        for seq, answer, digest in r.answers:
            shapes.append([seq, None if answer is None else list(answer.shape), digest and digest.hex()])
            if answer is not None:
                answers.append(np.asarray(answer, np.float32).ravel())
        meta.append(
            {
                "id": r.session_id,
                "owner": r.owner,
                "created_at": r.created_at,
                "seq": r.last_applied_seq,
                "steps": r.steps_applied,
                "answers": shapes,
            }
        )
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
        h=np.stack([r.h for r in records]) if records else np.zeros(0, np.float32),
        c=np.stack([r.c for r in records]) if records else np.zeros(0, np.float32),
        answers=np.concatenate(answers) if answers else np.zeros(0, np.float32),
    )
    return buffer.getvalue()


def _decode(payload: bytes, slot_shape: tuple[int, int]) -> list[SessionRecord]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes())
        h, c, flat = arrays["h"], arrays["c"], arrays["answers"]
    if meta and (h.shape != (len(meta), *slot_shape) or c.shape != h.shape):
        raise ValueError(f"states of shape {list(h.shape)} for {len(meta)} sessions of {list(slot_shape)}")
    records, offset = [], 0
    for i, m in enumerate(meta):
        answers = []
        for seq, shape, *digest_hex in m["answers"]:
            digest = bytes.fromhex(digest_hex[0]) if digest_hex and digest_hex[0] else None
            if shape is None:
                answers.append(KeptAnswer(int(seq), None, digest))
                continue
            size = int(np.prod(shape))
            if offset + size > flat.size:
                raise ValueError("answers run past the end of the payload")
            answers.append(KeptAnswer(int(seq), flat[offset : offset + size].reshape(shape).copy(), digest))
            offset += size
        records.append(
            SessionRecord(
                str(m["id"]),
                str(m["owner"]),
                float(m["created_at"]),
                int(m["seq"]),
                int(m["steps"]),
                h[i].copy(),
                c[i].copy(),
                tuple(answers),
            )
        )
    return records
