"""The compute limit: the served model called in this process, with the server's runtime and thread count."""

import statistics
import time
from pathlib import Path

import torch

from server.model import ModelRuntime


class InProcessModel:
    """Times `ModelRuntime.run` (the server's own call path, oneDNN choice included) on random inputs."""

    def __init__(self, model_path: Path, threads: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        self.runtime = ModelRuntime.load(model_path, device)
        cuda = self.runtime.device.type == "cuda"
        self._synchronize = (lambda: torch.cuda.synchronize(self.runtime.device)) if cuda else (lambda: None)

    def seconds_per_call(self, steps: int, batch: int, min_time: float = 0.3, min_calls: int = 3) -> float:
        """Median wall time of one call over `x[steps, batch, input]` from a zero state."""
        x = torch.randn(steps, batch, self.runtime.metadata.input_size)
        h, c = self.runtime.initial_state(batch)
        self.runtime.run(x, h, c)  # the first call at a new shape pays for TorchScript's profiling
        self._synchronize()
        times: list[float] = []
        deadline = time.perf_counter() + min_time
        while len(times) < min_calls or time.perf_counter() < deadline:
            started = time.perf_counter()
            self.runtime.run(x, h, c)
            self._synchronize()  # a GPU call returns before its kernels finish
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def steps_per_second(self, steps: int, batch: int, **timing) -> float:
        return steps * batch / self.seconds_per_call(steps, batch, **timing)
