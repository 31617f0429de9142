"""What the engine tells its callers about the model and about a session: plain values, no live objects."""

import dataclasses
import time

from server.engine.limits import EngineLimits
from server.engine.sessions import Session
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

    @classmethod
    def of(cls, session: Session, now: float, idle_timeout: float) -> "SessionView":
        """`session` at `now` on the engine's monotonic clock, its times turned into wall-clock ones."""
        last_used_at = time.time() - (now - session.last_used)
        return cls(session.id, session.steps_applied, session.last_applied_seq, session.created_at, last_used_at,
                   last_used_at + idle_timeout, idle_timeout)
