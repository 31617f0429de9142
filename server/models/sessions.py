"""Which engine a request of an existing session goes to: the version it is live on (or, with state_migration carry,
the default version it moves to), a refusal when its version's drain timeout ended it, or, for a session not live
here, the version its stored record names, which takes it over. The registry owns the tables read here."""

import asyncio
from collections.abc import Awaitable, Callable

from server.engine import Engine, EngineError, SessionNotFound, VersionRetired
from server.logsafe import clip
from server.models.columns import step_split
from server.models.drain import Drains
from server.models.migration import carry_over
from server.models.versions import Model, Version, VersionState, loaded, named


class SessionRouter:
    """Reads the registry's models, versions and engines as they change. `locate(session_id, owner)` is a stored
    session's model identity when `owner` owns it; `load_for_takeover(name, version, identity)` is the engine of a
    version the repository holds but does not serve, loaded for sessions taken over (None: it cannot be)."""

    def __init__(self, models: dict[str, Model], versions: dict[tuple[str, int], Version],
                 by_engine: dict[Engine, Version], drains: Drains,
                 locate: Callable[[str, str], Awaitable[str | None]] | None,
                 load_for_takeover: Callable[[str, int, str], Awaitable[Engine | None]]):
        self._models = models
        self._versions = versions
        self._by_engine = by_engine
        self._drains = drains
        self._locate = locate
        self._load_for_takeover = load_for_takeover
        self._carrying: dict[str, asyncio.Future] = {}  # session id -> its carry over in progress

    def live_engine(self, session_id: str) -> Engine | None:
        """The engine where the session is live now, if any."""
        for engine in self._by_engine:  # the loaded versions: a few
            if engine.has_session(session_id):
                return engine
        return None

    async def engine_of_session(self, session_id: str, owner: str = "") -> Engine:
        """The engine of the version the session began on (or, with state_migration carry, the one it moved to);
        a session ended by its version's drain timeout is refused with FAILED_PRECONDITION naming the version."""
        if (carrying := self._carrying.get(session_id)) is not None:
            await asyncio.shield(carrying)  # meanwhile it is live on both engines: its requests wait for the move
        if (engine := self.live_engine(session_id)) is not None:
            v = self._by_engine[engine]
            return engine if v.state is VersionState.READY else await self._carried(v, session_id, owner)
        if (refusal := self._drains.refusal(session_id, owner)) is not None:
            raise refusal
        return await self._stored_session_engine(session_id, owner)

    async def step_columns(self, session_ids: list[str], seqs: list[int], inputs, owner: str = ""):
        """Engine.step_columns for a message whose sessions may live on several versions (see columns.py)."""
        if len(self._by_engine) == 1:
            (engine, v), = self._by_engine.items()
            if v.state is VersionState.READY:  # one version: every session is its, or unknown to it
                answer = await engine.step_columns(session_ids, seqs, inputs, owner=owner)
                return asyncio.ensure_future(self._drains.name_ended(answer, session_ids, owner)) \
                    if self._drains.ended_among(session_ids) else answer
        parts: dict[Engine, list[int]] = {}
        refused: dict[int, Exception] = {}
        for i, session_id in enumerate(session_ids):
            try:
                parts.setdefault(await self.engine_of_session(session_id, owner), []).append(i)
            except EngineError as refusal:
                refused[i] = refusal
        return await step_split(parts, refused, session_ids, seqs, inputs, owner)

    async def _carried(self, v: Version, session_id: str, owner: str) -> Engine:
        """With state_migration carry, a retired version's session moves to the default version, when idle."""
        model = self._models.get(v.name)
        if v.state is not VersionState.DRAINING or model is None or \
                model.entry.config.state_migration != "carry" or not model.default:
            return v.engine
        target = self._versions[(v.name, model.default)].engine
        carrying = self._carrying[session_id] = asyncio.ensure_future(carry_over(v.engine, target, session_id, owner))
        carrying.add_done_callback(lambda _: self._carrying.pop(session_id, None))
        return target if await asyncio.shield(carrying) else v.engine

    async def _stored_session_engine(self, session_id: str, owner: str) -> Engine:
        """A session not live here: the engine of the version its stored record names, which takes it over.
        Another owner's record names nothing: its version is not told to whoever guessed its id."""
        identity = await self._locate(session_id, owner) if self._locate else None
        if identity is not None:
            for v in loaded(self._versions):
                if v.engine.model_identity == identity:
                    return v.engine
            name, version = named(identity)
            if (engine := await self._load_for_takeover(name, version, identity)) is not None:
                return engine
            raise VersionRetired(f"session {clip(session_id)} runs on version {version} of model {name}, which this "
                                 "server does not serve: open a new session", name, version)
        served = [v for v in loaded(self._versions) if v.state is VersionState.READY]
        if not served:
            raise SessionNotFound(f"session {clip(session_id)} does not exist", session_id)
        return served[0].engine  # its lookup finds the session in the store, or says it does not exist
