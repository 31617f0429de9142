"""Request building and answer decoding shared by the blocking and the asyncio clients."""

from typing import NamedTuple

import grpc
import numpy as np
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from client.errors import LstmError


class Prediction(NamedTuple):
    outputs: np.ndarray  # [seq_len, batch, output_size]
    h_n: np.ndarray  # [num_layers, batch, hidden_size]
    c_n: np.ndarray


class StepError(LstmError):
    """A streamed request the server answered with an error (in-band), read like a failed call's;
    `sequence_number`: the refused request's."""

    def __init__(self, error: pb.Error, sequence_number: int):
        super().__init__(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, error.details)
        self.sequence_number = sequence_number


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def optional(array) -> pb.Tensor | None:
    return None if array is None else tensors.to_proto(array)


def as_steps(x) -> tuple[np.ndarray, bool]:
    """`x` as `[T, input]`, and whether it was a single step `[input]` (answered as `[output]`)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    array = np.asarray(x, dtype=np.float32)
    return (array[np.newaxis], True) if array.ndim == 1 else (array, False)


def step_request(session_id: str, seq: int, x) -> tuple[pb.StepRequest, bool]:
    steps, single = as_steps(x)
    return pb.StepRequest(session_id=session_id, sequence_number=seq, inputs=tensors.to_proto(steps)), single


def step_outputs(response: pb.StepResponse, single: bool) -> np.ndarray:
    """The outputs of a step answer, or StepError if the server answered it with an error."""
    if response.HasField("error"):
        raise StepError(response.error, response.sequence_number)
    outputs = tensors.from_proto(response.outputs, name="outputs")
    return outputs[0] if single else outputs


def model_ref(model: str) -> tuple[str, int]:
    """"NAME[:VERSION]" as (name, version); an empty name is the server's only (or default) model, version 0 the
    model's current version."""
    name, _, version = model.partition(":")
    if version and not (version.isdigit() and int(version) > 0):
        raise ValueError(f"model {model!r}: the version after ':' is a positive integer")
    return name, int(version or 0)


def predict_request(inputs, h0=None, c0=None, model: str = "") -> pb.PredictRequest:
    name, version = model_ref(model)
    return pb.PredictRequest(inputs=tensors.to_proto(inputs), h0=optional(h0), c0=optional(c0), model_name=name,
                             model_version=version)


def prediction(response: pb.PredictResponse) -> Prediction:
    return Prediction(*(tensors.from_proto(t) for t in (response.outputs, response.h_n, response.c_n)))


def create_request(h0=None, c0=None, model: str = "") -> pb.CreateSessionRequest:
    name, version = model_ref(model)
    return pb.CreateSessionRequest(h0=optional(h0), c0=optional(c0), model_name=name, model_version=version)


def info_request(model: str = "") -> pb.GetModelInfoRequest:
    name, version = model_ref(model)
    return pb.GetModelInfoRequest(model_name=name, model_version=version)


def reset_request(session_id: str, seq: int, h=None, c=None) -> pb.ResetSessionRequest:
    return pb.ResetSessionRequest(session_id=session_id, sequence_number=seq, h=optional(h), c=optional(c))


def state(response: pb.SessionState) -> tuple[np.ndarray, np.ndarray]:
    return tensors.from_proto(response.h), tensors.from_proto(response.c)
