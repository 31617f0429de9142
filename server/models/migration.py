"""state_migration "carry" (the operator's choice, off by default): a retired version's session moves to the
model's current version at its next request, when the operator has said that the two versions' states mean the
same thing. Only the state shape can be checked here; the meaning is the operator's word."""

import logging

from server.engine import Engine, EngineError
from server.logsafe import fingerprint

log = logging.getLogger(__name__)


async def carry_over(source: Engine, target: Engine, session_id: str, owner: str) -> bool:
    """Moves an idle session of `owner` (whose request it is) from `source` to `target`, stored under `target`'s
    model before it is let go of; False (it stays) when it is busy or another's, `target` has no room or the store
    cannot take it. The caller keeps the session's other requests waiting meanwhile (SessionRouter)."""
    record = source.idle_record(session_id)
    if record is None or record.owner != owner:  # another principal's request touches nothing of it
        return False
    try:
        await target.adopt(record)
    except EngineError as error:
        log.warning("session %s stays on its retired version: %s", fingerprint(session_id), error)
        return False
    await source.let_go(session_id)
    log.debug("session %s carried over to the current version", fingerprint(session_id))
    return True
