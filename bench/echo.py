"""The transport limit: a bare grpc.aio server speaking LstmService with no model and no sessions.

It answers Stream, StreamBatch and StreamColumns requests with outputs of the served model's size, so the bench
client sends and receives the same bytes through the same code as against the real server. Run as
`python -m bench.echo --output-size N`; it prints `echo listening on 127.0.0.1:PORT`.
"""

import argparse
import asyncio
import secrets

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.policies import EventLoop


class EchoServicer(pb_grpc.LstmServiceServicer):
    def __init__(self, output_size: int):
        self._output_size = output_size
        self._payloads: dict[tuple, bytes] = {}  # zero outputs per shape, built once

    def _outputs(self, *shape: int) -> pb.Tensor:
        """Zeros of `[*shape, output]`."""
        shape = (*shape, self._output_size)
        data = self._payloads.get(shape)
        if data is None:
            data = self._payloads[shape] = np.zeros(shape, np.float32).tobytes()
        return pb.Tensor(shape=shape, data=data)

    def _answer(self, request: pb.StepRequest) -> pb.StepResponse:
        steps = request.inputs.shape[0] if request.inputs.shape else 1
        return pb.StepResponse(
            session_id=request.session_id,
            sequence_number=request.sequence_number,
            outputs=self._outputs(steps),
        )

    async def CreateSession(self, request, context):
        return pb.SessionInfo(session_id=secrets.token_urlsafe(16))

    async def CloseSession(self, request, context):
        return pb.CloseSessionResponse()

    async def Stream(self, request_iterator, context):
        async for request in request_iterator:
            yield self._answer(request)

    async def StreamBatch(self, request_iterator, context):
        async for batch in request_iterator:
            yield pb.StepBatchResponse(steps=[self._answer(step) for step in batch.steps])

    async def StreamColumns(self, request_iterator, context):
        """Zeros of the answer's size, and a sequence number per entry as the server sends."""
        async for message in request_iterator:
            entries = len(message.session_ids)
            yield pb.StepColumnsResponse(outputs=self._outputs(entries, message.inputs.shape[1]),
                                         sequence_numbers=[1] * entries)


async def serve(output_size: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_LstmServiceServicer_to_server(EchoServicer(output_size), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-size", type=int, required=True)
    # the server's default event loop (--event-loop): the same transport on the same loop, minus the server
    with asyncio.Runner(loop_factory=EventLoop.UVLOOP.factory()) as runner:
        runner.run(serve(parser.parse_args().output_size))


if __name__ == "__main__":
    main()
