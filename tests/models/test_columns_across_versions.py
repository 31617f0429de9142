"""A StreamColumns message whose sessions began on different versions: each entry runs on its session's version."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version, write_config
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

OTHER_SIZES = (4, 8, 1, 3)  # the same inputs, a head of 3 outputs


def exchange(stub, ids: list[str], inputs: np.ndarray) -> pb.StepColumnsResponse:
    request = pb.StepColumns(session_ids=ids, inputs=tensors.to_proto(inputs))
    (answer,) = list(stub.StreamColumns(iter([request]), timeout=30))
    return answer


def test_entries_of_two_versions_in_one_message_run_on_their_own_versions(tmp_path):
    old = add_version(tmp_path, "m", 1, seed=1)
    write_config(tmp_path, "m", version_policy={"all": {}}, default_version=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        on_old = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(2)]
        new = add_version(tmp_path, "m", 2, seed=2)
        write_config(tmp_path, "m", version_policy={"all": {}}, default_version=2)
        server.call(server.app.registry.reload())
        on_new = stub.CreateSession(pb.CreateSessionRequest()).session_id
        assert stub.GetSession(pb.SessionRef(session_id=on_new)).model_version == 2
        ids = [on_old[0], on_new, on_old[1]]
        x = np.random.default_rng(0).standard_normal((3, 2, SIZES[0])).astype(np.float32)
        answer = exchange(stub, ids + ["S" * 22], np.concatenate([x, x[:1]]))
        outputs = tensors.from_proto(answer.outputs)
        for row, module in ((0, old), (1, new), (2, old)):
            np.testing.assert_allclose(outputs[row], Reference(module, SIZES[2], SIZES[1]).step(x[row]),
                                       atol=TOLERANCE)
        assert [(e.index, e.error.code) for e in answer.errors] == [(3, grpc.StatusCode.NOT_FOUND.value[0])]


def test_an_entry_whose_model_answers_in_another_size_is_refused_alone(tmp_path):
    small = add_version(tmp_path, "small", 1, seed=1)
    add_version(tmp_path, "headed", 1, seed=2, sizes=OTHER_SIZES)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), default_model="small") as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        first = stub.CreateSession(pb.CreateSessionRequest(model_name="small")).session_id
        headed = stub.CreateSession(pb.CreateSessionRequest(model_name="headed")).session_id
        x = np.ones((2, 1, SIZES[0]), np.float32)
        answer = exchange(stub, [first, headed], x)
        np.testing.assert_allclose(tensors.from_proto(answer.outputs)[0],
                                   Reference(small, SIZES[2], SIZES[1]).step(x[0]), atol=TOLERANCE)
        (error,) = answer.errors
        assert error.index == 1 and error.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "messages of their own" in error.error.message
        assert stub.GetSession(pb.SessionRef(session_id=headed)).steps_applied == 0


@pytest.mark.parametrize("inputs_shape, sequence_numbers, field", [
    ((1, 1, SIZES[0]), [], "inputs.shape"),  # fewer rows than session ids
    ((SIZES[0],), [], "inputs.shape"),  # not [N, T, input] at all
    ((2, 1, SIZES[0]), [1], "sequence_numbers"),  # fewer numbers than session ids
])
def test_a_misshapen_message_across_models_is_invalid_argument_and_changes_nothing(tmp_path, inputs_shape,
                                                                                   sequence_numbers, field):
    """With several models loaded a message is routed entry by entry: one whose parts do not line up is refused
    whole, as with one model, not answered INTERNAL."""
    add_version(tmp_path, "small", 1, seed=1)
    add_version(tmp_path, "other", 1, seed=2)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), default_model="small") as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        ids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(2)]
        request = pb.StepColumns(session_ids=ids, sequence_numbers=sequence_numbers,
                                 inputs=tensors.to_proto(np.zeros(inputs_shape, np.float32)))
        with pytest.raises(grpc.RpcError) as error:
            list(stub.StreamColumns(iter([request]), timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (detail,) = rpc_status.from_call(error.value).details
        violations = error_details_pb2.BadRequest()
        assert detail.Unpack(violations) and violations.field_violations[0].field == field
        assert [stub.GetSession(pb.SessionRef(session_id=i)).steps_applied for i in ids] == [0, 0]
