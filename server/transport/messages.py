"""Conversions between lstmserve.v1 messages and the engine's types."""

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from server.engine import EngineLimits, SessionView
from server.model import ModelMetadata
from server.models.registry import VersionStatus
from server.transport.details import error_details
from server.transport.errors import status_for

# An error answer's code, message and details (each detail repeats the message as its description, beside its
# type's name and a field path, a setting's name or a delay): the server's messages are under 256 bytes (client
# text in them is clipped), and no error has more than two details.
ERROR_ANSWER_BYTES = 768


def optional_tensor(message, field: str) -> np.ndarray | None:
    """The named Tensor field decoded, or None when the client left it unset."""
    if not message.HasField(field):
        return None
    return tensors.from_proto(getattr(message, field), name=field)


def session_info(view: SessionView, model: tuple[str, int]) -> pb.SessionInfo:
    """`model`: the (name, version) the session runs on."""
    return pb.SessionInfo(
        model_name=model[0],
        model_version=model[1],
        session_id=view.session_id,
        steps_applied=view.steps_applied,
        last_sequence_number=view.last_sequence_number,
        created_at=_timestamp(view.created_at),
        last_used_at=_timestamp(view.last_used_at),
        expires_at=_timestamp(view.expires_at),
        idle_timeout_seconds=view.idle_timeout,
    )


def error_answer(error: Exception, path: str = "", answer: pb.Error | None = None) -> pb.Error:
    """An in-band error: what the call's status and its details would be (the fields of a google.rpc.Status),
    filled into `answer` when given. `path`: where the refused request sits in its message (`steps[3].`)."""
    code, message = status_for(error)
    answer = pb.Error() if answer is None else answer
    answer.code, answer.message = code.value[0], message
    answer.details.extend(error_details(error, path))
    return answer


def model_info(m: ModelMetadata, version: int, limits: EngineLimits | None = None, max_batch_entries: int = 0
               ) -> pb.ModelInfo:
    """A version's sizes and identity, and the limits its requests meet when given."""
    info = pb.ModelInfo(name=m.name, version=m.version, model_version=version, input_size=m.input_size,
                        hidden_size=m.hidden_size, num_layers=m.num_layers, output_size=m.output_size,
                        dtype=m.dtype)
    if limits is not None:
        info.idle_timeout_seconds, info.answers_kept = limits.idle_timeout, limits.answers_kept
        info.batching.CopyFrom(pb.BatchingLimits(
            max_batch_size=limits.max_batch_size, max_batch_delay_seconds=limits.max_batch_delay,
            max_steps_per_request=limits.max_steps_per_request, max_sequence_length=limits.max_sequence_length,
            max_batch_entries=max_batch_entries))
    return info


def model_status(status: VersionStatus) -> pb.ModelVersionStatus:
    message = pb.ModelVersionStatus(name=status.name, version=status.version,
                                    state=pb.ModelVersionStatus.State.Value(status.state.value),
                                    reason=status.reason, live_sessions=status.live_sessions,
                                    is_default=status.is_default)
    if status.metadata is not None:
        message.info.CopyFrom(model_info(status.metadata, status.version))
    return message


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp
