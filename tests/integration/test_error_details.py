"""The google.rpc error details of the native API over a real server: on failed calls (`grpc-status-details-bin`,
read with grpc_status), in-band on Stream and StreamBatch, as the client library's typed fields, and its retries
that wait at least what RetryInfo asks."""

import contextlib
import io
import queue
import time

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2 as details_pb2
from grpc_status import rpc_status
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import AsyncLstmClient, LstmClient, LstmError, StepError
from client.sync import Session
from server.engine.errors import DRAINING_RETRY_SECONDS
from tests.integration.reference import TOLERANCE, Reference
from tests.servers import server_in_thread
from tests.walkthrough import README_ADDRESS, fenced_block_after

pytestmark = pytest.mark.integration

UNKNOWN_ID = "A" * 22  # well formed, never issued
DETAIL_TYPES = (details_pb2.QuotaFailure, details_pb2.RetryInfo, details_pb2.BadRequest,
                details_pb2.PreconditionFailure, details_pb2.ResourceInfo)


def details_of(packed_details) -> dict:
    """{detail type: message} of a status's or an in-band error's details; each type at most once."""
    found = {}
    for packed in packed_details:
        (kind,) = [kind for kind in DETAIL_TYPES if packed.Is(kind.DESCRIPTOR)]
        assert kind not in found
        found[kind] = kind()
        packed.Unpack(found[kind])
    return found


def refused(call, *args) -> tuple[grpc.StatusCode, dict]:
    """The code and details of a call that must fail, read the way any gRPC client reads them."""
    with pytest.raises(grpc.RpcError) as error:
        call(*args)
    status = rpc_status.from_call(error.value)
    return error.value.code(), details_of(status.details if status else ())


def steps(*shape, fill=0.5):
    return tensors.to_proto(np.full(shape, fill, np.float32))


@pytest.fixture(scope="module")
def small_server(demo_model):
    with server_in_thread(demo_model, max_sessions=3, max_queued_requests=4, max_steps_per_request=8) as server:
        yield server


@pytest.fixture
def stub(small_server):
    with grpc.insecure_channel(small_server.address) as channel:
        yield pb_grpc.LstmServiceStub(channel)


@pytest.fixture
def client(small_server):
    with LstmClient(small_server.address) as client:
        yield client


def refusals(server, limit: str) -> float:
    return server.app.metrics.registry.get_sample_value("lstmserve_limit_refusals_total", {"limit": limit}) or 0.0


# -- failed calls: the status's details ---------------------------------------------------------------

def test_a_bad_shape_names_the_field(stub, client):
    with client.session() as session:
        code, details = refused(stub.Step, pb.StepRequest(session_id=session.id, sequence_number=1, inputs=steps(1, 5)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        (violation,) = details[details_pb2.BadRequest].field_violations
        assert violation.field == "inputs.shape" and "expected [N, 4]" in violation.description
        code, details = refused(stub.CreateSession, pb.CreateSessionRequest(h0=pb.Tensor(shape=[1, 3], data=b"\0")))
        assert details[details_pb2.BadRequest].field_violations[0].field == "h0.data"
        code, details = refused(stub.Step, pb.StepRequest(new_session=pb.CreateSessionRequest(h0=steps(2, 3)),
                                                          inputs=steps(1, 4)))
        assert details[details_pb2.BadRequest].field_violations[0].field == "new_session.h0.shape"
        code, details = refused(stub.GetSession, pb.SessionRef(session_id="not an id"))
        assert details[details_pb2.BadRequest].field_violations[0].field == "session_id"
        assert session.info().last_sequence_number == 0  # nothing of it was applied


def test_a_sequence_gap_carries_the_number_expected(stub, client):
    with client.session() as session:
        session.step(np.ones(4))
        code, details = refused(stub.Step, pb.StepRequest(session_id=session.id, sequence_number=5,
                                                          inputs=steps(1, 4)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        (violation,) = details[details_pb2.PreconditionFailure].violations
        assert (violation.type, violation.subject) == ("SEQUENCE_NUMBER", "2")


def test_an_unknown_session_is_a_resource_info_with_the_id_as_sent(stub):
    code, details = refused(stub.GetState, pb.SessionRef(session_id=UNKNOWN_ID))
    assert code == grpc.StatusCode.NOT_FOUND
    resource = details[details_pb2.ResourceInfo]
    assert (resource.resource_type, resource.resource_name, resource.owner) == ("lstmserve.v1.Session", UNKNOWN_ID,
                                                                                "")


def test_a_full_server_names_max_sessions_and_gives_no_retry_info(small_server, stub, client):
    opened = [client.session() for _ in range(3)]
    try:
        code, details = refused(stub.CreateSession, pb.CreateSessionRequest())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details[details_pb2.QuotaFailure].violations[0].subject == "max_sessions"
        assert details_pb2.RetryInfo not in details  # waiting alone frees no session
    finally:
        for session in opened:
            session.close()


# -- in-band errors ----------------------------------------------------------------------------------

def test_stream_answers_carry_the_details_in_band(stub, client):
    with client.session() as session:
        answers = list(stub.Stream(iter([
            pb.StepRequest(session_id=session.id, sequence_number=1, inputs=steps(1, 4)),
            pb.StepRequest(session_id=session.id, sequence_number=2, inputs=steps(1, 5)),
            pb.StepRequest(session_id=session.id, sequence_number=7, inputs=steps(1, 4)),
            pb.StepRequest(session_id=UNKNOWN_ID, sequence_number=1, inputs=steps(1, 4)),
        ])))
        assert not answers[0].HasField("error")
        bad_shape, gap, unknown = (details_of(answer.error.details) for answer in answers[1:])
        assert bad_shape[details_pb2.BadRequest].field_violations[0].field == "inputs.shape"
        assert gap[details_pb2.PreconditionFailure].violations[0].subject == "2"
        assert unknown[details_pb2.ResourceInfo].resource_name == UNKNOWN_ID


def test_a_stream_batch_entry_is_named_by_its_index(stub, client):
    with client.session() as session:
        entries = [pb.StepRequest(session_id=session.id, sequence_number=seq, inputs=steps(1, 4)) for seq in (1, 2, 3)]
        entries.append(pb.StepRequest(session_id=session.id, sequence_number=4,
                                      inputs=pb.Tensor(shape=[1, 4], data=b"\0" * 15)))
        (answer,) = stub.StreamBatch(iter([pb.StepBatch(steps=entries)]))
        assert [entry.HasField("error") for entry in answer.steps] == [False, False, False, True]
        bad = answer.steps[3].error
        assert bad.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        (violation,) = details_of(bad.details)[details_pb2.BadRequest].field_violations
        assert (violation.field, violation.description) == ("steps[3].inputs.data", bad.message)


def test_a_full_queue_says_when_it_will_have_room(small_server, stub, client):
    with client.session() as session:
        session.step(np.ones(4))  # a batch has run: the server knows how long one takes
        entries = [pb.StepRequest(session_id=session.id, sequence_number=seq, inputs=steps(1, 4))
                   for seq in range(2, 10)]  # more than max_queued_requests=4 at once
        (answer,) = stub.StreamBatch(iter([pb.StepBatch(steps=entries)]))
        exhausted = [details_of(entry.error.details) for entry in answer.steps
                     if entry.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
        assert exhausted
        for details in exhausted:
            assert details[details_pb2.QuotaFailure].violations[0].subject == "max_queued_requests"
            assert details[details_pb2.RetryInfo].retry_delay.ToNanoseconds() > 0
        first_refused = next(entry for entry in answer.steps if entry.HasField("error"))
        gaps = [details_of(entry.error.details) for entry in answer.steps
                if entry.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]]
        # what follows a refused number is a gap, and says where to go on from: the refused number
        assert all(gap[details_pb2.PreconditionFailure].violations[0].subject == str(first_refused.sequence_number)
                   for gap in gaps)


# -- the client library ------------------------------------------------------------------------------

def test_the_client_library_raises_lstm_errors_with_typed_fields(client):
    with client.session() as session:
        with pytest.raises(LstmError) as bad:
            session.step(np.ones(5))
        assert [v.field for v in bad.value.field_violations] == ["inputs.shape"]
        ahead = Session(client, session.id, last_sequence_number=6)  # a client that lost count
        with pytest.raises(LstmError) as gap:
            ahead.step(np.ones(4))
        assert gap.value.code() == grpc.StatusCode.FAILED_PRECONDITION and gap.value.expected_sequence_number == 1
        with pytest.raises(StepError) as in_band:
            list(session.stream([np.ones(4), np.ones(5)]))
        assert in_band.value.sequence_number == 2
        assert [v.field for v in in_band.value.field_violations] == ["inputs.shape"]
    with pytest.raises(LstmError) as missing:
        client.session(session_id=UNKNOWN_ID)
    assert missing.value.resource.resource_name == UNKNOWN_ID


def test_the_client_library_does_not_retry_a_limit_waiting_cannot_lift(small_server, client):
    opened = [client.session() for _ in range(3)]
    before = refusals(small_server, "max_sessions")
    try:
        with pytest.raises(LstmError) as full:
            client.session()
        assert [v.subject for v in full.value.quota_violations] == ["max_sessions"]
        assert full.value.retry_after is None
        assert refusals(small_server, "max_sessions") == before + 1  # one attempt
    finally:
        for session in opened:
            session.close()


# -- rate limits: RetryInfo, and clients that honour it -----------------------------------------------

# Requests per second, one at a time: the next token is due 2 s after the last one was taken, so two calls in a row
# of one test are refused unless the machine stalls that long between them.
RATE = 0.5


@pytest.fixture(scope="module")
def rate_limited_server(demo_model):
    with server_in_thread(demo_model, rate_limit=RATE, rate_limit_burst=1) as server:
        yield server


def test_a_rate_limit_names_its_setting_and_when_the_next_request_is_admitted(rate_limited_server):
    with grpc.insecure_channel(rate_limited_server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        while True:  # the first call takes the token (NOT_FOUND: admitted, then looked for), the next is refused
            code, details = refused(stub.GetSession, pb.SessionRef(session_id=UNKNOWN_ID))
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        assert details[details_pb2.QuotaFailure].violations[0].subject == "rate_limit"
        assert 0 < details[details_pb2.RetryInfo].retry_delay.ToNanoseconds() <= 1e9 / RATE


def test_a_rate_limited_call_is_retried_once_after_the_servers_delay(rate_limited_server):
    """The library waits what RetryInfo says, so its one retry finds the next token there; a retry on the
    backoff alone (50 ms at first) would have been refused several times over."""
    with LstmClient(rate_limited_server.address, timeout=30) as client:
        started = time.monotonic()
        session = client.session()  # takes a token (after waiting for it, if an earlier test took the last one)
        before = refusals(rate_limited_server, "rate_limit")
        info = session.info()  # refused, and retried once the next token is due
        assert info.session_id == session.id
        assert refusals(rate_limited_server, "rate_limit") == before + 1
        assert time.monotonic() - started >= 1 / RATE  # the second token is due that long after the first


async def test_the_asyncio_client_honours_retry_info_too(rate_limited_server):
    async with AsyncLstmClient(rate_limited_server.address, timeout=30) as client:
        session = await client.session().open()
        before = refusals(rate_limited_server, "rate_limit")
        assert (await session.info()).session_id == session.id
        assert refusals(rate_limited_server, "rate_limit") == before + 1


def test_a_rate_limited_stream_goes_on_at_the_rate_with_every_step_applied_once(rate_limited_server, demo_model):
    """Each streamed request is refused in-band until its token is due; the stream waits what RetryInfo says
    and re-sends from the refused request without a GetSession, which would take that token."""
    xs = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    reference = Reference(torch.jit.load(str(demo_model)), 1, 3)
    with LstmClient(rate_limited_server.address, timeout=60) as client:
        session = client.session()
        before = refusals(rate_limited_server, "rate_limit")
        outputs = list(session.stream(xs))
        assert refusals(rate_limited_server, "rate_limit") > before  # in-band refusals were retried
        for x, y in zip(xs, outputs, strict=True):
            np.testing.assert_allclose(y, reference.step(x[None])[0], atol=TOLERANCE)
        info = session.info()
    assert (info.last_sequence_number, info.steps_applied) == (3, 3)


@pytest.mark.parametrize("example, printed", [
    ("errors:client", "RESOURCE_EXHAUSTED ['rate_limit'] retry after "),
    ("errors:grpc", "RESOURCE_EXHAUSTED retry in 0:00:0"),
])
def test_the_readme_examples_read_retry_info(rate_limited_server, example, printed):
    code = fenced_block_after(example).replace(README_ADDRESS, rate_limited_server.address)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, f"README {example}", "exec"), {})
    assert output.getvalue().startswith(printed)


# -- draining -------------------------------------------------------------------------------------------

def test_a_draining_server_says_when_to_retry_on_calls_and_on_open_streams(demo_model):
    with server_in_thread(demo_model) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        requests = Requests()
        stream = stub.Stream(iter(requests))
        requests.send(pb.StepRequest(session_id=session_id, sequence_number=1, inputs=steps(1, 4)))
        assert not next(stream).HasField("error")
        server.call(server.app.registry.drain(30))  # nothing queued: it returns at once, and the server drains on
        code, details = refused(stub.CreateSession, pb.CreateSessionRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
        assert 0 < details[details_pb2.RetryInfo].retry_delay.ToNanoseconds() <= DRAINING_RETRY_SECONDS * 1e9
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        requests.close()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        status = rpc_status.from_call(ended.value)
        assert details_of(status.details)[details_pb2.RetryInfo].retry_delay.ToNanoseconds() > 0


class Requests:
    """A request stream fed by the test, open until closed."""

    def __init__(self):
        self._queue = queue.Queue()

    def send(self, request):
        self._queue.put(request)

    def close(self):
        self._queue.put(None)

    def __iter__(self):
        while (request := self._queue.get()) is not None:
            yield request
