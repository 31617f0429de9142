"""The Open Inference Protocol endpoint driven by the unmodified `tritonclient.grpc` against the real server.

tritonclient runs in a child process (see triton_child.py); every answer is checked against the same
TorchScript model run in-process, and against the native API given the same inputs and state.
"""

import logging
import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference import grpc_service_pb2 as oip_pb
from inference import grpc_service_pb2_grpc as oip_pb_grpc

from client.sync import LstmClient
from tests.conftest import export_model
from tests.integration.triton_child import Failure, triton_child
from tests.metric_samples import total
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

MODEL = "oip-lstm"
INPUT, HIDDEN, LAYERS, OUTPUT = 5, 8, 2, 6
OIP_SERVICE = "inference.GRPCInferenceService"
INVALID_ARGUMENT, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"


@pytest.fixture(scope="module")
def model(models_dir):
    return export_model(models_dir, MODEL, INPUT, HIDDEN, LAYERS, OUTPUT, seed=1)


@pytest.fixture(scope="module")
def server(model):
    with server_in_thread(model[0]) as server:
        yield server


@pytest.fixture(scope="module")
def triton():
    with triton_child() as child:
        yield child


@pytest.fixture(scope="module")
def native(server):
    with LstmClient(server.address, timeout=30) as client:
        yield client


def rng(seed: int):
    return np.random.default_rng(seed)


def steps(count: int, seed: int) -> np.ndarray:
    return rng(seed).standard_normal((count, INPUT)).astype(np.float32)


def state(seed: int, batch: int | None = None) -> np.ndarray:
    shape = (LAYERS, HIDDEN) if batch is None else (LAYERS, batch, HIDDEN)
    return (0.5 * rng(seed).standard_normal(shape)).astype(np.float32)


def reference(model, x: np.ndarray, h0: np.ndarray, c0: np.ndarray):
    """The scripted module in-process: `x[T, B, input]`, `(h0, c0)[layers, B, hidden]` -> `(y, h_n, c_n)`."""
    with torch.no_grad():
        y, (h, c) = model[1](torch.from_numpy(x), (torch.from_numpy(h0), torch.from_numpy(c0)))
    return y.numpy(), h.numpy(), c.numpy()


def reference_chunks(model, chunks, h0=None, c0=None) -> list[dict]:
    """What a sequence of `[T, input]` chunks should answer, chunk by chunk, state carried in-process."""
    h = np.zeros((LAYERS, HIDDEN), np.float32) if h0 is None else h0
    c = np.zeros((LAYERS, HIDDEN), np.float32) if c0 is None else c0
    answers = []
    for x in chunks:
        y, h_n, c_n = reference(model, x[:, None], h[:, None], c[:, None])
        h, c = h_n[:, 0], c_n[:, 0]
        answers.append({"OUTPUT": y[:, 0], "HN": h, "CN": c})
    return answers


def assert_results(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert not isinstance(actual, Failure), actual
    assert set(actual) == set(expected)
    for name, array in expected.items():
        assert actual[name].shape == array.shape, name
        np.testing.assert_allclose(actual[name], array, atol=atol, err_msg=name)


def live_sessions(server) -> float:
    return total(server.app.metrics.registry, "lstmserve_live_sessions")


def test_liveness_readiness_and_model_discovery(server, triton):
    facts = triton.call("server_facts", server.address, MODEL)
    assert facts["live"] and facts["ready"] and facts["model_ready"]
    assert not facts["other_model_ready"]
    assert facts["server"]["name"] == "lstmserve" and "sequence" in facts["server"]["extensions"]
    metadata = facts["metadata"]
    assert metadata["name"] == MODEL and metadata["versions"] == ["test"]
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]])
              for t in metadata["inputs"] + metadata["outputs"]}
    state_shape = ("FP32", [LAYERS, HIDDEN])
    assert shapes == {"INPUT": ("FP32", [-1, INPUT]), "H0": state_shape, "C0": state_shape,
                      "OUTPUT": ("FP32", [-1, OUTPUT]), "HN": state_shape, "CN": state_shape}
    config = facts["config"]
    assert config["name"] == MODEL and config.get("max_batch_size", 0) == 0
    assert [(i["name"], i.get("optional", False)) for i in config["input"]] == [
        ("INPUT", False), ("H0", True), ("C0", True)]
    assert int(config["sequence_batching"]["max_sequence_idle_microseconds"]) == 600 * 10**6
    assert facts["index"]["models"] == [{"name": MODEL, "version": "test", "state": "READY"}]
    assert facts["statistics"]["model_stats"][0]["name"] == MODEL
    assert facts["unknown_metadata"].status == NOT_FOUND
    assert f"'{MODEL}-absent'" in facts["unknown_metadata"].message


def test_health_and_reflection_name_the_service(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=OIP_SERVICE))
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in next(reflection).list_services_response.service}
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert OIP_SERVICE in services


def test_stateless_batched_request_matches_the_model_and_native_predict(server, triton, model, native):
    x = rng(1).standard_normal((6, 3, INPUT)).astype(np.float32)
    h0, c0 = state(2, batch=3), state(3, batch=3)
    with_state, output_only = triton.call("infer_each", server.address, MODEL, [
        {"inputs": {"INPUT": x, "H0": h0, "C0": c0}}, {"inputs": {"INPUT": x}, "outputs": ["OUTPUT"]}])
    y, h_n, c_n = reference(model, x, h0, c0)
    assert_results(with_state, {"OUTPUT": y, "HN": h_n, "CN": c_n})
    zeros = np.zeros_like(h0)
    assert_results(output_only, {"OUTPUT": reference(model, x, zeros, zeros)[0]})
    predicted = native.predict(x, h0, c0)
    assert_results(with_state, {"OUTPUT": predicted.outputs, "HN": predicted.h_n, "CN": predicted.c_n})


def test_typed_contents_are_accepted_like_raw_bytes(server, triton, model):
    x = steps(4, 4)
    request = {"model_name": MODEL, "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [4, 1, INPUT],
                                                "contents": {"fp32_contents": x.ravel().tolist()}}]}
    result = triton.call("raw_infer", server.address, request)
    zeros = np.zeros((LAYERS, 1, HIDDEN), np.float32)
    y, h_n, c_n = reference(model, x[:, None], zeros, zeros)
    assert_results(result, {"OUTPUT": y, "HN": h_n, "CN": c_n})


def sequence_requests(sequence_id, chunks, h0=None, c0=None) -> list[dict]:
    requests = [{"inputs": {"INPUT": x}, "sequence_id": sequence_id} for x in chunks]
    requests[0]["start"] = True
    requests[-1]["end"] = True
    if h0 is not None:
        requests[0]["inputs"].update(H0=h0, C0=c0)
    return requests


def test_a_sequence_request_by_request_with_infer_matches_the_model_and_a_native_session(
        server, triton, model, native):
    chunks = [steps(3, 10), steps(1, 11), steps(5, 12)]
    h0, c0 = state(13), state(14)
    before = live_sessions(server)
    results = triton.call("infer_each", server.address, MODEL, sequence_requests(42, chunks, h0, c0))
    expected = reference_chunks(model, chunks, h0, c0)
    for result, answer in zip(results, expected, strict=True):
        assert_results(result, answer)
    with native.session(h0, c0) as session:
        for result, x in zip(results, chunks, strict=True):
            np.testing.assert_allclose(result["OUTPUT"], session.step(x), atol=1e-5)
        h, c = session.state()
    np.testing.assert_allclose(results[-1]["HN"], h, atol=1e-5)
    np.testing.assert_allclose(results[-1]["CN"], c, atol=1e-5)
    assert live_sessions(server) == before  # END freed the sequence's session
    after_end, = triton.call("infer_each", server.address, MODEL, [{"inputs": {"INPUT": chunks[0]},
                                                                   "sequence_id": 42}])
    assert after_end.status == NOT_FOUND and "sequence_start=true" in after_end.message


def test_a_sequence_over_one_stream_keeps_going_past_a_bad_request(server, triton, model):
    chunks = [steps(2, 20), steps(4, 21), steps(1, 22)]
    requests = sequence_requests("stream-1", chunks)
    bad = {"inputs": {"INPUT": steps(2, 23)[:, :INPUT - 1]}, "sequence_id": "stream-1"}
    requests.insert(2, bad)  # wrong shape: answered in-band, and the sequence's state is untouched
    answers = triton.call("stream_all", server.address, MODEL, requests)
    assert [request_id for request_id, _ in answers] == ["0", "1", None, "3"]
    failure = answers[2][1]
    assert f"shape [2, {INPUT - 1}], expected [N, {INPUT}]" in failure.message
    expected = reference_chunks(model, chunks)
    for (_, result), answer in zip([answers[0], answers[1], answers[3]], expected, strict=True):
        assert_results(result, answer)


def test_interleaved_sequences_over_one_stream_keep_their_own_state(server, triton, model):
    a_chunks = [steps(2, 30), steps(3, 31), steps(1, 32)]
    b_chunks = [steps(3, 33), steps(3, 34), steps(2, 35)]
    a, b = sequence_requests(7, a_chunks), sequence_requests("user-b", b_chunks, state(36), state(37))
    for request in b:
        request["outputs"] = ["OUTPUT", "CN"]
    interleaved = [a[0], b[0], a[1], b[1], b[2], a[2]]
    answers = [result for _, result in triton.call("stream_all", server.address, MODEL, interleaved)]
    expected_a = reference_chunks(model, a_chunks)
    expected_b = [{"OUTPUT": e["OUTPUT"], "CN": e["CN"]} for e in reference_chunks(model, b_chunks, state(36),
                                                                                     state(37))]
    for result, answer in zip([answers[0], answers[2], answers[5]], expected_a, strict=True):
        assert_results(result, answer)
    for result, answer in zip([answers[1], answers[3], answers[4]], expected_b, strict=True):
        assert_results(result, answer)


def test_refused_requests_say_why_and_change_no_sequence(server, triton, model):
    chunks = [steps(2, 40), steps(3, 41)]
    first, missing_start, bad_restart, unknown_model = triton.call("infer_each", server.address, MODEL, [
        {"inputs": {"INPUT": chunks[0]}, "sequence_id": 55, "start": True},
        {"inputs": {"INPUT": chunks[0]}, "sequence_id": 56},
        {"inputs": {"INPUT": chunks[1][None]}, "sequence_id": 55, "start": True},
        {"inputs": {"INPUT": chunks[0]}, "sequence_id": 55, "model": "no-such-model"}])
    assert missing_start.status == NOT_FOUND
    assert "sequence 56 is not active" in missing_start.message
    assert "sequence_start=true" in missing_start.message
    assert bad_restart.status == INVALID_ARGUMENT
    assert f"shape [1, 3, {INPUT}], expected [N, {INPUT}]" in bad_restart.message
    assert unknown_model.status == NOT_FOUND and "'no-such-model'" in unknown_model.message
    wrong_type = {"model_name": MODEL, "parameters": {"sequence_id": {"int64_param": "55"},
                                                      "sequence_end": {"string_param": "true"}},
                  "inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [3, INPUT]}]}
    refused = triton.call("raw_infer", server.address, wrong_type, [chunks[1].tobytes()])
    assert refused == Failure("INVALID_ARGUMENT", "parameter sequence_end must be a bool; got string")
    last, = triton.call("infer_each", server.address, MODEL, [
        {"inputs": {"INPUT": chunks[1]}, "sequence_id": 55, "end": True}])
    assert_results(first, reference_chunks(model, chunks)[0])
    assert_results(last, reference_chunks(model, chunks)[1])  # as if nothing had come in between


def test_an_idle_sequence_expires_like_a_native_session(model, triton):
    with server_in_thread(model[0], idle_timeout=0.2) as server:
        x = steps(1, 50)
        started, = triton.call("infer_each", server.address, MODEL, [
            {"inputs": {"INPUT": x}, "sequence_id": 9, "start": True}])
        assert_results(started, reference_chunks(model, [x])[0])
        for _ in range(200):  # the engine looks for idle sessions every idle_timeout / 4
            if live_sessions(server) == 0:
                break
            time.sleep(0.05)
        assert live_sessions(server) == 0
        expired, = triton.call("infer_each", server.address, MODEL, [
            {"inputs": {"INPUT": x}, "sequence_id": 9}])
        assert expired.status == NOT_FOUND and "expired" in expired.message


@pytest.mark.parametrize(("document", "marker"), [("README.md", "oip-readme"), ("docs/oip.md", "oip")])
def test_documented_examples_print_what_the_documents_show(demo_server, triton, document, marker):
    text = (Path(__file__).parents[2] / document).read_text()
    code, output = (re.search(rf"<!-- {marker}:{part} -->\n```\w*\n(.*?)```", text, re.S).group(1)
                    for part in ("code", "output"))
    assert triton.call("run_example", code.replace("127.0.0.1:50051", demo_server.address)) == output


# -- refusals over raw gRPC: requests tritonclient would not build --------------------------------------

def infer_request(model_name: str = MODEL, name: str = "INPUT", shape=(1, INPUT), raw: bytes | None = None,
                  sequence_id: str | None = None, datatype: str = "FP32") -> oip_pb.ModelInferRequest:
    request = oip_pb.ModelInferRequest(model_name=model_name)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(steps(1, 60).tobytes() if raw is None else raw)
    if sequence_id is not None:
        request.parameters["sequence_id"].string_param = sequence_id
    return request


def refusals(server, request: oip_pb.ModelInferRequest) -> list[tuple[grpc.StatusCode, str]]:
    """(code, message) of the request sent alone on ModelInfer, and in-band on ModelStreamInfer (whose
    in-band errors carry no code: INVALID_ARGUMENT or NOT_FOUND stand for them there)."""
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(request)
        streamed, = stub.ModelStreamInfer(iter([request]))
    assert streamed.error_message and not streamed.infer_response.outputs
    return [(error.value.code(), error.value.details()), (None, streamed.error_message)]


@pytest.mark.parametrize("shape, raw, message", [
    ([1] * 65, b"\0" * 4, "input INPUT: shape has 65 dimensions; tensors here have at most 3"),
    ([0] + [1 << 40] * 3, b"", "input INPUT: shape has 4 dimensions"),
    ([1 << 62, 0, 1 << 62], b"", "input INPUT: shape [4611686018427387904, 0, 4611686018427387904] has no "
                                 "elements and its other dimensions multiply to over 2147483647"),
], ids=["65 dimensions", "a zero beside an overflowing product", "a zero beside a huge product"])
def test_shapes_numpy_cannot_lay_out_are_invalid_argument(server, caplog, shape, raw, message):
    live = live_sessions(server)
    for sequence_id in (None, "shapes"):
        request = infer_request(shape=shape, raw=raw, sequence_id=sequence_id)
        if sequence_id:
            request.parameters["sequence_start"].bool_param = True
        for code, details in refusals(server, request):
            assert code in (None, grpc.StatusCode.INVALID_ARGUMENT) and details.startswith(message)
    assert live_sessions(server) == live
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


MEGABYTE = "x" * (1 << 20)


@pytest.mark.parametrize("request_fields, code, start", [
    ({"model_name": MEGABYTE}, grpc.StatusCode.NOT_FOUND, "model 'xxxx"),
    ({"sequence_id": MEGABYTE}, grpc.StatusCode.NOT_FOUND, "sequence 'xxxx"),
    ({"name": MEGABYTE}, grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'xxxx"),
    ({"datatype": MEGABYTE}, grpc.StatusCode.INVALID_ARGUMENT, "input INPUT has datatype 'xxxx"),
], ids=["model_name", "sequence_id", "input name", "datatype"])
def test_megabyte_names_and_ids_get_their_code_and_a_short_message(server, request_fields, code, start):
    for got, details in refusals(server, infer_request(**request_fields)):
        assert got in (None, code), details[:200]
        assert details.startswith(start) and "xxx..." in details and len(details) < 500, details[:200]
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as error:
        oip_pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            oip_pb.ModelMetadataRequest(name=MEGABYTE, version=MEGABYTE))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and len(error.value.details()) < 500
