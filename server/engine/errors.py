"""Domain errors of the engine; the transport maps each class to one gRPC status code."""


class EngineError(Exception):
    """Base of every error the engine reports to a caller; the message is safe to show to clients."""


class InvalidInput(EngineError):
    """A request whose tensors or fields are malformed."""


class SessionNotFound(EngineError):
    """No live session has this id (never created, closed, expired, or owned by someone else)."""


class SequenceError(EngineError):
    """A request number that is not the next one for its session."""


class LimitExceeded(EngineError):
    """A configured resource limit would be exceeded; `limit` names the setting (a metrics label)."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


class Draining(EngineError):
    """The server is shutting down and takes no new work."""


class ModelFailure(EngineError):
    """The model call for this request's batch raised; no state was changed."""


class StateUnavailable(EngineError):
    """The session's stored state cannot be reached now (the state store is down, or another replica holds
    the session); nothing was applied. `retry_after`: seconds worth waiting, when known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after
