"""Calls made with the unmodified `tritonclient.grpc`; only ever imported in the child (triton_child.py).

Functions take and return plain values (arrays, dicts, strings) that cross the process boundary; an
error comes back as `Failure(status, message)`.
"""

import queue
import sys

import numpy as np
import tritonclient.grpc as triton
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.integration.triton_child import Failure


def server_facts(address: str, model: str) -> dict:
    """What a generic client learns about the server and the model before sending a request."""
    with triton.InferenceServerClient(address) as client:
        return {
            "live": client.is_server_live(),
            "ready": client.is_server_ready(),
            "model_ready": client.is_model_ready(model),
            "other_model_ready": client.is_model_ready(model + "-absent"),
            "server": client.get_server_metadata(as_json=True),
            "metadata": client.get_model_metadata(model, as_json=True),
            "config": client.get_model_config(model, as_json=True)["config"],
            "index": client.get_model_repository_index(as_json=True),
            "statistics": client.get_inference_statistics(model, as_json=True),
            "unknown_metadata": _failure_of(lambda: client.get_model_metadata(model + "-absent")),
        }


def infer_each(address: str, model: str, requests: list[dict]) -> list:
    """Sends each request with `infer()`, one after the other; returns each result or Failure."""
    with triton.InferenceServerClient(address) as client:
        return [_failure_of(lambda r=r: _result(client.infer(**_infer_args(model, r)))) for r in requests]


def stream_all(address: str, model: str, requests: list[dict]) -> list[tuple]:
    """Sends every request on one stream with `async_stream_infer()` without waiting for answers; returns
    `(response id, result)` or `(None, Failure)` per answer, in the order the answers arrived."""
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(address) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, request in enumerate(requests):
            client.async_stream_infer(request_id=str(i), **_infer_args(model, request))
        client.stop_stream()  # waits until every request is answered
    received = []
    while not answers.empty():
        result, error = answers.get()
        if error is None:
            received.append((result.get_response().id, _result(result)))
        else:
            received.append((None, Failure(str(error.status()), error.message())))
    return received


def infer_versioned(address: str, model: str, requests: list[dict]) -> list:
    """Like infer_each, but each result is `(the version that answered, its outputs)`."""
    with triton.InferenceServerClient(address) as client:
        return [_failure_of(lambda r=r: _versioned(client.infer(**_infer_args(model, r)))) for r in requests]


def client_call(address: str, method: str, args: tuple = (), kwargs: dict | None = None):
    """Any InferenceServerClient method (load_model, unload_model, get_model_repository_index, ...) called with
    `args` and `kwargs`; its result, or Failure."""
    with triton.InferenceServerClient(address) as client:
        return _failure_of(lambda: getattr(client, method)(*args, **(kwargs or {})))


def raw_infer(address: str, request_json: dict, raw_input_contents: list[bytes] = ()) -> dict | Failure:
    """One ModelInfer with a request built field by field from Triton's own generated messages, for what
    `infer()` never sends (typed `contents`, parameters of the wrong type)."""
    import grpc

    request = json_format.ParseDict(request_json, service_pb2.ModelInferRequest())
    request.raw_input_contents.extend(raw_input_contents)
    with grpc.insecure_channel(address) as channel:
        try:
            response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return Failure(error.code().name, error.details())
    return _result(triton.InferResult(response))


def run_example(code: str) -> str:
    """Runs a documentation example; returns what it printed."""
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "documentation example", "exec"), {})
    return printed.getvalue()


def _infer_args(model: str, request: dict) -> dict:
    inputs = []
    for name, array in request["inputs"].items():
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(np.asarray(array, dtype=np.float32))
        inputs.append(tensor)
    outputs = request.get("outputs")
    return {
        "model_name": request.get("model", model), "model_version": request.get("version", ""), "inputs": inputs,
        "outputs": None if outputs is None else [triton.InferRequestedOutput(name) for name in outputs],
        "sequence_id": request.get("sequence_id", 0), "sequence_start": request.get("start", False),
        "sequence_end": request.get("end", False)}


def _result(result: triton.InferResult) -> dict:
    response = result.get_response()
    return {output.name: result.as_numpy(output.name) for output in response.outputs}


def _versioned(result: triton.InferResult) -> tuple[str, dict]:
    return result.get_response().model_version, _result(result)


def _failure_of(call):
    try:
        return call()
    except InferenceServerException as error:
        return Failure(str(error.status()), error.message())


if __name__ == "__main__":
    from tests.integration.triton_child import serve

    answers = sys.stdout.buffer
    sys.stdout = sys.stderr  # the pipe carries answers only
    serve({name: function for name, function in globals().items() if callable(function)
           and not name.startswith("_")}, sys.stdin.buffer, answers)
