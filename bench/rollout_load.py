"""Worker side of the roll-out scenario: sessions that each live a while, then close and are replaced by a new
one (as a real population of sessions turns over), each streaming closed loop on a Stream of its own. Every
answer is kept with its arrival time, so that the bench cuts its windows (steady, around the switch) afterwards.

Kept apart from bench/rollout.py so that the client processes never import torch.
"""

import asyncio
import time

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb

from bench.tally import tensor


class Timeline:
    """Every answer's arrival time, latency and steps, and the steps lost: in-band errors, and requests left
    unanswered by a stream that broke."""

    def __init__(self):
        self.times: list[float] = []
        self.latencies: list[float] = []
        self.steps: list[int] = []
        self.errors: list[str] = []
        self.unanswered = 0

    def add(self, now: float, latency: float, steps: int) -> None:
        self.times.append(now)
        self.latencies.append(latency)
        self.steps.append(steps)

    def result(self) -> dict:
        return {"times": np.array(self.times), "latencies": np.array(self.latencies),
                "steps": np.array(self.steps), "errors": self.errors[:10], "error_count": len(self.errors),
                "unanswered": self.unanswered}


async def prepare_turnover(stub, job: dict):
    """`sessions` closed loops; each session lives `lifetime` seconds (the first ones staggered over one
    lifetime, so sessions end at an even pace from the start), then closes and a new one opens in-band."""
    inputs = tensor((job["steps"], job["input_size"]))
    calls = [stub.Stream() for _ in range(job["sessions"])]
    timeline = Timeline()

    async def run(start: float, end: float) -> dict:
        lifetime, began = job["lifetime"], time.monotonic()
        await asyncio.gather(*(_turn_over(stub, call, inputs, end, timeline, lifetime,
                                          began + lifetime * (i + 1) / len(calls))
                               for i, call in enumerate(calls)))
        return timeline.result()

    return run


async def _turn_over(stub, call, inputs: pb.Tensor, end: float, timeline: Timeline, lifetime: float,
                     first_end: float) -> None:
    """One stream until `end`: steps its session, replacing it by a new one every `lifetime` seconds."""
    session_id, ends_at, waiting = "", first_end, False
    try:
        while (sent := time.monotonic()) < end:
            if session_id and sent >= ends_at:
                await stub.CloseSession(pb.SessionRef(session_id=session_id))
                session_id, ends_at = "", sent + lifetime
            request = pb.StepRequest(session_id=session_id, inputs=inputs) if session_id else \
                pb.StepRequest(new_session=pb.CreateSessionRequest(), inputs=inputs)  # seq 0: numbered by the server
            await call.write(request)
            waiting = True
            answer = await call.read()
            waiting = False
            now = time.monotonic()
            if answer is grpc.aio.EOF:
                raise RuntimeError("the server ended the stream")
            if answer.HasField("error"):
                timeline.errors.append(f"{answer.error.code}: {answer.error.message}")
                session_id = ""  # the next step opens a new session
                continue
            session_id = answer.session_id
            timeline.add(now, now - sent, answer.outputs.shape[0])
        if session_id:
            await stub.CloseSession(pb.SessionRef(session_id=session_id))
        await call.done_writing()
    except (grpc.RpcError, RuntimeError) as error:
        timeline.errors.append(repr(error))
        timeline.unanswered += waiting
    finally:
        call.cancel()
