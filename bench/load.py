"""Load generators: worker processes, each an asyncio gRPC client, driven by the bench over a pipe.

The same code drives the real server and the echo server. Each worker keeps one channel and its
sessions per address across jobs, so repeats do not pay for session creation. A job runs in two
phases: the worker prepares (sessions, open streams) and says "ready"; the parent then sends one
start time (CLOCK_MONOTONIC, shared by all processes) so that every worker measures the same window.
The job kinds themselves are in bench/load_streams.py and bench/load_callers.py.
"""

import asyncio
import collections
import multiprocessing
import time
from collections.abc import Callable

import grpc
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from bench.load_callers import KINDS as CALLER_KINDS
from bench.load_streams import KINDS, SESSION_KINDS

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 512 * 1024 * 1024),
    ("grpc.max_send_message_length", 512 * 1024 * 1024),
]


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
        run = await self._prepare(stub, job)
        self._conn.send("ready")
        start_at = self._conn.recv()
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        window = (
            start_at + job.get("warmup", 0.0),
            start_at + job.get("warmup", 0.0) + job.get("duration", 0.0),
        )
        return await run(*window)

    async def _prepare(self, stub, job: dict):
        """The job's `run(start, end)`, once its kind has prepared it."""
        kind = job["kind"]
        if kind in SESSION_KINDS:
            ids = await self._session_ids(stub, job["address"], job["sessions"])
            return await SESSION_KINDS[kind](stub, job, ids)
        return await (KINDS.get(kind) or CALLER_KINDS[kind])(stub, job)

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
