"""Domain errors of the engine; the transport maps each class to one gRPC status code, and their attributes to the
standard error details (plain values here: the engine knows nothing of gRPC or protobuf)."""

# Seconds a client refused by a draining server is asked to wait, unless less of the grace is left. Not the whole
# grace: a drain ends (and the server stops, so a retry reaches another replica) as soon as its queued work is
# done, usually well before the grace runs out, and a retry that finds it still draining is refused again at once.
DRAINING_RETRY_SECONDS = 1.0


class EngineError(Exception):
    """Base of every error the engine reports to a caller; the message is safe to show to clients."""


class InvalidInput(EngineError):
    """A request whose tensors or fields are malformed. `field`: the request field at fault (`inputs.shape`,
    `h0`, `session_id`), when one is; the transport puts it under its place in the message (`steps[3].`)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class SessionNotFound(EngineError):
    """No live session has this id (never created, closed, expired, or owned by someone else). `session_id`: the
    id as the caller sent it; None for an Open Inference Protocol sequence (its clients read the message)."""

    def __init__(self, message: str, session_id: str | None = None):
        super().__init__(message)
        self.session_id = session_id


class SequenceError(EngineError):
    """A request number that is not the next one for its session; `expected`: the number to go on from."""

    def __init__(self, message: str, expected: int):
        super().__init__(message)
        self.expected = expected


class LimitExceeded(EngineError):
    """A configured resource limit would be exceeded; `limit` names the setting (a metrics label). `retry_after`:
    seconds until the same request would fit, where waiting helps (a rate limit, a full queue); else None."""

    def __init__(self, message: str, limit: str, retry_after: float | None = None):
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after


class Draining(EngineError):
    """The server is shutting down and takes no new work. `retry_after`: seconds worth waiting before a retry
    (DRAINING_RETRY_SECONDS, or the grace left when that is less)."""

    def __init__(self, message: str, retry_after: float = DRAINING_RETRY_SECONDS):
        super().__init__(message)
        self.retry_after = retry_after


class ModelFailure(EngineError):
    """The model call for this request's batch raised; no state was changed."""


class StateUnavailable(EngineError):
    """The session's stored state cannot be reached now (the state store is down, or another replica holds
    the session); nothing was applied. `retry_after`: seconds worth waiting, when known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ModelNotFound(EngineError):
    """No model of this name, or no version of this number, is in the repository (or was ever loaded)."""


class ModelUnavailable(EngineError):
    """The model or version exists but cannot take this request now (it is loading, or none of its versions is
    ready); waiting may help. `retry_after`: seconds worth waiting, when known."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class VersionRetired(ModelUnavailable):
    """The version was retired (draining, unloaded) or failed to load: waiting does not help, another version
    (a new session) does. `model` and `version` name it."""

    def __init__(self, message: str, model: str, version: int):
        super().__init__(message)
        self.model = model
        self.version = version
