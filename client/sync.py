"""Blocking client: `with LstmClient(addr) as c, c.session() as s: y = s.step(x)`."""

from collections.abc import Iterable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import messages
from client.channel import Credentials, open_channel


class LstmClient:
    """With `credentials` (TLS roots, client certificate, token) the channel is TLS, else plaintext."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 credentials: Credentials | None = None):
        self._channel = open_channel(grpc, address, credentials)
        self.stub = pb_grpc.LstmServiceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> "LstmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """The standard gRPC health status by name: SERVING, NOT_SERVING, ..."""
        response = health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def predict(self, inputs, h0=None, c0=None) -> messages.Prediction:
        """Whole sequences `inputs[seq_len, batch, input]`, statelessly, from `(h0, c0)` or zeros."""
        return messages.prediction(
            self.stub.Predict(messages.predict_request(inputs, h0, c0), timeout=self.timeout))

    def session(self, h0=None, c0=None, session_id: str | None = None) -> "Session":
        """Opens a session (from `(h0, c0)` `[layers, hidden]` or zeros), or re-attaches to `session_id`."""
        if session_id is None:
            info = self.stub.CreateSession(messages.create_request(h0, c0), timeout=self.timeout)
        else:
            info = self.stub.GetSession(pb.SessionRef(session_id=session_id), timeout=self.timeout)
        return Session(self, info.session_id, info.last_sequence_number)


class Session(messages.NumberedRequests):
    """A server-side (h, c) that carries forward across calls; numbers each request for exactly-once."""

    def __init__(self, client: LstmClient, session_id: str, last_sequence_number: int = 0):
        self._client = client
        self.id = session_id
        self._next_seq = last_sequence_number + 1

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, x) -> np.ndarray:
        """`x[input]` -> `y[output]`, or `x[T, input]` -> `y[T, output]`."""
        request, single = messages.step_request(self.id, self._next_seq, x)
        response = self._client.stub.Step(request, timeout=self._client.timeout)
        self._next_seq += 1
        return messages.step_outputs(response, single)

    def stream(self, xs: Iterable) -> Iterator[np.ndarray]:
        """Streams each x (one step `[input]` or a chunk `[T, input]`) and yields its output as it arrives."""
        singles = []
        call = self._client.stub.Stream(self._numbered_steps(xs, singles))
        try:
            for i, response in enumerate(call):
                yield messages.step_outputs(response, singles[i])
        except messages.StepError as error:
            self._next_seq = error.sequence_number  # nothing from there on was applied
            raise
        finally:
            call.cancel()

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """`(h, c)`, each `[num_layers, hidden]`, after every step answered so far."""
        return messages.state(self._client.stub.GetState(pb.SessionRef(session_id=self.id),
                                                         timeout=self._client.timeout))

    def reset(self, h=None, c=None) -> None:
        request = messages.reset_request(self.id, self._next_seq, h, c)
        self._client.stub.ResetSession(request, timeout=self._client.timeout)
        self._next_seq += 1

    def info(self) -> pb.SessionInfo:
        return self._client.stub.GetSession(pb.SessionRef(session_id=self.id), timeout=self._client.timeout)

    def close(self) -> None:
        self._client.stub.CloseSession(pb.SessionRef(session_id=self.id), timeout=self._client.timeout)
