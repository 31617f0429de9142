"""The load kinds of issue 3's scenarios, on the native LstmService: closed and open loop on Stream, multiplexed
StreamBatch, columnar StreamColumns, whole-sequence Predict calls and mass session creation.

Each `prepare_*` prepares (streams, messages) and returns `run(start, end)`; those in SESSION_KINDS are also given
the worker's sessions, kept across jobs so that repeats do not pay for session creation.
"""

import asyncio
import collections
import time

import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb

from bench.tally import Tally, check_answer, ping_pong_all, read_scheduled, tensor


async def prepare_closed(stub, job: dict, ids: list[str]):
    """Closed loop: every session sends one step and waits for its answer."""
    inputs = tensor((job["steps"], job["input_size"]))
    requests = [pb.StepRequest(session_id=i, inputs=inputs) for i in ids]  # seq 0: server numbers them
    return ping_pong_all([stub.Stream() for _ in ids], requests)


async def prepare_open(stub, job: dict, ids: list[str]):
    """Open loop: a fixed offered rate, round robin over the sessions."""
    inputs = tensor((job["steps"], job["input_size"]))
    requests = [pb.StepRequest(session_id=i, inputs=inputs) for i in ids]
    calls = [stub.Stream() for _ in ids]
    rate = job["rate"]

    async def run(start: float, end: float) -> dict:
        tally = Tally()
        scheduled = [collections.deque() for _ in calls]
        readers = [
            asyncio.create_task(read_scheduled(call, due, start, end, tally))
            for call, due in zip(calls, scheduled, strict=True)
        ]
        origin = time.monotonic()

        async def send(i: int) -> None:
            """Stream i's share of the round robin: request i + k * n is due at origin + (i + k * n) / rate. One
            writer per stream: a single writer awaiting each write in turn offered at most one write per turn of
            the client's event loop, which fell behind the rate under load (the echo's own p50 reached 0.9 s)."""
            k = 0
            while (due := origin + (i + k * len(calls)) / rate) < end:
                await asyncio.sleep(due - time.monotonic())
                scheduled[i].append(due)  # latency counts from the intended send time
                await calls[i].write(requests[i])
                k += 1
            await calls[i].done_writing()

        await asyncio.gather(*(send(i) for i in range(len(calls))))
        await asyncio.wait(readers, timeout=10)
        tally.dropped = sum(len(d) for d in scheduled)
        return tally.result()

    return run


async def prepare_batch(stub, job: dict, ids: list[str]):
    """Multiplexed: many sessions' steps in one StreamBatch message, closed loop per stream."""
    inputs = tensor((job["steps"], job["input_size"]))
    per_stream = np.array_split(np.array(ids), job["streams"])
    messages = [
        pb.StepBatch(steps=[pb.StepRequest(session_id=i, inputs=inputs) for i in chunk])
        for chunk in per_stream
    ]
    return ping_pong_all([stub.StreamBatch() for _ in messages], messages)


async def prepare_columns(stub, job: dict, ids: list[str]):
    """Columnar: the same, packed as StepColumns (one [sessions, steps, input] tensor)."""
    messages = [pb.StepColumns(session_ids=chunk, inputs=tensor((len(chunk), job["steps"], job["input_size"])))
                for chunk in np.array_split(np.array(ids), job["streams"])]
    return ping_pong_all([stub.StreamColumns() for _ in messages], messages)


async def prepare_predict(stub, job: dict):
    """Whole sequences: Predict calls one after another."""
    request = pb.PredictRequest(inputs=tensor((job["seq_len"], job["batch"], job["input_size"])))
    await stub.Predict(request)  # warm the connection and the server's code path

    async def run(start: float, end: float) -> dict:
        tally = Tally()
        for _ in range(job["calls"]):
            sent = time.monotonic()
            response = await stub.Predict(request)
            tally.add(time.monotonic() - sent, response.outputs.shape[0] * response.outputs.shape[1])
        return tally.result()

    return run


async def prepare_create(stub, job: dict):
    """Mass session creation: new_session entries in StreamBatch messages."""
    inputs = tensor((1, job["input_size"]))
    message = pb.StepBatch(
        steps=[
            pb.StepRequest(new_session=pb.CreateSessionRequest(), inputs=inputs)
            for _ in range(job["per_message"])
        ]
    )

    async def run(start: float, end: float) -> dict:
        tally = Tally()
        call = stub.StreamBatch()
        for _ in range(job["sessions"] // job["per_message"]):
            await call.write(message)
            answer = await call.read()
            tally.add(0.0, check_answer(answer))
        await call.done_writing()
        return tally.result()

    return run


SESSION_KINDS = {"closed": prepare_closed, "open": prepare_open, "batch": prepare_batch, "columns": prepare_columns}
KINDS = {"predict": prepare_predict, "create": prepare_create}
