"""Retiring a version: it takes no new work, its sessions go on until the last one ends, then it is unloaded;
at the drain timeout its remaining sessions end, and are told why when they come back."""

import asyncio
import collections
import ctypes
import gc
import logging
from collections.abc import Callable

from server.engine import ColumnsAnswer, Engine, SessionNotFound, VersionRetired
from server.logsafe import clip
from server.models.versions import Version, VersionState

log = logging.getLogger(__name__)

# glibc's malloc_trim, absent elsewhere (musl, macOS): there freed memory goes back as that allocator decides
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)
RETIRED_SESSIONS_KEPT = 100_000  # ids of sessions ended by a drain timeout, remembered to say why they are gone


class Drains:
    """`spawn(coroutine)` runs background work the registry can cancel; `unloaded(version, engine)` is told
    when a version's engine has stopped."""

    def __init__(self, timeout: float, spawn: Callable, unloaded: Callable[[Version, Engine], None]):
        self._timeout = timeout
        self._spawn = spawn
        self._unloaded = unloaded
        # session id -> (model, version, owner)
        self._ended: collections.OrderedDict[str, tuple[str, int, str]] = collections.OrderedDict()

    def retire(self, v: Version, why: str, idle_unload: bool = True) -> None:
        """Not `idle_unload`: kept until the drain timeout even without sessions (some are on their way)."""
        v.state, v.reason = VersionState.DRAINING, why
        name, version = v.name, v.version
        v.engine.retire(lambda: VersionRetired(
            f"version {version} of model {name} is retired ({why}) and takes no new sessions or calls; leave "
            "the version unset for the current one", name, version))
        log.info("model %s version %d is draining (%s): %d live sessions", name, version, why,
                 v.engine.session_count)
        if v.engine.session_count == 0 and idle_unload:
            self._spawn(self.unload(v, why))
        else:
            v.drain_task = self._spawn(self._end_at_timeout(v, why))

    def revive(self, v: Version) -> bool:
        """A draining version the policy wants again (a roll-back) serves again, sessions and all; False when it
        is too late (its drain timeout has ended its sessions, or it is unloaded): it is loaded anew."""
        if v.state is not VersionState.DRAINING or v.engine is None or v.drain_expired:
            return False
        if v.drain_task is not None:
            v.drain_task.cancel()
            v.drain_task = None
        v.state, v.reason = VersionState.READY, ""
        v.engine.retire(None)
        log.info("model %s version %d serves again (back in the version policy)", v.name, v.version)
        return True

    def after_close(self, v: Version, session_id: str, owner: str) -> None:
        """A session of `v` ended: remembered if the drain timeout ended it; a draining version without sessions
        is unloaded."""
        if v.drain_expired:
            self._ended[session_id] = (v.name, v.version, owner)
            while len(self._ended) > RETIRED_SESSIONS_KEPT:
                self._ended.popitem(last=False)
        if v.state is VersionState.DRAINING and v.engine is not None and v.engine.session_count == 0:
            self._spawn(self.unload(v, v.reason))

    def refusal(self, session_id: str, owner: str) -> VersionRetired | None:
        """Why `owner`'s session is gone, when a drain timeout ended it. Another principal's is not told: to it the
        session is one that does not exist, as everywhere."""
        ended = self._ended.get(session_id)
        if ended is None or ended[2] != owner:
            return None
        name, version, _ = ended
        return VersionRetired(f"session {clip(session_id)} ran on version {version} of model {name}, which was "
                              "retired; its state is gone: open a new session", name, version)

    def ended_among(self, session_ids: list[str]) -> bool:
        """Whether a drain timeout ended any of these sessions: only then does a columnar answer need naming (an id
        is never reused, so one not ended now is refused, if at all, as unknown or by its own drain's error)."""
        ended = self._ended
        return bool(ended) and any(session_id in ended for session_id in session_ids)

    async def name_ended(self, answer: asyncio.Future, session_ids: list[str], owner: str) -> ColumnsAnswer:
        """A columnar answer in which an entry refused as unknown whose session a drain timeout ended is told so."""
        result = await answer
        for i, error in result.errors.items():
            if isinstance(error, SessionNotFound) and (refusal := self.refusal(session_ids[i], owner)) is not None:
                result.errors[i] = refusal
        return result

    async def unload(self, v: Version, why: str) -> None:
        if v.state is not VersionState.DRAINING:
            # unloaded already (its last session's close and its drain timeout both got here), or revived (a
            # roll-back) after its unload was asked and before it ran: it serves on
            return
        engine, v.engine = v.engine, None
        if v.drain_task is not None and not v.drain_expired:
            v.drain_task.cancel()
        v.state, v.reason = VersionState.UNAVAILABLE, f"unloaded ({why})"
        await engine.stop()
        log.info("model %s version %d unloaded", v.name, v.version)
        self._unloaded(v, engine)
        del engine
        await return_memory()

    async def _end_at_timeout(self, v: Version, why: str) -> None:
        await asyncio.sleep(self._timeout)
        v.drain_expired = True
        if v.engine is None:
            return
        ended = await v.engine.end_all(VersionRetired(  # each one remembered by after_close
            f"version {v.version} of model {v.name} was retired ({why}) and its sessions ended at the drain "
            "timeout: open a new session", v.name, v.version))
        log.warning("model %s version %d: %d sessions ended at the drain timeout", v.name, v.version, len(ended))
        await self.unload(v, why)


async def return_memory() -> None:
    """Hands an unloaded version's memory back to the operating system. Its engine lives in reference cycles
    (tasks and callbacks that point back at it), which only a full collection frees, and those can be rare; the
    collection waits one turn of the event loop, until the loop has let go of the engine's cancelled tasks.
    Then glibc would keep the freed weights and state pool in its arenas unless asked to trim them (measured
    with the large model: RSS stayed at both versions' level after the unload)."""
    await asyncio.sleep(0)
    gc.collect()
    if _MALLOC_TRIM is not None:
        await asyncio.to_thread(_MALLOC_TRIM, 0)  # ctypes releases the GIL: the event loop goes on meanwhile
