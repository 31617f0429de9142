"""Conversions between Open Inference Protocol (`inference`) messages and arrays, and the model's description.

Tensor convention (see docs/oip.md): a sequence request (`sequence_id` set) sends `INPUT[T, input_size]` and,
with START only, `H0`, `C0[num_layers, hidden_size]`; it gets `OUTPUT[T, output_size]` and the state after
it, `HN`, `CN[num_layers, hidden_size]`. A stateless request sends the same tensors with a batch axis at
position 1: `INPUT[seq_len, batch, input_size]`, `H0`, `C0[num_layers, batch, hidden_size]`.
"""

import dataclasses
import functools

import numpy as np
from inference import grpc_service_pb2 as pb
from inference import model_config_pb2 as config_pb
from lstmserve import tensors

from server.engine import EngineLimits, SequenceId
from server.logsafe import clip
from server.model import ModelMetadata

DATATYPE = "FP32"
WIRE_DTYPE = np.dtype("<f4")
INPUTS = ("INPUT", "H0", "C0")
OUTPUTS = ("OUTPUT", "HN", "CN")
STATE_OUTPUTS = ("HN", "CN")
PLATFORM = "pytorch_libtorch"  # Triton's name for TorchScript models
UNSUPPORTED_TENSOR_PARAMETERS = ("shared_memory_region", "classification")
_ID, _RAW_OUTPUT_CONTENTS = (pb.ModelInferResponse.DESCRIPTOR.fields_by_name[name].number
                             for name in ("id", "raw_output_contents"))
_STREAM_INFER_RESPONSE = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number


class RequestFormatError(ValueError):
    """An inference request whose tensors or parameters do not follow the protocol or this model."""


class UnknownModel(LookupError):
    """A request for a model (or version) this server does not serve."""


class LoadFailed(Exception):
    """A repository load after which a version of the model is UNAVAILABLE (Triton answers INVALID_ARGUMENT)."""


@dataclasses.dataclass(slots=True)
class InferCall:
    """A decoded ModelInferRequest."""

    inputs: dict[str, np.ndarray]  # INPUT, and H0 / C0 when sent
    outputs: tuple[str, ...]  # the outputs to return, in the order to return them
    sequence_id: SequenceId | None  # None: a stateless request
    start: bool = False
    end: bool = False
    version: str = ""  # of the model version that serves it (the servicer's choice, not the request's)


def decode_request(request: pb.ModelInferRequest) -> InferCall:
    """Checks names, datatypes, shapes (that numpy can hold them), payload sizes and parameters; whether the
    shapes fit the model is the engine's to check. Runs once per streamed step: each field is read once (every
    read of a protobuf field builds an object) and empty parameter maps are not searched."""
    raw, tensors_in = request.raw_input_contents, request.inputs
    if raw and len(raw) != len(tensors_in):
        raise RequestFormatError(f"raw_input_contents has {len(raw)} entries for {len(tensors_in)} "
                                 "inputs; send one per input, in the order of inputs")
    inputs = {}
    for i, tensor in enumerate(tensors_in):
        name = tensor.name
        if name not in INPUTS:
            raise RequestFormatError(f"unknown input {clip(name)}; this model takes {', '.join(INPUTS)}")
        if name in inputs:
            raise RequestFormatError(f"input {name} is sent twice")
        if tensor.parameters:
            _check_tensor_parameters(f"input {name}", tensor.parameters)
        inputs[name] = _decode_tensor(tensor, name, raw[i] if raw else None)
    if "INPUT" not in inputs:
        raise RequestFormatError("input INPUT is missing")
    sequence_id, start, end = _sequence_parameters(request.parameters)
    return InferCall(inputs, _requested_outputs(request.outputs), sequence_id, start, end)


def encode_response(request: pb.ModelInferRequest, version: str, outputs: dict[str, np.ndarray]) -> list:
    """The parts of a serialized ModelInferResponse (bytes-like, len() their size in bytes), for `infer_response`
    or `stream_response`: the named arrays as FP32 outputs in `raw_output_contents`, which is where tritonclient
    reads them. Each payload is copied once, when the parts are joined (see lstmserve.tensors.encoded)."""
    payloads = [memoryview(np.ascontiguousarray(array, dtype=WIRE_DTYPE)).cast("B") for array in outputs.values()]
    parts = [_header(request.model_name, version, tuple(zip(outputs, (array.shape for array in outputs.values()))))]
    if request_id := request.id:
        parts += tensors.length_delimited(_ID, request_id.encode())
    for payload in payloads:
        parts += (tensors.field_head(_RAW_OUTPUT_CONTENTS, len(payload)), payload)
    return parts


@functools.lru_cache(maxsize=4096)
def _header(model_name: str, version: str, outputs: tuple[tuple[str, tuple[int, ...]], ...]) -> bytes:
    """A ModelInferResponse's model_name, model_version and `outputs` by `(name, shape)`, serialized once for
    all the responses that share them (a stream's steps have one shape or a handful)."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=version)
    for name, shape in outputs:
        response.outputs.add(name=name, datatype=DATATYPE, shape=shape)
    return response.SerializeToString()


def infer_response(parts: list) -> bytes:
    """A serialized ModelInferResponse (ModelInfer's answer) from encode_response's parts."""
    return b"".join(parts)


def stream_response(parts: list) -> bytes:
    """A serialized ModelStreamInferResponse carrying the ModelInferResponse of encode_response's parts."""
    return b"".join((tensors.field_head(_STREAM_INFER_RESPONSE, sum(map(len, parts))), *parts))


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, name: str, raw: bytes | None) -> np.ndarray:
    """The tensor's data without copying raw bytes; the declared size is checked before anything is built."""
    shape = tuple(tensor.shape)
    if tensor.datatype != DATATYPE:
        raise RequestFormatError(f"input {name} has datatype {clip(tensor.datatype)}; the model takes {DATATYPE}")
    count = tensors.element_count(shape, f"input {name}")
    if raw is not None:
        if tensor.HasField("contents"):
            raise RequestFormatError(f"input {name} has both contents and raw_input_contents; send one")
        if len(raw) != count * WIRE_DTYPE.itemsize:
            raise RequestFormatError(f"input {name}: shape {list(shape)} needs {count * WIRE_DTYPE.itemsize} "
                                     f"bytes of FP32, got {len(raw)}")
        return np.frombuffer(raw, dtype=WIRE_DTYPE).reshape(shape)
    values = tensor.contents.fp32_contents
    if len(values) != count:
        raise RequestFormatError(f"input {name}: shape {list(shape)} needs {count} values in "
                                 f"contents.fp32_contents, got {len(values)}")
    return np.asarray(values, dtype=np.float32).reshape(shape)


def _sequence_parameters(parameters) -> tuple[SequenceId | None, bool, bool]:
    """Triton's sequence extension: `sequence_id` (int64, uint64 or string; 0 or "" for none) and flags."""
    if not parameters:
        return None, False, False
    start, end = _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end")
    if "sequence_id" not in parameters:  # `in` and [] cost a tenth of the map's get()
        return None, start, end
    parameter = parameters["sequence_id"]
    kind = parameter.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param", "string_param"):
        raise RequestFormatError(f"parameter sequence_id must be an int64, uint64 or string; "
                                 f"got {_kind(kind)}")
    sequence_id = getattr(parameter, kind)
    return (None if sequence_id in (0, "") else sequence_id), start, end


def _flag(parameters, name: str) -> bool:
    if name not in parameters:
        return False
    parameter = parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise RequestFormatError(f"parameter {name} must be a bool; got {_kind(kind)}")
    return parameter.bool_param


def _kind(kind: str | None) -> str:
    return kind.removesuffix("_param") if kind else "no value"


def _requested_outputs(requested) -> tuple[str, ...]:
    names = []
    for output in requested:
        if output.name not in OUTPUTS:
            raise RequestFormatError(f"unknown output {clip(output.name)}; the model returns "
                                     f"{', '.join(OUTPUTS)}")
        if output.name in names:
            raise RequestFormatError(f"output {output.name} is requested twice")
        if output.parameters:
            _check_tensor_parameters(f"output {output.name}", output.parameters)
        names.append(output.name)
    return tuple(names) or OUTPUTS


def _check_tensor_parameters(what: str, parameters) -> None:
    for name in UNSUPPORTED_TENSOR_PARAMETERS:
        if name in parameters:
            raise RequestFormatError(f"{what}: parameter {name} is not supported by this server")


# -- the model's description ----------------------------------------------------------------------------


def _tensor_shapes(m: ModelMetadata) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Input and output shapes of a sequence request; -1 marks the time axis, of any length."""
    state = [m.num_layers, m.hidden_size]
    return ({"INPUT": [-1, m.input_size], "H0": state, "C0": state},
            {"OUTPUT": [-1, m.output_size], "HN": state, "CN": state})


def model_metadata(m: ModelMetadata) -> pb.ModelMetadataResponse:
    inputs, outputs = _tensor_shapes(m)
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=m.name, versions=[m.version], platform=PLATFORM,
        inputs=[tensor(name=name, datatype=DATATYPE, shape=shape) for name, shape in inputs.items()],
        outputs=[tensor(name=name, datatype=DATATYPE, shape=shape) for name, shape in outputs.items()])


def model_config(m: ModelMetadata, limits: EngineLimits) -> config_pb.ModelConfig:
    inputs, outputs = _tensor_shapes(m)
    return config_pb.ModelConfig(
        name=m.name, platform=PLATFORM, backend="pytorch", max_batch_size=0,
        input=[config_pb.ModelInput(name=name, data_type=config_pb.TYPE_FP32, dims=dims,
                                    optional=name != "INPUT") for name, dims in inputs.items()],
        output=[config_pb.ModelOutput(name=name, data_type=config_pb.TYPE_FP32, dims=dims)
                for name, dims in outputs.items()],
        sequence_batching=config_pb.ModelSequenceBatching(
            max_sequence_idle_microseconds=round(limits.idle_timeout * 1e6)))
