"""A client process to kill mid-stream: streams a session's inputs and prints each acknowledged number."""

import sys

import numpy as np

from client import LstmClient


def inputs(count: int, seed: int, input_size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, input_size), dtype=np.float32)


def main(address: str, session_id: str, count: int, seed: int) -> None:
    with LstmClient(address) as client:
        session = client.session(session_id=session_id)
        for seq, _ in enumerate(session.stream(inputs(count, seed)), start=1):
            print(f"acked {seq}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
