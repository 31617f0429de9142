"""Stateless sequences (Predict): whole sequences run from a given or zero state, and no session kept. Checked
here, then run by the merger (predict_merge.py) on the model thread, beside the sessions' batches."""

from collections.abc import Awaitable, Callable

import numpy as np
import torch

from server.engine.limits import EngineLimits, RefusalCounter
from server.engine.predict_merge import Arrays, PredictMerger
from server.engine.validation import check_at_most, check_tensor, initial_state
from server.metrics import Metrics
from server.model import ModelRuntime
from server.tracing import Tracing


class Predicts:
    """Stateless sequences of one model: checked, then merged with concurrent ones and run on the model thread
    (`run_in_model_thread(fn, *args)`); `refusals` counts what the limits refuse."""

    def __init__(self, runtime: ModelRuntime, limits: EngineLimits, metrics: Metrics,
                 run_in_model_thread: Callable[..., Awaitable], refusals: RefusalCounter,
                 tracing: Tracing | None = None):
        self._runtime = runtime
        self._limits = limits
        self._refusals = refusals
        self._merger = PredictMerger(run_in_model_thread, self._run_on_host, metrics, limits.max_predict_batch,
                                     tracing=tracing)

    async def predict(self, inputs: np.ndarray, h0: np.ndarray | None, c0: np.ndarray | None) -> Arrays:
        """Runs whole sequences `inputs[seq_len, batch, input]`; returns `(outputs, h_n, c_n)`. Concurrent calls
        of equal seq_len share model calls (see predict_merge)."""
        m, limits = self._runtime.metadata, self._limits
        check_tensor("inputs", inputs, (None, None, m.input_size), limits.allow_nonfinite)
        with self._refusals:
            check_at_most("inputs' seq_len", inputs.shape[0], limits.max_sequence_length, "max_sequence_length")
            check_at_most("inputs' batch", inputs.shape[1], limits.max_batch_size, "max_batch_size")
        h, c = initial_state(h0, c0, (m.num_layers, inputs.shape[1], m.hidden_size), self._runtime.device,
                             limits.allow_nonfinite, names=("h0", "c0"))
        x = torch.from_numpy(np.array(inputs, dtype=np.float32))
        seq_len, batch = inputs.shape[:2]
        nbytes = 4 * (x.numel() + seq_len * batch * m.output_size + 4 * h.numel())  # inputs, outputs, states
        return await self._merger.predict(x, h, c, nbytes)

    def _run_on_host(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> Arrays:
        """On the model thread: the call and the copies of its results to host memory."""
        return tuple(t.cpu().numpy() for t in self._runtime.run(x, h, c))
