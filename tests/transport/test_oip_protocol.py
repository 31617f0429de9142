"""The Open Inference Protocol messages: wire-compatible with Triton's, and decoded strictly."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from inference import grpc_service_pb2 as pb
from inference import model_config_pb2

from server.transport.oip_convert import OUTPUTS, RequestFormatError, decode_request

pytestmark = pytest.mark.unit


def triton_file(module: str) -> descriptor_pb2.FileDescriptorProto:
    """Triton's own descriptor, read from tritonclient's generated module without importing it (importing
    would register Triton's `inference` symbols beside ours, which protobuf refuses)."""
    package = Path(importlib.util.find_spec("tritonclient").submodule_search_locations[0])
    tree = ast.parse((package / "grpc" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return descriptor_pb2.FileDescriptorProto.FromString(ast.literal_eval(node.args[0]))
    raise AssertionError(f"no serialized descriptor in tritonclient.grpc.{module}")


def ours(module) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    return proto


def assert_messages_match(mine, theirs, path: str) -> None:
    """Every field of ours exists in Triton's message with the same number, type, label and oneof."""
    by_name = {field.name: field for field in theirs.field}
    for field in mine.field:
        assert field.name in by_name, f"{path}.{field.name} is not in Triton's {path}"
        other = by_name[field.name]
        for attribute in ("number", "type", "label", "type_name"):
            assert getattr(field, attribute) == getattr(other, attribute), f"{path}.{field.name}: {attribute}"
        oneof = mine.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        other_oneof = theirs.oneof_decl[other.oneof_index].name if other.HasField("oneof_index") else None
        assert oneof == other_oneof, f"{path}.{field.name}: oneof"
    nested = {message.name: message for message in theirs.nested_type}
    for message in mine.nested_type:
        assert message.name in nested, f"{path}.{message.name} is not in Triton's {path}"
        assert_messages_match(message, nested[message.name], f"{path}.{message.name}")


@pytest.mark.parametrize(("module", "triton_module"),
                         [(pb, "service_pb2"), (model_config_pb2, "model_config_pb2")])
def test_messages_and_enums_match_tritons_field_for_field(module, triton_module):
    mine, theirs = ours(module), triton_file(triton_module)
    assert mine.package == theirs.package == "inference"
    messages = {message.name: message for message in theirs.message_type}
    for message in mine.message_type:
        assert message.name in messages, f"{message.name} is not a Triton message"
        assert_messages_match(message, messages[message.name], message.name)
    enums = {enum.name: {v.name: v.number for v in enum.value} for enum in theirs.enum_type}
    for enum in mine.enum_type:
        assert {v.name: v.number for v in enum.value} == enums[enum.name]


def test_service_methods_match_tritons():
    (mine,), (theirs,) = ours(pb).service, triton_file("service_pb2").service
    assert mine.name == theirs.name == "GRPCInferenceService"
    methods = {method.name: method for method in theirs.method}
    for method in mine.method:
        other = methods[method.name]
        assert (method.input_type, method.output_type, method.client_streaming, method.server_streaming) == (
            other.input_type, other.output_type, other.client_streaming, other.server_streaming), method.name
    assert {m.name for m in mine.method} >= {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                             "ModelMetadata", "ModelInfer", "ModelStreamInfer", "ModelConfig",
                                             "ModelStatistics", "RepositoryIndex"}


# -- decoding --------------------------------------------------------------------------------------


def request(inputs: dict[str, np.ndarray], raw: bool = True, **parameters) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    for name, array in inputs.items():
        tensor = message.inputs.add(name=name, datatype="FP32", shape=array.shape)
        if raw:
            message.raw_input_contents.append(array.astype("<f4").tobytes())
        else:
            tensor.contents.fp32_contents.extend(array.ravel().tolist())
    for name, value in parameters.items():
        setattr(message.parameters[name], value[0], value[1])
    return message


X = np.arange(6, dtype=np.float32).reshape(3, 2)


@pytest.mark.parametrize("raw", [True, False])
def test_raw_and_typed_contents_decode_to_the_same_array(raw):
    call = decode_request(request({"INPUT": X, "H0": X[:1]}, raw=raw))
    np.testing.assert_array_equal(call.inputs["INPUT"], X)
    np.testing.assert_array_equal(call.inputs["H0"], X[:1])
    assert call.outputs == OUTPUTS and call.sequence_id is None


@pytest.mark.parametrize(("sequence_id", "expected"), [
    (("int64_param", 42), 42), (("uint64_param", 7), 7), (("string_param", "user-1"), "user-1"),
    (("int64_param", 0), None), (("string_param", ""), None)])
def test_sequence_ids_of_every_allowed_type(sequence_id, expected):
    call = decode_request(request({"INPUT": X}, sequence_id=sequence_id, sequence_start=("bool_param", True)))
    assert (call.sequence_id, call.start, call.end) == (expected, True, False)


def with_raw(message, contents):
    del message.raw_input_contents[:]
    message.raw_input_contents.extend(contents)
    return message


@pytest.mark.parametrize(("message", "error"), [
    (request({"INPUT": X}, sequence_id=("int64_param", 1), sequence_start=("int64_param", 1)),
     "sequence_start must be a bool; got int64"),
    (request({"INPUT": X}, sequence_id=("int64_param", 1), sequence_end=("string_param", "yes")),
     "sequence_end must be a bool; got string"),
    (request({"INPUT": X}, sequence_id=("double_param", 1.0)), "sequence_id must be .* got double"),
    (request({"INPUT": X}, sequence_id=("bool_param", True)), "sequence_id must be .* got bool"),
    (request({"H0": X}), "input INPUT is missing"),
    (request({"INPUT": X, "X": X}), "unknown input 'X'"),
    (with_raw(request({"INPUT": X}), [b"\0" * 20]), "needs 24 bytes of FP32, got 20"),
    (with_raw(request({"INPUT": X}), []), "needs 6 values in contents.fp32_contents, got 0"),
    (with_raw(request({"INPUT": X, "H0": X}), [b""]), "raw_input_contents has 1 entries for 2 inputs"),
])
def test_malformed_requests_are_refused_with_a_reason(message, error):
    with pytest.raises(RequestFormatError, match=error):
        decode_request(message)


def test_datatype_outputs_and_tensor_parameters_are_checked():
    message = request({"INPUT": X})
    message.inputs[0].datatype = "FP64"
    with pytest.raises(RequestFormatError, match="datatype 'FP64'; the model takes FP32"):
        decode_request(message)
    message = request({"INPUT": X})
    message.outputs.add(name="HN")
    message.outputs.add(name="OUTPUT")
    assert decode_request(message).outputs == ("HN", "OUTPUT")
    message.outputs.add(name="LOGITS")
    with pytest.raises(RequestFormatError, match="unknown output 'LOGITS'"):
        decode_request(message)
    message = request({"INPUT": X})
    message.inputs[0].parameters["shared_memory_region"].string_param = "region"
    with pytest.raises(RequestFormatError, match="shared_memory_region is not supported"):
        decode_request(message)
