"""Fuzz: malformed and adversarial requests over the real server. Zero crashes, only documented status codes,
and no rejected request changes any session (three live "victim" sessions are checked after every example)."""

import dataclasses

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from tests.metric_samples import total
from tests.reliability.figures import FIGURES, scale
from tests.servers import server_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Code = grpc.StatusCode
DOCUMENTED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.RESOURCE_EXHAUSTED,
}
APPLIED = 6  # requests applied to each victim before fuzzing; the server keeps the answers of the last 4
KEPT = 4
SERVICE = "/lstmserve.v1.LstmService/"


@dataclasses.dataclass
class Victims:
    ids: list[str]
    answers: list[dict[int, bytes]]  # per victim: sequence number -> outputs bytes, for the kept ones
    before: list[tuple]


@pytest.fixture(scope="module")
def fuzz_server(demo_model):
    with server_in_thread(
        demo_model,
        max_steps_per_request=16,
        max_sequence_length=64,
        max_message_bytes=64 * 1024,
        answers_kept=KEPT,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def stub(fuzz_server):
    with grpc.insecure_channel(fuzz_server.address) as channel:
        yield pb_grpc.LstmServiceStub(channel), channel


@pytest.fixture(scope="module")
def victims(stub):
    stub, _ = stub
    ids, answers = [], []
    rng = np.random.default_rng(7)
    for _ in range(3):
        sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
        kept = {}
        for seq in range(1, APPLIED + 1):
            inputs = tensors.to_proto(rng.standard_normal((2, 4)).astype(np.float32))
            kept[seq] = stub.Step(
                pb.StepRequest(session_id=sid, sequence_number=seq, inputs=inputs)
            ).outputs.data
        ids.append(sid)
        answers.append({seq: data for seq, data in kept.items() if seq > APPLIED - KEPT})
    return Victims(ids, answers, [observe(stub, sid) for sid in ids])


def observe(stub, session_id: str) -> tuple:
    info = stub.GetSession(pb.SessionRef(session_id=session_id))
    state = stub.GetState(pb.SessionRef(session_id=session_id))
    return info.last_sequence_number, info.steps_applied, state.h.data, state.c.data


# -- what the requests are made of ------------------------------------------------------------------

DIMS = st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 16, 17, 65, 2**31, 2**40, 2**62])
HUGE_DIMS = st.sampled_from([2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1])
SHAPES = st.one_of(
    st.lists(DIMS, max_size=4),
    st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=60, max_size=70),  # numpy holds at most 64 dimensions
    # no elements beside dimensions whose product overflows: a size that fits, a layout that does not
    st.lists(HUGE_DIMS, min_size=1, max_size=4).flatmap(lambda dims: st.permutations([0, *dims])),
)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
TENSORS = st.one_of(
    st.none(),
    st.builds(lambda shape, data: pb.Tensor(shape=shape, data=data), SHAPES, st.binary(max_size=96)),
    st.builds(
        lambda shape, values: pb.Tensor(shape=shape, values=values), SHAPES, st.lists(FLOATS, max_size=24)
    ),
    st.builds(
        lambda t, bad: tensors.to_proto(np.full((t, 4), bad, np.float32)),
        st.integers(1, 3),
        st.sampled_from([np.nan, np.inf, -np.inf]),
    ),
    st.builds(
        lambda t, v: tensors.to_proto(np.full((t, 4), v, np.float32)),
        st.integers(1, 20),
        st.floats(-10, 10, width=32),
    ),  # well formed: only its number can save a victim
)
# a victim's next number is APPLIED + 1, never drawn: only replays, old numbers, gaps and huge ones
VICTIM_SEQS = st.one_of(
    st.integers(1, APPLIED), st.integers(APPLIED + 2, 10**6), st.sampled_from([2**63, 2**64 - 1])
)
STRANGE_IDS = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.from_regex(r"[A-Za-z0-9_-]{22}", fullmatch=True),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
TARGETS = st.one_of(
    st.tuples(st.just("victim"), st.integers(0, 2), VICTIM_SEQS),
    st.tuples(st.just("other"), STRANGE_IDS, st.integers(0, 2**64 - 1)),
)

STEP = st.tuples(st.just("step"), TARGETS, TENSORS)
REPLAY = st.tuples(
    st.just("step"),
    st.tuples(st.just("victim"), st.integers(0, 2), st.integers(APPLIED - KEPT + 1, APPLIED)),
    TENSORS,
)
NEW_SESSION_STEP = st.tuples(st.just("new_session_step"), TENSORS, TENSORS, st.integers(0, 3))
RESET = st.tuples(st.just("reset"), TARGETS, TENSORS, TENSORS)
CREATE = st.tuples(st.just("create"), TENSORS, TENSORS)
PREDICT = st.tuples(st.just("predict"), TENSORS, TENSORS, TENSORS)
READ = st.tuples(st.just("read"), st.sampled_from(["GetSession", "GetState", "CloseSession"]), STRANGE_IDS)
RAW = st.tuples(
    st.just("raw"),
    st.sampled_from(["Step", "GetSession", "GetState", "CloseSession", "ResetSession", "Predict", "Stream"]),
    st.binary(max_size=64),
)
REQUEST = st.one_of(STEP, REPLAY, NEW_SESSION_STEP, RESET, CREATE, PREDICT, READ, RAW)
# a few requests on one Stream, and a StepBatch, so in-band errors are fuzzed too
STREAMED = st.tuples(
    st.sampled_from(["stream", "stream_batch"]),
    st.lists(st.one_of(STEP, NEW_SESSION_STEP), min_size=1, max_size=8),
)
EXAMPLE = st.lists(st.one_of(REQUEST, STREAMED), min_size=8, max_size=30)


# -- sending them and judging the answers ---------------------------------------------------------


class Judge:
    """Sends one example's requests and checks each answer against what the documentation allows."""

    def __init__(self, stub, channel, victims: Victims):
        self.stub, self.channel, self.victims = stub, channel, victims

    def step_request(self, spec) -> tuple[pb.StepRequest, tuple | None]:
        if spec[0] == "new_session_step":
            _, h0, inputs, seq = spec
            return pb.StepRequest(
                new_session=pb.CreateSessionRequest(h0=h0), sequence_number=seq, inputs=inputs
            ), None
        _, target, inputs = spec
        session_id, seq, victim = self.target(target)
        return pb.StepRequest(session_id=session_id, sequence_number=seq, inputs=inputs), victim

    def target(self, target) -> tuple[str, int, tuple | None]:
        if target[0] == "victim":
            return self.victims.ids[target[1]], target[2], (target[1], target[2])
        return target[1], target[2], None

    def send(self, spec) -> None:
        kind = spec[0]
        FIGURES.bad_inputs[f"{kind} requests"] += len(spec[1]) if kind.startswith("stream") else 1
        FIGURES.bad_inputs["total requests"] += len(spec[1]) if kind.startswith("stream") else 1
        if kind in ("stream", "stream_batch"):
            return self.send_streamed(kind, spec[1])
        try:
            response = self.unary(spec)
        except grpc.RpcError as error:
            return self.check_refusal(error.code(), error.details())
        self.check_ok(spec, response)

    def unary(self, spec):
        kind = spec[0]
        if kind in ("step", "new_session_step"):
            return self.stub.Step(self.step_request(spec)[0])
        if kind == "reset":
            session_id, seq, _ = self.target(spec[1])
            return self.stub.ResetSession(
                pb.ResetSessionRequest(session_id=session_id, sequence_number=seq, h=spec[2], c=spec[3])
            )
        if kind == "create":
            return self.stub.CreateSession(pb.CreateSessionRequest(h0=spec[1], c0=spec[2]))
        if kind == "predict":
            return self.stub.Predict(pb.PredictRequest(inputs=spec[1], h0=spec[2], c0=spec[3]))
        if kind == "read":
            return getattr(self.stub, spec[1])(pb.SessionRef(session_id=spec[2]))
        if spec[1] == "Stream":
            return list(self.channel.stream_stream(SERVICE + "Stream")(iter([spec[2]])))
        return self.channel.unary_unary(SERVICE + spec[1])(spec[2])

    def send_streamed(self, kind: str, specs) -> None:
        built = [self.step_request(spec) for spec in specs]
        requests = [request for request, _ in built]
        if kind == "stream":
            answers = list(self.stub.Stream(iter(requests)))
        else:
            answers = list(self.stub.StreamBatch(iter([pb.StepBatch(steps=requests)])))[0].steps
        assert len(answers) == len(requests)
        for answer, (_, victim) in zip(answers, built, strict=True):
            if answer.HasField("error"):
                self.check_refusal(
                    Code(next(c for c in Code if c.value[0] == answer.error.code)), answer.error.message
                )
            else:
                self.check_step_ok(answer, victim)

    def check_refusal(self, code: grpc.StatusCode, details: str) -> None:
        FIGURES.bad_inputs[f"answered {code.name}"] += 1
        if code not in DOCUMENTED:
            FIGURES.bad_inputs["undocumented status codes"] += 1
        assert code in DOCUMENTED and code != Code.OK, (code, details)
        assert details.strip(), code

    def check_ok(self, spec, response) -> None:
        kind = spec[0]
        FIGURES.bad_inputs["answered OK"] += 1
        if kind in ("step", "new_session_step"):
            self.check_step_ok(response, self.step_request(spec)[1])
        elif kind == "reset":
            victim = self.target(spec[1])[2]
            assert victim and victim[1] in self.victims.answers[victim[0]], "a reset was applied"
        elif kind == "create":
            self.stub.CloseSession(pb.SessionRef(session_id=response.session_id))  # a valid create: allowed
        elif kind == "read":
            assert spec[1] != "CloseSession", "an id nobody was given closed a session"
        elif kind == "raw" and spec[1] == "Stream":  # bytes that parse: each answered in-band with an error
            for data in response:
                answer = pb.StepResponse.FromString(data)
                assert answer.HasField("error"), answer
                self.check_refusal(
                    Code(next(c for c in Code if c.value[0] == answer.error.code)), answer.error.message
                )
        elif kind == "raw":
            assert spec[1] not in ("CloseSession", "ResetSession", "Step"), (spec, response)

    def check_step_ok(self, response, victim) -> None:
        if victim is None:  # a well-formed step on a new session: allowed, and the session is closed again
            self.stub.CloseSession(pb.SessionRef(session_id=response.session_id))
            return
        index, seq = victim
        assert response.outputs.data == self.victims.answers[index].get(seq), "a replay answered differently"

    def victims_unchanged(self) -> None:
        now = [observe(self.stub, sid) for sid in self.victims.ids]
        FIGURES.state_mismatches += sum(a != b for a, b in zip(now, self.victims.before, strict=True))
        assert now == self.victims.before


@settings(
    max_examples=scale(reduced=30, full=1000),
    deadline=None,
    phases=[Phase.generate],
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(example=EXAMPLE)
def test_malformed_and_adversarial_requests_change_nothing(fuzz_server, stub, victims, example):
    judge = Judge(*stub, victims)
    live = total(fuzz_server.app.metrics.registry, "lstmserve_live_sessions")
    for spec in example:
        judge.send(spec)
    judge.victims_unchanged()
    assert total(fuzz_server.app.metrics.registry, "lstmserve_live_sessions") == live
    assert stub[0].GetModelInfo(pb.GetModelInfoRequest()).input_size == 4  # still serving
