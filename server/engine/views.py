"""What the engine tells its callers about the model and about a session: plain values, no live objects."""

import dataclasses

from server.engine.limits import EngineLimits
from server.model import ModelMetadata


@dataclasses.dataclass(frozen=True)
class ModelDescription:
    """What clients may know of the served model and the limits its requests meet."""

    metadata: ModelMetadata
    limits: EngineLimits


@dataclasses.dataclass(frozen=True)
class SessionView:
    """A snapshot of a session's bookkeeping, in wall-clock seconds."""

    session_id: str
    steps_applied: int
    last_sequence_number: int
    created_at: float
    last_used_at: float
    expires_at: float
    idle_timeout: float
