"""The kept answers of every session, pooled by slot like the states: a ring of `keep` positions per slot.

A session's answer to request `seq` sits at position `seq % keep` of its slot, so a slot holds the answers of
its latest `keep` requests with no per-session object at all: an idle session costs its state, its small
Session record and the rows its answers fill here. Slots are grouped in chunks of CHUNK, allocated on first
use and never copied, each laid out position-major: a position's rows of neighbouring slots share pages, so
sessions that made one request fill one row each, not a page each. The blocks are anonymous maps, mapped by
the OS a 4 KiB page at a time when first written: numpy's own large arrays ask for 2 MiB huge pages, which
made an idle medium-model session cost 2.8 KiB here instead of 1 KiB.

A slot is reused by later sessions, so an entry only counts for the session now in it when its sequence number
is above the session's `kept_since` (see `answer_of`): every request after that number was applied by this
session, whose own answer then overwrote the position.
"""

import mmap

import numpy as np

from server.engine.sessions import Session
from server.store import KeptAnswer

CHUNK = 1024  # slots per chunk
DIGEST_BYTES = 8  # sessions.inputs_digest's size; a kept answer with any other is kept as "digest unknown"

_META = np.dtype([("seq", "<i8"), ("steps", "<i4"), ("digested", "u1"), ("digest", f"V{DIGEST_BYTES}")])


class _Chunk:
    """CHUNK slots' entries: `meta[position, row]`, single-step outputs in `outputs[position, row]`, and the
    rare answers of several steps (or none: a reset keeps steps 0) by `(position, row)` in `long`."""

    __slots__ = ("meta", "outputs", "long")

    def __init__(self, keep: int):
        self.meta = _zeros((keep, CHUNK), _META)
        self.outputs: np.ndarray | None = None  # [keep, CHUNK, output], made by the first single-step answer
        self.long: dict[tuple[int, int], np.ndarray] = {}

    def block(self, output_size: int) -> np.ndarray:
        if self.outputs is None:
            self.outputs = _zeros((self.meta.shape[0], CHUNK, output_size), np.float32)
        return self.outputs


class AnswerRing:
    """The answers of each slot's latest `keep` requests, with their inputs' digests."""

    def __init__(self, keep: int):
        self.keep = keep
        self._chunks: dict[int, _Chunk] = {}

    def put_batch(self, slots: np.ndarray, seqs: np.ndarray, digests: list[bytes | None],
                  outputs: np.ndarray | None) -> None:
        """Keeps a batch's answers: request `seqs[i]` of slot `slots[i]` answered `outputs[i]` ([B, T, output];
        None for resets). One assignment per chunk touched for single steps, the common case."""
        if outputs is not None and outputs.shape[1] != 1:
            for i, slot in enumerate(slots.tolist()):
                self.put(slot, KeptAnswer(int(seqs[i]), outputs[i].copy(), digests[i]))
            return
        records = np.zeros(len(slots), _META)
        records["seq"] = seqs
        records["steps"] = 0 if outputs is None else 1
        if all(digest is not None and len(digest) == DIGEST_BYTES for digest in digests):
            records["digest"] = np.frombuffer(b"".join(digests), records.dtype["digest"])
            records["digested"] = 1
        else:
            for i, digest in enumerate(digests):
                records[i] = _record(int(seqs[i]), records["steps"][i], digest)
        positions = seqs % self.keep
        chunks, rows = np.divmod(slots, CHUNK)
        for number, chosen in _by_chunk(chunks):
            chunk, p, r = self._chunk(number), positions[chosen], rows[chosen]
            chunk.meta[p, r] = records[chosen]
            if outputs is not None:
                chunk.block(outputs.shape[2])[p, r] = outputs[chosen, 0]
            if chunk.long:
                for key in zip(p.tolist(), r.tolist()):
                    chunk.long.pop(key, None)

    def put(self, slot: int, kept: KeptAnswer) -> None:
        """Keeps one answer (a record's, a long one)."""
        chunk, position, row = self._chunk(slot // CHUNK), kept.seq % self.keep, slot % CHUNK
        chunk.long.pop((position, row), None)
        steps = 0 if kept.answer is None else int(kept.answer.shape[0])
        if steps == 1 and kept.answer.ndim == 2:
            chunk.block(kept.answer.shape[1])[position, row] = kept.answer[0]
        elif steps:
            chunk.long[(position, row)] = kept.answer
            steps = max(steps, 2)  # not in the block, whatever its shape
        chunk.meta[position, row] = _record(kept.seq, steps, kept.digest)

    def release(self, slot: int) -> None:
        """A slot's session ended: its long answers go (its other entries are harmless, see kept_since)."""
        chunk = self._chunks.get(slot // CHUNK)
        if chunk is not None and chunk.long:
            row = slot % CHUNK
            for position in range(self.keep):
                chunk.long.pop((position, row), None)

    def load(self, session: Session, last_applied_seq: int, answers: tuple[KeptAnswer, ...]) -> None:
        """Makes a stored session's kept answers the ones of `session` (its numbering is being replaced)."""
        self.release(session.slot)
        chunk = self._chunks.get(session.slot // CHUNK)
        if chunk is not None:  # earlier entries of the slot must not pass for the stored session's
            chunk.meta["seq"][:, session.slot % CHUNK] = 0
        kept = [a for a in answers if last_applied_seq - self.keep < a.seq <= last_applied_seq]
        for answer in kept:
            self.put(session.slot, answer)
        session.kept_since = min((a.seq for a in kept), default=last_applied_seq + 1) - 1

    def answer_of(self, session: Session, seq: int) -> KeptAnswer | None:
        """The kept answer of `session`'s applied request `seq`, if it is still kept."""
        if not session.kept_since < seq <= session.last_applied_seq:
            return None
        return self._get(session.slot, seq)

    def answers_of(self, session: Session, latest: KeptAnswer | None = None) -> tuple[KeptAnswer, ...]:
        """`session`'s kept answers, oldest first; with `latest` (being committed) as the newest of them."""
        last = session.last_applied_seq if latest is None else latest.seq - 1
        first = max(session.kept_since + 1, (last if latest is None else latest.seq) - self.keep + 1)
        answers = [kept for seq in range(first, last + 1) if (kept := self._get(session.slot, seq)) is not None]
        return (*answers, latest) if latest is not None else tuple(answers)

    def _get(self, slot: int, seq: int) -> KeptAnswer | None:
        chunk = self._chunks.get(slot // CHUNK)
        if chunk is None:
            return None
        position, row = seq % self.keep, slot % CHUNK
        entry = chunk.meta[position, row]
        if int(entry["seq"]) != seq:
            return None
        steps = int(entry["steps"])
        if steps == 0:
            answer = None
        elif steps == 1:
            answer = chunk.outputs[position, row][None].copy()  # the row is overwritten by a later request
        else:
            answer = chunk.long[(position, row)]
        return KeptAnswer(seq, answer, entry["digest"].tobytes() if entry["digested"] else None)

    def _chunk(self, number: int) -> _Chunk:
        chunk = self._chunks.get(number)
        if chunk is None:
            chunk = self._chunks[number] = _Chunk(self.keep)
        return chunk


def _record(seq: int, steps: int, digest: bytes | None) -> tuple:
    if digest is None or len(digest) != DIGEST_BYTES:
        return seq, steps, 0, bytes(DIGEST_BYTES)
    return seq, steps, 1, digest


def _by_chunk(chunks: np.ndarray):
    """(chunk number, which entries) for each chunk a batch touches: one slice when it touches one."""
    first = int(chunks[0])
    if (chunks == first).all():
        return ((first, slice(None)),)
    return ((int(number), chunks == number) for number in np.unique(chunks))


def _zeros(shape: tuple, dtype) -> np.ndarray:
    """A zeroed array in an anonymous map of its own: pages are mapped at their first write, 4 KiB at a time."""
    dtype = np.dtype(dtype)
    memory = mmap.mmap(-1, int(np.prod(shape)) * dtype.itemsize)
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype).reshape(shape)
