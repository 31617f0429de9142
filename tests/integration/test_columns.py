"""StreamColumns against the real server: the in-process reference's numbers, per-entry errors that leave every
other entry and all state alone, whole-message refusals, exactly-once replay of a resent message."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from client import Credentials, LstmClient
from tests.certs import make_pki
from tests.conftest import export_model
from tests.integration.reference import TOLERANCE, Reference
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

INPUT, HIDDEN, LAYERS, OUTPUT = 5, 8, 2, 6
CODES = {code.value[0]: code for code in grpc.StatusCode}


@pytest.fixture(scope="module")
def served(models_dir):
    """A two-layer model with a head, served with max_batch_size 4 so that messages run in several chunks."""
    path, module = export_model(models_dir, "columns", INPUT, HIDDEN, LAYERS, OUTPUT, seed=3)
    with server_in_thread(path, max_batch_size=4) as server:
        yield server, module


def message(ids, inputs, seqs=()) -> pb.StepColumns:
    return pb.StepColumns(session_ids=ids, sequence_numbers=list(seqs), inputs=tensors.to_proto(inputs))


def exchange(client, *messages) -> list[pb.StepColumnsResponse]:
    return list(client.stub.StreamColumns(iter(messages)))


def snapshot(client, session_id) -> tuple:
    state = client.stub.GetState(pb.SessionRef(session_id=session_id))
    return state.last_sequence_number, state.h.data, state.c.data


def test_sessions_over_several_messages_equal_the_in_process_reference(served):
    server, module = served
    rng = np.random.default_rng(0)
    with LstmClient(server.address) as client:
        ids = [client.session().id for _ in range(10)]
        references = [Reference(module, LAYERS, HIDDEN) for _ in ids]
        for seq, steps in enumerate((1, 3, 1, 2), start=1):
            inputs = rng.standard_normal((len(ids), steps, INPUT)).astype(np.float32)
            (answer,) = exchange(client, message(ids, inputs, [seq] * len(ids)))
            assert not answer.errors and list(answer.sequence_numbers) == [seq] * len(ids)
            outputs = tensors.from_proto(answer.outputs)
            assert outputs.shape == (len(ids), steps, OUTPUT)
            for reference, x, y in zip(references, inputs, outputs, strict=True):
                np.testing.assert_allclose(y, reference.step(x), atol=TOLERANCE, rtol=0)
        for session_id, reference in zip(ids, references, strict=True):
            state = client.stub.GetState(pb.SessionRef(session_id=session_id))
            np.testing.assert_allclose(tensors.from_proto(state.h), reference.state[0], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(tensors.from_proto(state.c), reference.state[1], atol=TOLERANCE, rtol=0)


def test_failed_entries_are_answered_in_band_and_change_nothing(served):
    server, module = served
    rng = np.random.default_rng(1)
    with LstmClient(server.address) as client:
        ids = [client.session().id for _ in range(4)]
        exchange(client, message(ids[3:], np.zeros((1, 1, INPUT), np.float32), [1]))
        before = [snapshot(client, i) for i in ids]
        inputs = rng.standard_normal((5, 1, INPUT)).astype(np.float32)
        inputs[2, 0, 1] = np.inf
        reference = Reference(module, LAYERS, HIDDEN)
        (answer,) = exchange(client, message([ids[0], "A" * 22, ids[2], ids[3], ids[1]], inputs, [1, 1, 1, 5, 1]))
        codes = {e.index: CODES[e.error.code] for e in answer.errors}
        assert codes == {1: grpc.StatusCode.NOT_FOUND, 2: grpc.StatusCode.INVALID_ARGUMENT,
                         3: grpc.StatusCode.FAILED_PRECONDITION}
        bad_request = error_details_pb2.BadRequest()
        answer.errors[1].error.details[0].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "inputs[2]"
        precondition = error_details_pb2.PreconditionFailure()
        answer.errors[2].error.details[0].Unpack(precondition)
        assert precondition.violations[0].subject == "2"
        outputs = tensors.from_proto(answer.outputs)
        assert not outputs[1:4].any()
        np.testing.assert_allclose(outputs[0], reference.step(inputs[0]), atol=TOLERANCE, rtol=0)
        assert [snapshot(client, i) for i in ids[2:]] == before[2:]
        assert snapshot(client, ids[1])[0] == 1 and snapshot(client, ids[0])[0] == 1


def test_a_resent_message_is_answered_again_and_applied_once(served):
    server, _ = served
    inputs = np.random.default_rng(2).standard_normal((3, 2, INPUT)).astype(np.float32)
    with LstmClient(server.address) as client:
        ids = [client.session().id for _ in range(3)]
        first, again = exchange(client, message(ids, inputs, [1, 1, 1]), message(ids, inputs, [1, 1, 1]))
        (resent,) = exchange(client, message(ids, inputs, [1, 1, 1]))
        assert first.outputs == again.outputs == resent.outputs and not resent.errors
        assert [client.session(session_id=i).info().steps_applied for i in ids] == [2, 2, 2]


def test_a_misshapen_message_ends_the_stream_after_the_earlier_answers(served):
    server, _ = served
    with LstmClient(server.address) as client:
        ids = [client.session().id for _ in range(2)]
        good = message(ids, np.zeros((2, 1, INPUT), np.float32), [1, 1])
        answers = []
        with pytest.raises(grpc.RpcError) as error:
            for answer in client.stub.StreamColumns(iter([good, message(ids, np.zeros((2, 1, INPUT + 1)))])):
                answers.append(answer)
        assert len(answers) == 1 and error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs has shape [2, 1, 6]" in error.value.details()
        assert [snapshot(client, i)[0] for i in ids] == [1, 1]


def test_too_many_entries_end_the_stream_before_anything_is_queued(served):
    server, _ = served
    with LstmClient(server.address) as client:
        assert client.info().batching.max_batch_entries == 4096
        session_id = client.session().id
        with pytest.raises(grpc.RpcError) as error:
            exchange(client, message([session_id] * 4097, np.zeros((4097, 1, INPUT), np.float32)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_batch_entries of 4096" in error.value.details()
        assert snapshot(client, session_id)[0] == 0


def test_another_principals_session_is_not_found_and_untouched(demo_model, tmp_path):
    pki = make_pki(tmp_path)
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tokens_file=str(pki.tokens_file)) as server:
        alice, bob = (LstmClient(server.address, credentials=Credentials(root_certificates=str(pki.ca.cert),
                                                                         token=pki.tokens[name]))
                      for name in ("alice", "bob"))
        with alice, bob:
            theirs, mine = alice.session().id, bob.session().id
            (answer,) = exchange(bob, message([theirs, mine], np.ones((2, 1, 4), np.float32), [1, 1]))
            assert [(e.index, e.error.code) for e in answer.errors] == [(0, grpc.StatusCode.NOT_FOUND.value[0])]
            assert alice.session(session_id=theirs).info().last_sequence_number == 0
            assert bob.session(session_id=mine).info().last_sequence_number == 1
