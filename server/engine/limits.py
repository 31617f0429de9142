"""The limits the engine works within, and the count of what they refuse. Their defaults and meanings live in
server/settings.py only; the composition root (server/app.py) builds this from the settings."""

import dataclasses

from server.engine.errors import LimitExceeded
from server.metrics import Metrics
from server.policies import FullPolicy


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int
    max_batch_delay: float
    idle_timeout: float
    max_sessions: int
    max_sessions_per_owner: int
    max_state_bytes: int
    full_policy: FullPolicy
    answers_kept: int
    initial_capacity: int
    max_steps_per_request: int
    max_sequence_length: int
    max_predict_batch: int
    max_queued_requests: int
    allow_nonfinite: bool
    torch_threads: int
    rate_limit: float
    rate_limit_burst: int


class RefusalCounter:
    """`with`: counts a LimitExceeded passing through by its limit. A class, not a generator context manager:
    a streamed step enters it three times, and a generator's setup cost ~1 us each time (py-spy, issue 12)."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, LimitExceeded):
            self._metrics.limit_refusals.labels(error.limit).inc()
        return False
