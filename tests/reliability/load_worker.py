"""One load-test client process: drives its share of sessions to the end and checks them against the model."""

import asyncio
import time

import grpc
import numpy as np
import torch
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import AsyncLstmClient, LstmClient
from tests.integration.reference import TOLERANCE, run_module


def session_inputs(first: int, sessions: int, steps: int, input_size: int) -> np.ndarray:
    """`[steps, sessions, input]`, each session's column from its own seed, so any process can rebuild it."""
    return np.stack(
        [
            np.random.default_rng(first + s).standard_normal((steps, input_size), dtype=np.float32)
            for s in range(sessions)
        ],
        axis=1,
    )


def run(
    address: str,
    model_path: str,
    sizes: tuple[int, int, int],
    first: int,
    sessions: int,
    steps: int,
    mode: str,
) -> dict:
    """Drives `sessions` sessions (sizes: layers, hidden, input) for `steps` single steps each; returns
    counts of steps, errors and sessions whose outputs or final state differ from the model run in-process."""
    scripted = torch.jit.load(model_path)
    m = dict(zip(("layers", "hidden", "input"), sizes, strict=True))
    xs = session_inputs(first, sessions, steps, m["input"])
    drive = _drive_with_stream_batch if mode == "stream_batch" else _drive_with_client_streams
    started = time.monotonic()
    ids, outputs, errors = drive(address, xs)
    seconds = time.monotonic() - started
    zeros = torch.zeros(m["layers"], sessions, m["hidden"])
    y, (h, c) = run_module(scripted, torch.from_numpy(xs), (zeros, zeros.clone()))
    mismatches = 0
    with LstmClient(address) as client:
        for s, session_id in enumerate(ids):
            session = client.session(session_id=session_id)
            got_h, got_c = session.state()
            info = session.info()
            same = (
                np.allclose(outputs[:, s], y[:, s].numpy(), atol=TOLERANCE)
                and np.allclose(got_h, h[:, s].numpy(), atol=TOLERANCE)
                and np.allclose(got_c, c[:, s].numpy(), atol=TOLERANCE)
                and info.steps_applied == steps
                and info.last_sequence_number == steps
            )
            mismatches += not same
            session.close()
    return {
        "sessions": sessions,
        "steps": sessions * steps,
        "errors": errors,
        "mismatches": mismatches,
        "seconds": seconds,
    }


def _drive_with_stream_batch(address: str, xs: np.ndarray):
    """One StreamBatch call: each message carries one step of every session (an aggregator's traffic)."""
    steps, sessions, _ = xs.shape
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        ids = [stub.CreateSession(pb.CreateSessionRequest()).session_id for _ in range(sessions)]

        def messages():
            for t in range(steps):
                yield pb.StepBatch(
                    steps=[
                        pb.StepRequest(
                            session_id=ids[s], sequence_number=t + 1, inputs=tensors.to_proto(xs[t, s][None])
                        )
                        for s in range(sessions)
                    ]
                )

        outputs, errors = [], 0
        for response in stub.StreamBatch(messages()):
            row = []
            for step in response.steps:
                errors += step.HasField("error")
                row.append(tensors.from_proto(step.outputs)[0] if not step.HasField("error") else np.nan)
            outputs.append(np.stack(row))
    return ids, np.stack(outputs), errors


def _drive_with_client_streams(address: str, xs: np.ndarray):
    """One `AsyncSession.stream` per session, all at once, through the client library."""

    async def drive():
        async with AsyncLstmClient(address) as client:
            sessions = [await client.session().open() for _ in range(xs.shape[1])]

            async def one(s: int):
                return np.stack([y async for y in sessions[s].stream(xs[:, s])])

            outputs = await asyncio.gather(*(one(s) for s in range(len(sessions))))
            return [s.id for s in sessions], np.stack(outputs, axis=1), 0

    return asyncio.run(drive())
