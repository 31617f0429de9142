"""The limits the engine works within. Their defaults and meanings live in server/settings.py only; the
composition root (server/app.py) builds this from the settings."""

import dataclasses

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
