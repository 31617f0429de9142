"""Load kinds of issue 12 beside bench/load_streams.py's: concurrent callers of a unary RPC, native or Open Inference
Protocol, and OIP sequences streamed with the unmodified `tritonclient` asyncio client.

Each `prepare_*` takes the worker's native stub and the job, prepares (sessions, sequences, streams) and
returns `run(start, end)`, as bench/load_streams.py's do. Every caller loops: send, wait for the
answer, send again; an answer counts when it arrives inside the measuring window.
"""

import asyncio
import itertools
import os
import time

import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb

from bench.rollout_load import prepare_turnover
from bench.tally import Tally, check_answer, tensor

_sequence_ids = itertools.count(1 + (os.getpid() << 20))  # unique per worker process and across jobs


def _triton():
    """Imported in the worker only: the bench's own process never needs tritonclient."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient import grpc as triton

    return triton, triton_aio


async def _loop_until(end: float, start: float, tally: Tally, call) -> None:
    """Awaits `call()` (which returns the steps it carried) over and over until `end`."""
    while (sent := time.monotonic()) < end:
        steps = await call()
        now = time.monotonic()
        if start <= now < end:
            tally.add(now - sent, steps)


def _callers(calls: list):
    """A run in which each of `calls` is looped by its own caller."""
    async def run(start: float, end: float) -> dict:
        tally = Tally()
        await asyncio.gather(*(_loop_until(end, start, tally, call) for call in calls))
        return tally.result()

    return run


# -- native -------------------------------------------------------------------------------------------------


async def prepare_predict_callers(stub, job: dict):
    """`callers` concurrent callers of Predict `[seq_len, batch, input]`, each its own inputs."""
    requests = [pb.PredictRequest(inputs=tensor((job["seq_len"], job["batch"], job["input_size"]), seed=i))
                for i in range(job["callers"])]
    await asyncio.gather(*(stub.Predict(request) for request in requests))  # warm the connection and code path

    def call(request):
        async def predict() -> int:
            shape = (await stub.Predict(request)).outputs.shape
            return shape[0] * shape[1]
        return predict

    return _callers([call(request) for request in requests])


async def prepare_step_callers(stub, job: dict):
    """One unary Step caller per session (`sessions` of them), one `[steps, input]` request at a time."""
    infos = await asyncio.gather(*(stub.CreateSession(pb.CreateSessionRequest()) for _ in range(job["sessions"])))
    inputs = tensor((job["steps"], job["input_size"]))

    def call(session_id: str):
        request = pb.StepRequest(session_id=session_id, inputs=inputs)  # seq 0: the server numbers them

        async def step() -> int:
            return check_answer(await stub.Step(request))
        return step

    return _callers([call(info.session_id) for info in infos])


# -- Open Inference Protocol, through tritonclient.grpc.aio ---------------------------------------------------


def _infer_args(triton, job: dict) -> dict:
    """One `[steps, input]` step of a sequence asking for OUTPUT only, as native Step and Stream answer."""
    inputs = triton.InferInput("INPUT", [job["steps"], job["input_size"]], "FP32")
    inputs.set_data_from_numpy(np.random.default_rng(0).standard_normal(
        (job["steps"], job["input_size"])).astype(np.float32))
    return {"model_name": job["model"], "inputs": [inputs], "outputs": [triton.InferRequestedOutput("OUTPUT")]}


def _steps_of(result) -> int:
    return result.get_response().outputs[0].shape[0]


async def prepare_oip_infer(stub, job: dict):
    """One `client.infer()` caller per sequence (`sessions` of them), each its own sequence id."""
    triton, triton_aio = _triton()
    client = triton_aio.InferenceServerClient(job["address"])
    args = _infer_args(triton, job)
    ids = [next(_sequence_ids) for _ in range(job["sessions"])]
    await asyncio.gather(*(client.infer(**args, sequence_id=i, sequence_start=True) for i in ids))

    def call(sequence_id: int):
        async def infer() -> int:
            return _steps_of(await client.infer(**args, sequence_id=sequence_id))
        return infer

    run = _callers([call(i) for i in ids])

    async def run_and_close(start: float, end: float) -> dict:
        try:
            return await run(start, end)
        finally:
            await client.close()

    return run_and_close


class _PingPongStream:
    """One `client.stream_infer()` stream of one sequence: a request is fed only once the previous answer came."""

    def __init__(self, client, args: dict, sequence_id: int):
        self._requests: asyncio.Queue = asyncio.Queue()
        self._args = {**args, "sequence_id": sequence_id}
        self._answers = client.stream_infer(self._feed())

    async def _feed(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def step(self, start: bool = False) -> int:
        self._requests.put_nowait({**self._args, "sequence_start": start})
        result, error = await self._answers.__anext__()
        if error is not None:
            raise RuntimeError(f"ModelStreamInfer answered with an error: {error}")
        return _steps_of(result)

    def close(self) -> None:
        self._requests.put_nowait(None)
        self._answers.cancel()


async def prepare_oip_stream(stub, job: dict):
    """One ModelStreamInfer stream per sequence (`sessions` of them), ping-pong on each."""
    triton, triton_aio = _triton()
    client = triton_aio.InferenceServerClient(job["address"])
    args = _infer_args(triton, job)
    streams = [_PingPongStream(client, args, next(_sequence_ids)) for _ in range(job["sessions"])]
    await asyncio.gather(*(stream.step(start=True) for stream in streams))
    run = _callers([stream.step for stream in streams])

    async def run_and_close(start: float, end: float) -> dict:
        try:
            return await run(start, end)
        finally:
            for stream in streams:
                stream.close()
            await client.close()

    return run_and_close


KINDS = {"predict_callers": prepare_predict_callers, "step_callers": prepare_step_callers,
         "oip_infer": prepare_oip_infer, "oip_stream": prepare_oip_stream, "turnover": prepare_turnover}
