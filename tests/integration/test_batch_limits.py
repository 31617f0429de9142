"""StreamBatch limits: a message with too many entries, or whose answer would pass the message cap, is refused
whole before any of it is queued, and a long message is answered in slices, so other clients are served
meanwhile and the server's memory comes back down."""

import re
import threading
import time

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import LstmClient
from server.testing.processes import lstmserve_process
from tests.conftest import export_model
from tests.metric_samples import total
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
FLOOD_ENTRIES = 400_000  # 0.8 MB of empty entries: once 15 s of a stalled server and 1.4 GB that stayed
LONG_MESSAGE_ENTRIES = 20_000  # what the servers below allow (max_batch_entries)


def steps(t: int, input_size: int = 4) -> pb.Tensor:
    return tensors.to_proto(np.full((t, input_size), 0.5, np.float32))


def snapshot(session) -> tuple:
    info = session.info()
    h, c = session.state()
    return info.last_sequence_number, info.steps_applied, h.tobytes(), c.tobytes()


def counter(server, name: str, **labels) -> float:
    return server.app.metrics.registry.get_sample_value(name, labels) or 0.0


def live_sessions(server) -> float:
    return total(server.app.metrics.registry, "lstmserve_live_sessions")


def refusals(server, limit: str) -> float:
    return counter(server, "lstmserve_limit_refusals_total", limit=limit)


def test_a_message_over_max_batch_entries_is_refused_whole_after_the_earlier_answers(demo_server):
    with LstmClient(demo_server.address) as client, client.session() as session:
        session.step(np.ones((1, 4)))
        before, refused = snapshot(session), refusals(demo_server, "max_batch_entries")
        first = pb.StepBatch(steps=[pb.StepRequest(session_id=session.id, sequence_number=2, inputs=steps(1))])
        flood = pb.StepBatch(steps=[pb.StepRequest(session_id=session.id, sequence_number=3, inputs=steps(1))])
        flood.steps.extend([pb.StepRequest()] * (FLOOD_ENTRIES - 1))
        answers = []
        with pytest.raises(grpc.RpcError) as error:
            for answer in client.stub.StreamBatch(iter([first, flood])):
                answers.append(answer)
        assert error.value.code() == EXHAUSTED
        assert f"has {FLOOD_ENTRIES} entries" in error.value.details()
        assert "max_batch_entries of 4096" in error.value.details()
        assert [answer.steps[0].HasField("error") for answer in answers] == [False]
        assert snapshot(session)[:2] == (before[0] + 1, before[1] + 1)  # the first message only
        assert refusals(demo_server, "max_batch_entries") == refused + 1


@pytest.fixture(scope="module")
def long_batch_server(demo_model):
    with server_in_thread(demo_model, max_batch_entries=LONG_MESSAGE_ENTRIES, max_steps_per_request=1) as server:
        yield server


def test_other_clients_are_answered_while_a_long_message_is_served(long_batch_server):
    server = long_batch_server
    with LstmClient(server.address) as client, LstmClient(server.address) as other, client.session() as session:
        other.stub.GetModelInfo(pb.GetModelInfoRequest())  # connected before the long message starts
        # entries over max_steps_per_request are refused in-band and counted: the count shows the server at work
        message = pb.StepBatch(steps=[pb.StepRequest(session_id=session.id, inputs=steps(2))])
        message.steps.extend([message.steps[0]] * (LONG_MESSAGE_ENTRIES - 2))
        message.steps.add(session_id=session.id, sequence_number=1, inputs=steps(1))
        counted, finished = refusals(server, "max_steps_per_request"), []

        def send():
            finished.append(("StreamBatch", list(client.stub.StreamBatch(iter([message])))))

        sender = threading.Thread(target=send)
        sender.start()
        while refusals(server, "max_steps_per_request") == counted and sender.is_alive():
            time.sleep(0.001)
        while sender.is_alive():
            other.stub.GetModelInfo(pb.GetModelInfoRequest())
            finished.append(("GetModelInfo", refusals(server, "max_steps_per_request") - counted))
        sender.join()

        assert finished[0][0] == "GetModelInfo", "no other call was answered while the long message was served"
        # the count only grows: short of every entry once the first answer is back, that answer came in between
        assert finished[0][1] < LONG_MESSAGE_ENTRIES - 1, "other calls waited for all the entries to be queued"
        (answer,) = next(result for name, result in finished if name == "StreamBatch")
        assert len(answer.steps) == LONG_MESSAGE_ENTRIES
        assert all("max_steps_per_request" in entry.error.message for entry in answer.steps[:-1])
        assert not answer.steps[-1].HasField("error") and answer.steps[-1].sequence_number == 1
        assert snapshot(session)[:2] == (1, 1)


def resident_megabytes(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) / 1024


def test_long_and_refused_messages_leave_memory_near_where_it_started(demo_model, tmp_path):
    flood = pb.StepBatch(steps=[pb.StepRequest()] * FLOOD_ENTRIES)
    long_message = pb.StepBatch(steps=[pb.StepRequest()] * LONG_MESSAGE_ENTRIES)
    with lstmserve_process(demo_model, tmp_path / "server.log", "--max-batch-entries", str(LONG_MESSAGE_ENTRIES)
                        ) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        list(stub.StreamBatch(iter([pb.StepBatch(steps=[pb.StepRequest()] * 10)])))  # the code path is warm
        started = resident_megabytes(server.process.pid)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as error:
                list(stub.StreamBatch(iter([flood])))
            assert error.value.code() == EXHAUSTED and "max_batch_entries" in error.value.details()
            (answer,) = stub.StreamBatch(iter([long_message]))
            assert len(answer.steps) == LONG_MESSAGE_ENTRIES and answer.steps[-1].error.message
        assert resident_megabytes(server.process.pid) < started + 150


@pytest.fixture(scope="module")
def wide_server(models_dir):
    """16 inputs and 32 outputs a step, so answers outgrow their requests; a 16 KiB message cap."""
    path, _ = export_model(models_dir, "wide_outputs", 16, 32)
    with server_in_thread(path, max_message_bytes=16 * 1024) as server:
        yield server


def test_a_message_whose_answer_would_pass_the_message_cap_is_refused_before_anything_is_queued(wide_server):
    with LstmClient(wide_server.address) as client, client.session() as session:
        live, refused = live_sessions(wide_server), refusals(wide_server, "max_message_bytes")
        message = pb.StepBatch(steps=[pb.StepRequest(session_id=session.id, sequence_number=1, inputs=steps(100, 16)),
                                      pb.StepRequest(new_session=pb.CreateSessionRequest(), inputs=steps(100, 16))])
        assert message.ByteSize() < 16 * 1024
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.StreamBatch(iter([message])))
        assert error.value.code() == EXHAUSTED
        assert "max_message_bytes of 16384; split it" in error.value.details()
        assert snapshot(session)[:2] == (0, 0) and live_sessions(wide_server) == live
        assert refusals(wide_server, "max_message_bytes") == refused + 1

        del message.steps[1]  # alone, the first entry's answer fits
        (answer,) = client.stub.StreamBatch(iter([message]))
        assert not answer.steps[0].HasField("error") and list(answer.steps[0].outputs.shape) == [100, 32]


def test_retries_whose_kept_answers_pass_the_cap_are_refused_before_anything_is_built(wide_server):
    """A retry resends its inputs (a reused number with other inputs is refused), so the estimate sees the
    steps its kept answer holds."""
    with LstmClient(wide_server.address) as client, client.session() as session:
        for seq in (1, 2):
            client.stub.Step(pb.StepRequest(session_id=session.id, sequence_number=seq, inputs=steps(100, 16)))
        before = snapshot(session)
        retries = pb.StepBatch(steps=[pb.StepRequest(session_id=session.id, sequence_number=seq,
                                                     inputs=steps(100, 16)) for seq in (1, 2)])
        with pytest.raises(grpc.RpcError) as error:
            list(client.stub.StreamBatch(iter([retries])))
        assert error.value.code() == EXHAUSTED
        assert "more than the server's max_message_bytes of 16384" in error.value.details()
        assert snapshot(session) == before


def test_a_step_whose_answer_would_pass_the_message_cap_is_refused_before_it_is_applied(wide_server):
    """200 steps of 16 inputs fit in 16 KiB; their 32 outputs do not. gRPC would refuse to send the answer only
    after the step was applied (and would refuse its retry's kept answer the same way)."""
    too_long = steps(200, 16)
    assert pb.StepRequest(inputs=too_long).ByteSize() < 16 * 1024
    with LstmClient(wide_server.address) as client, client.session() as session:
        live, refused = live_sessions(wide_server), refusals(wide_server, "max_message_bytes")
        for request in (pb.StepRequest(session_id=session.id, sequence_number=1, inputs=too_long),
                        pb.StepRequest(new_session=pb.CreateSessionRequest(), inputs=too_long)):
            with pytest.raises(grpc.RpcError) as error:
                client.stub.Step(request)
            assert error.value.code() == EXHAUSTED
            assert "more than the server's max_message_bytes of 16384" in error.value.details()
        (answer,) = client.stub.Stream(iter([pb.StepRequest(session_id=session.id, sequence_number=1,
                                                            inputs=too_long)]))
        assert answer.error.code == EXHAUSTED.value[0] and "max_message_bytes" in answer.error.message
        misshapen = pb.StepRequest(session_id=session.id, sequence_number=1, inputs=steps(200, 15))
        assert refusal_code(lambda: client.stub.Step(misshapen)) == grpc.StatusCode.INVALID_ARGUMENT  # not its size
        assert snapshot(session)[:2] == (0, 0) and live_sessions(wide_server) == live
        assert refusals(wide_server, "max_message_bytes") == refused + 3


def refusal_code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()
