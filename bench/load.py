"""Load generators: worker processes, each an asyncio gRPC client, driven by the bench over a pipe.

The same code drives the real server and the echo server. Each worker keeps one channel and its
sessions per address across jobs, so repeats do not pay for session creation. A job runs in two
phases: the worker prepares (sessions, open streams) and says "ready"; the parent then sends one
start time (CLOCK_MONOTONIC, shared by all processes) so that every worker measures the same window.
"""

import asyncio
import collections
import multiprocessing
import time
from collections.abc import Callable

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.max_send_message_length", 512 * 1024 * 1024),
]


class StepFailed(RuntimeError):
    """The server answered a bench request with an error: the figures would be meaningless."""


def tensor(shape: tuple[int, ...], seed: int = 0) -> pb.Tensor:
    values = np.random.default_rng(seed).standard_normal(shape).astype("<f4")
    return pb.Tensor(shape=shape, data=values.tobytes())


class Worker:
    """One client process's state: channels and sessions by address."""

    def __init__(self, conn):
        self._conn = conn
        self._stubs: dict[str, pb_grpc.LstmServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sessions: dict[str, list[str]] = collections.defaultdict(list)

    async def handle(self, job: dict) -> dict:
        if job["kind"] == "forget":
            await self._forget(job["address"])
            return {}
        stub = self._stub(job["address"])
        run = await self._preparer(job["kind"])(stub, job)
        self._conn.send("ready")
        start_at = self._conn.recv()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        window = (
            start_at + job.get("warmup", 0.0),
            start_at + job.get("warmup", 0.0) + job.get("duration", 0.0),
        )
        return await run(*window)

    def _preparer(self, kind: str):
        from bench.load_callers import KINDS  # imported here: it builds on this module

        return KINDS.get(kind) or getattr(self, f"_prepare_{kind}")

    def _stub(self, address: str) -> pb_grpc.LstmServiceStub:
        if address not in self._stubs:
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
            self._stubs[address] = pb_grpc.LstmServiceStub(self._channels[address])
        return self._stubs[address]

    async def _forget(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        self._stubs.pop(address, None)
        self._sessions.pop(address, None)
        if channel:
            await channel.close()

    async def _session_ids(self, stub, address: str, count: int) -> list[str]:
        sessions = self._sessions[address]
        while len(sessions) < count:
            chunk = min(128, count - len(sessions))
            infos = await asyncio.gather(
                *(stub.CreateSession(pb.CreateSessionRequest()) for _ in range(chunk))
            )
            sessions.extend(info.session_id for info in infos)
        return sessions[:count]

    # -- closed loop: every session sends one step and waits for its answer ---------------------

    async def _prepare_closed(self, stub, job: dict):
        ids = await self._session_ids(stub, job["address"], job["sessions"])
        inputs = tensor((job["steps"], job["input_size"]))
        requests = [pb.StepRequest(session_id=i, inputs=inputs) for i in ids]  # seq 0: server numbers them
        return _ping_pong_all([stub.Stream() for _ in ids], requests)

    # -- open loop: a fixed offered rate, round robin over the sessions ----------------------------

    async def _prepare_open(self, stub, job: dict):
        ids = await self._session_ids(stub, job["address"], job["sessions"])
        inputs = tensor((job["steps"], job["input_size"]))
        requests = [pb.StepRequest(session_id=i, inputs=inputs) for i in ids]
        calls = [stub.Stream() for _ in ids]
        rate = job["rate"]

        async def run(start: float, end: float) -> dict:
            tally = Tally()
            scheduled = [collections.deque() for _ in calls]
            readers = [
                asyncio.create_task(_read_scheduled(call, due, start, end, tally))
                for call, due in zip(calls, scheduled, strict=True)
            ]
            origin, sent = time.monotonic(), 0
            while (now := time.monotonic()) < end:
                while sent < int((now - origin) * rate):
                    i = sent % len(calls)
                    scheduled[i].append(origin + sent / rate)  # latency counts from the intended send time
                    await calls[i].write(requests[i])
                    sent += 1
                await asyncio.sleep(0.0005)
            for call in calls:
                await call.done_writing()
            await asyncio.wait(readers, timeout=10)
            tally.dropped = sum(len(d) for d in scheduled)
            return tally.result()

        return run

    # -- multiplexed: many sessions' steps in one StreamBatch message, closed loop per stream -----

    async def _prepare_batch(self, stub, job: dict):
        ids = await self._session_ids(stub, job["address"], job["sessions"])
        inputs = tensor((job["steps"], job["input_size"]))
        per_stream = np.array_split(np.array(ids), job["streams"])
        messages = [
            pb.StepBatch(steps=[pb.StepRequest(session_id=i, inputs=inputs) for i in chunk])
            for chunk in per_stream
        ]
        return _ping_pong_all([stub.StreamBatch() for _ in messages], messages)

    # -- columnar: the same, packed as StepColumns (one [sessions, steps, input] tensor) -----------

    async def _prepare_columns(self, stub, job: dict):
        ids = await self._session_ids(stub, job["address"], job["sessions"])
        messages = [pb.StepColumns(session_ids=chunk, inputs=tensor((len(chunk), job["steps"], job["input_size"])))
                    for chunk in np.array_split(np.array(ids), job["streams"])]
        return _ping_pong_all([stub.StreamColumns() for _ in messages], messages)

    # -- whole sequences: Predict calls one after another ------------------------------------------

    async def _prepare_predict(self, stub, job: dict):
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

    # -- mass session creation: new_session entries in StreamBatch messages -----------------------

    async def _prepare_create(self, stub, job: dict):
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
                tally.add(0.0, _check(answer))
            await call.done_writing()
            return tally.result()

        return run


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


def _check(answer) -> int:
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


def _ping_pong_all(calls: list, messages: list):
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
            steps = _check(answer)
            if start <= now < end:
                tally.add(now - sent, steps)
        await call.done_writing()
    finally:
        call.cancel()


async def _read_scheduled(call, scheduled: collections.deque, start: float, end: float, tally: Tally) -> None:
    while (answer := await call.read()) is not grpc.aio.EOF:
        due = scheduled.popleft()
        steps = _check(answer)
        if start <= due < end:
            tally.add(time.monotonic() - due, steps)


def worker_main(conn) -> None:
    loop = asyncio.new_event_loop()
    worker = Worker(conn)
    while (job := conn.recv()) is not None:
        try:
            conn.send(loop.run_until_complete(worker.handle(job)))
        except Exception as error:  # noqa: BLE001 - reported to the parent, which stops the bench
            conn.send(error)
    loop.close()


class LoadPool:
    """`processes` client worker processes (spawned: no torch or gRPC state inherited from the bench)."""

    def __init__(self, processes: int):
        context = multiprocessing.get_context("spawn")
        self._conns, self._procs = [], []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=worker_main, args=(child,), daemon=True)
            process.start()
            self._conns.append(parent)
            self._procs.append(process)

    @property
    def size(self) -> int:
        return len(self._conns)

    def run(self, jobs: list[dict], started: Callable[[float], None] | None = None) -> list[dict]:
        """Runs one job per worker (the first len(jobs) workers) over the same measuring window; `started` is
        told the start time (CLOCK_MONOTONIC) once every worker is ready, e.g. to act at a moment of the run."""
        conns = self._conns[: len(jobs)]
        for conn, job in zip(conns, jobs, strict=True):
            conn.send(job)
        for conn in conns:
            _raise_if_error(conn.recv())
        start_at = time.monotonic() + 0.05
        if started:
            started(start_at)
        for conn in conns:
            conn.send(start_at)
        return [_raise_if_error(conn.recv()) for conn in conns]

    def forget(self, address: str) -> None:
        for conn in self._conns:
            conn.send({"kind": "forget", "address": address})
        for conn in self._conns:
            _raise_if_error(conn.recv())

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for process in self._procs:
            process.join(10)


def _raise_if_error(reply):
    if isinstance(reply, Exception):
        raise reply
    return reply
