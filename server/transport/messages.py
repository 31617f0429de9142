"""Conversions between lstmserve.v1 messages and the engine's types."""

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from server.engine import SessionView


def optional_tensor(message, field: str) -> np.ndarray | None:
    """The named Tensor field decoded, or None when the client left it unset."""
    if not message.HasField(field):
        return None
    return tensors.from_proto(getattr(message, field), name=field)


def session_info(view: SessionView) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=view.session_id,
        steps_applied=view.steps_applied,
        last_sequence_number=view.last_sequence_number,
        created_at=_timestamp(view.created_at),
        last_used_at=_timestamp(view.last_used_at),
        expires_at=_timestamp(view.expires_at),
        idle_timeout_seconds=view.idle_timeout,
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
