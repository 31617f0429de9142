"""state_migration "carry" (the operator's choice, off by default): a retired version's session moves to the
model's current version at its next request, when the operator has said that the two versions' states mean the
same thing. Only the state shape can be checked here; the meaning is the operator's word."""

import logging

from server.engine import Engine, EngineError
from server.logsafe import fingerprint

log = logging.getLogger(__name__)


def carry_over(source: Engine, target: Engine, session_id: str) -> bool:
    """Moves an idle session from `source` to `target`; False (it stays) when it is busy or `target` has no room.
    All of it between two awaits: no request can run on the session in between."""
    record = source.idle_record(session_id)
    if record is None:
        return False
    try:
        target.adopt(record)
    except EngineError as error:
        log.warning("session %s stays on its retired version: %s", fingerprint(session_id), error)
        return False
    source.let_go(session_id)
    log.debug("session %s carried over to the current version", fingerprint(session_id))
    return True
