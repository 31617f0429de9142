"""How sessions begin and end by policy rather than by request order: opened with room made for them (evicting
under the full policy), closed by their principal, expired when idle past the timeout. Each is counted and
logged without the session's id in full."""

import asyncio
import logging

import torch

from server.engine.admission import Admission, Eviction
from server.engine.errors import SessionNotFound
from server.engine.limits import RefusalCounter
from server.engine.live import LiveSessions
from server.engine.sessions import Session
from server.logsafe import fingerprint
from server.metrics import Metrics

log = logging.getLogger(__name__)


class Turnover:
    """Opens, closes and expires the sessions of one engine; `refusals` counts what the admission limits refuse."""

    def __init__(self, live: LiveSessions, admission: Admission, metrics: Metrics, refusals: RefusalCounter,
                 idle_timeout: float, clock):
        self._live = live
        self._sessions = live.table
        self._admission = admission
        self._metrics = metrics
        self._refusals = refusals
        self._idle_timeout = idle_timeout
        self._clock = clock

    async def open(self, owner: str, h: torch.Tensor, c: torch.Tensor) -> Session:
        """A new session of `owner`, room made for it by the full policy; the request was admitted already."""
        with self._refusals:
            # one at a time, asking again after each: ending one awaits the store, and meanwhile other requests
            # may take the room it made or close the next victim
            while evictions := self._admission.room_for_session(owner, self._sessions):
                await self._evict(evictions[0])
            session = await self._live.open(owner, h, c)
        self._metrics.sessions_created.inc()
        log.debug("session %s opened for principal %r", fingerprint(session.id), owner)
        return session

    async def close(self, session: Session) -> None:
        """Ends a session its principal closed, here and in the store; its queued requests fail as closed."""
        await self._live.end(session, SessionNotFound(f"session {session.id} was closed before this request ran",
                                                      session.id))
        self._metrics.sessions_closed.inc()
        log.debug("session %s closed by its principal", fingerprint(session.id))

    async def expire_forever(self) -> None:
        """Ends every session idle past the timeout (and not busy when its turn comes), checking every second or
        quarter of the timeout, whichever is shorter."""
        period = min(1.0, self._idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            deadline = self._clock() - self._idle_timeout
            for session in self._sessions.idle_since(deadline):
                if not self._sessions.still_idle(session, deadline):
                    continue  # closed or used while an earlier one's end awaited the store
                await self._live.end(session, SessionNotFound(f"session {session.id} expired", session.id))
                self._metrics.sessions_expired.inc()
                log.debug("session %s expired", fingerprint(session.id))

    async def _evict(self, eviction: Eviction) -> None:
        victim, limit = eviction
        await self._live.end(victim, SessionNotFound(f"session {victim.id} was evicted to make room ({limit})",
                                                     victim.id))
        self._metrics.sessions_evicted.labels(limit).inc()
