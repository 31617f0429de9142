"""Live sessions across a restart: one file written atomically at shutdown, with a format version, the
model's identity and a checksum; read back whole or not at all at the next start."""

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from server.store.record import RecordRejected, SessionRecord, check_model, decode, encode
from server.store.seam import MemoryStore

log = logging.getLogger(__name__)

MAGIC = b"lstmserve-snapshot"
VERSION = 2  # 2: the session record codec shared with the state store (kept answers carry inputs' digests)
FILE_NAME = "sessions.snapshot"


class SnapshotStore(MemoryStore):
    """Sessions live in memory while the process runs, and in `directory` while it does not."""

    def __init__(self, directory: str | Path, model: str):
        self.path = Path(directory) / FILE_NAME
        self._model = model

    def restore(self, accept: Callable[[list[SessionRecord]], None]) -> int:
        """A rejected file (or one whose sessions `accept` refuses) is moved aside with a log line. A loaded file is
        removed, so that a crash later can never bring back state older than what clients have since seen."""
        if not self.path.exists():
            return 0
        try:
            records = read(self.path, self._model)
            accept(records)
        except Exception as error:  # noqa: BLE001 - whatever is wrong with the file, start empty and say why
            aside = self.path.with_name(f"{FILE_NAME}.rejected-{int(time.time())}")
            os.replace(self.path, aside)
            log.error("refused snapshot %s: %s; starting with no sessions (file moved to %s)", self.path, error,
                      aside)
            return 0
        os.remove(self.path)
        log.info("restored %d sessions from snapshot %s", len(records), self.path)
        return len(records)

    async def hand_over(self, records: list[SessionRecord]) -> None:
        write(self.path, self._model, records)
        log.info("wrote %d sessions to snapshot %s", len(records), self.path)


def write(path: Path, model: str, records: list[SessionRecord]) -> None:
    """Temp file, fsync, rename: a reader sees the old file or the whole new one, never a torn write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = b"".join(encode(record) for record in records)
    header = {"version": VERSION, "model": json.loads(model), "sessions": len(records),
              "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
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


def read(path: Path, model: str) -> list[SessionRecord]:
    """The records of a snapshot written for `model`; RecordRejected says why not."""
    first_line, _, payload = path.read_bytes().partition(b"\n")
    magic, _, header_text = first_line.partition(b" ")
    if magic != MAGIC:
        raise RecordRejected("not an lstmserve snapshot (bad magic)")
    try:
        header = json.loads(header_text)
    except ValueError as error:
        raise RecordRejected(f"corrupt header: {error}") from error
    if not isinstance(header, dict):
        raise RecordRejected("corrupt header: not a JSON object")
    if header.get("version") != VERSION:
        raise RecordRejected(f"format version {header.get('version')!r}, this server reads version {VERSION}")
    check_model(json.dumps(header.get("model"), sort_keys=True), model)
    if len(payload) != header.get("payload_bytes") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise RecordRejected("checksum mismatch: the file is truncated or corrupt")
    records, offset = [], 0
    while offset < len(payload):
        record, offset = decode(payload, offset)
        check_model(record.model, model)
        records.append(record)
    if len(records) != header.get("sessions"):
        raise RecordRejected(f"{len(records)} sessions in a file that says {header.get('sessions')}")
    return records
