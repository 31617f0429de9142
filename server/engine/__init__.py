"""The engine: sessions, their state pool and the batching scheduler. Knows nothing about gRPC."""

from server.engine.columnar import ColumnsAnswer
from server.engine.engine import Engine
from server.engine.errors import (
    Draining,
    EngineError,
    InvalidInput,
    LimitExceeded,
    ModelFailure,
    ModelNotFound,
    ModelUnavailable,
    SequenceError,
    SessionNotFound,
    StateUnavailable,
    VersionRetired,
)
from server.engine.limits import EngineLimits
from server.engine.model_thread import ModelThread
from server.engine.scheduler import StepAnswer
from server.engine.sequences import SequenceId, Sequences
from server.engine.views import ModelDescription, SessionView

__all__ = ["ColumnsAnswer", "Draining", "Engine", "EngineError", "EngineLimits", "InvalidInput", "LimitExceeded",
           "ModelDescription", "ModelFailure", "ModelNotFound", "ModelThread", "ModelUnavailable", "SequenceError",
           "SequenceId", "Sequences", "SessionNotFound", "SessionView", "StateUnavailable", "StepAnswer",
           "VersionRetired"]
