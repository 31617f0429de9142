"""What a load job sends and counts: the inputs (`tensor`), the Tally of latencies and steps, the check of every
answer (an in-band error stops the bench), and the loops that feed a tally: ping-pong, and answers read against
their scheduled send times."""

import asyncio
import collections
import time

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb


class StepFailed(RuntimeError):
    """The server answered a bench request with an error: the figures would be meaningless."""


def tensor(shape: tuple[int, ...], seed: int = 0) -> pb.Tensor:
    values = np.random.default_rng(seed).standard_normal(shape).astype("<f4")
    return pb.Tensor(shape=shape, data=values.tobytes())


class Tally:
    """Latencies and completed steps of one job."""

    def __init__(self):
        self.latencies: list[float] = []
        self.steps = 0
        self.dropped = 0

    def add(self, latency: float, steps: int) -> None:
        self.latencies.append(latency)
        self.steps += steps

    def result(self) -> dict:
        return {"latencies": np.array(self.latencies), "steps": self.steps, "dropped": self.dropped}


def check_answer(answer) -> int:
    """Steps carried by an answer (StepResponse, StepBatchResponse or StepColumnsResponse); raises on an in-band
    error."""
    if isinstance(answer, pb.StepColumnsResponse):
        if answer.errors:
            error = answer.errors[0].error
            raise StepFailed(f"server answered entry {answer.errors[0].index} with error {error.code}: {error.message}")
        return answer.outputs.shape[0] * answer.outputs.shape[1]
    answers = answer.steps if isinstance(answer, pb.StepBatchResponse) else (answer,)
    for one in answers:
        if one.HasField("error"):
            raise StepFailed(f"server answered with error {one.error.code}: {one.error.message}")
    return sum(one.outputs.shape[0] for one in answers)


def ping_pong_all(calls: list, messages: list):
    """A run in which every call sends its message and waits for the answer, over and over."""
    async def run(start: float, end: float) -> dict:
        tally = Tally()
        await asyncio.gather(*(_ping_pong(call, message, start, end, tally)
                               for call, message in zip(calls, messages, strict=True)))
        return tally.result()

    return run


async def _ping_pong(call, request, start: float, end: float, tally: Tally) -> None:
    """Sends, waits for the answer, repeats until `end`; counts answers that arrive in [start, end)."""
    try:
        while (sent := time.monotonic()) < end:
            await call.write(request)
            answer = await call.read()
            now = time.monotonic()
            steps = check_answer(answer)
            if start <= now < end:
                tally.add(now - sent, steps)
        await call.done_writing()
    finally:
        call.cancel()


async def read_scheduled(call, scheduled: collections.deque, start: float, end: float, tally: Tally) -> None:
    while (answer := await call.read()) is not grpc.aio.EOF:
        due = scheduled.popleft()
        steps = check_answer(answer)
        if start <= due < end:
            tally.add(time.monotonic() - due, steps)

