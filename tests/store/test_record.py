"""The session record codec refuses what is not a record with RecordRejected, whatever the bytes say."""

import json
import struct

import numpy as np
import pytest

from server.store import KeptAnswer, RecordRejected, SessionRecord
from server.store.record import decode, encode

STATE = np.zeros((1, 3), np.float32)
RECORD = SessionRecord("S", "alice", "m@1", 1.0, 2, 2, STATE, STATE, (KeptAnswer(2, np.ones((1, 3), np.float32)),))


def with_header(**changes) -> bytes:
    """RECORD's encoding with header fields replaced, as a damaged or hostile store could hand it back."""
    data = encode(RECORD)
    (length,) = struct.unpack_from("<I", data)
    header = {**json.loads(data[4:4 + length]), **changes}
    text = json.dumps(header).encode()
    return struct.pack("<I", len(text)) + text + data[4 + length:]


def test_a_record_round_trips():
    record, end = decode(with_header())
    assert (record.session_id, record.last_applied_seq, end) == ("S", 2, len(encode(RECORD)))
    np.testing.assert_array_equal(record.answers[0].answer, np.ones((1, 3)))


@pytest.mark.parametrize("changes", [{"state_shape": [2 ** 70]}, {"answers": [[2, [2 ** 70], None]]},
                                     {"created_at": 10 ** 400}],
                         ids=["state-shape", "answer-shape", "created-at"])
def test_numbers_too_large_for_their_use_are_a_corrupt_record_not_a_crash(changes):
    with pytest.raises(RecordRejected, match="corrupt record"):
        decode(with_header(**changes))
