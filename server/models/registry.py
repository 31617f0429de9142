"""Every model and version the server serves: one Engine per loaded (model, version), loaded beside the running
ones, made the default, drained and unloaded while traffic flows. The transport asks the registry which engine
serves a request; the engines know nothing of it."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from server.engine import Draining, Engine, EngineLimits, InvalidInput, ModelNotFound, ModelUnavailable, Sequences
from server.engine.errors import DRAINING_RETRY_SECONDS
from server.logsafe import clip
from server.models.drain import Drains
from server.models.loading import EngineFactory, VersionLoader
from server.models.repository import ModelEntry
from server.models.sessions import SessionRouter
from server.models.versions import LOADING_RETRY_SECONDS, Model, Version, VersionState, VersionStatus, loaded

log = logging.getLogger(__name__)

__all__ = ["EngineFactory", "ModelRegistry", "VersionState", "VersionStatus"]


class ModelRegistry:
    """`start()`, then `engine()` / `engine_of_session()` per request; `load`, `unload`, `reload` at any time."""

    def __init__(self, scan: Callable[[], dict[str, ModelEntry]], engines: EngineFactory, limits: EngineLimits,
                 device: str = "cpu", default_model: str = "", drain_timeout: float = 300.0,
                 poll_interval: float = 0.0, locate: Callable[[str, str], Awaitable[str | None]] | None = None):
        self._default_model = default_model
        self._poll_interval = poll_interval
        self._models: dict[str, Model] = {}
        self._versions: dict[tuple[str, int], Version] = {}
        self._by_engine: dict[Engine, Version] = {}
        self._sequences: dict[Engine, Sequences] = {}  # Open Inference Protocol sequences, per engine
        self._listeners: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._draining = asyncio.Event()
        self._drain_deadline = 0.0
        self._drains = Drains(drain_timeout, self._spawn, self._unloaded)
        self._loader = VersionLoader(self._models, self._versions, self._by_engine, self._drains, scan, engines,
                                     limits, device, self._changed)
        # `locate`: a stored session's model identity when `owner` owns it, for sessions not live here
        self._sessions = SessionRouter(self._models, self._versions, self._by_engine, self._drains, locate,
                                       self._loader.load_for_takeover)

    # -- what requests are served by ----------------------------------------------------------------

    def engine(self, name: str = "", version: int = 0, new_work: bool = True) -> Engine:
        """The engine for new sessions and stateless calls of `name` (empty: the only model, or the default
        model) at `version` (0: the model's default version). Not `new_work` (what a client may know of a
        version): a draining version's engine too."""
        model = self._model(name)
        v = self._version(model.entry.name, version or model.default, version)
        if v.state is VersionState.READY or (v.engine is not None and not new_work):
            return v.engine
        raise v.refusal()

    def live_engine(self, session_id: str) -> Engine | None:
        """The engine where the session is live now, if any."""
        return self._sessions.live_engine(session_id)

    async def engine_of_session(self, session_id: str, owner: str = "") -> Engine:
        """The engine a request of an existing session goes to (see sessions.py)."""
        return await self._sessions.engine_of_session(session_id, owner)

    async def step_columns(self, session_ids: list[str], seqs: list[int], inputs, owner: str = ""):
        """Engine.step_columns for a message whose sessions may live on several versions (see columns.py)."""
        return await self._sessions.step_columns(session_ids, seqs, inputs, owner)

    def largest_output_size(self) -> int:
        """The largest output of the loaded versions: what a message's answer is sized by before it is routed."""
        return max((engine.describe().metadata.output_size for engine in self._by_engine), default=0)

    def version_of(self, engine: Engine) -> tuple[str, int]:
        """The (model name, version number) an engine serves; version 0 once it is unloaded."""
        v = self._by_engine.get(engine)
        return (v.name, v.version) if v else (engine.describe().metadata.name, 0)

    def sequences(self, engine: Engine) -> Sequences:
        """The Open Inference Protocol sequences of an engine (its sessions under client-chosen ids)."""
        if engine not in self._sequences:
            self._sequences[engine] = Sequences(engine)
        return self._sequences[engine]

    def statuses(self) -> list[VersionStatus]:
        return [v.status(v.name in self._models and self._models[v.name].default == v.version)
                for _, v in sorted(self._versions.items())]

    def serving(self) -> bool:
        """Whether every model (not unloaded on purpose) has a READY version: what health reports."""
        return all(model.default for model in self._models.values() if not model.unloaded and model.entry.versions)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` after every change of a version's state."""
        self._listeners.append(listener)

    @property
    def draining(self) -> asyncio.Event:
        """Set once the server drains: open streams stop taking requests."""
        return self._draining

    def draining_refusal(self, message: str) -> Draining:
        grace_left = max(0.0, self._drain_deadline - asyncio.get_running_loop().time())
        return Draining(message, min(grace_left, DRAINING_RETRY_SECONDS))

    # -- loading and unloading ----------------------------------------------------------------------

    async def start(self) -> None:
        """Loads every model's versions; raises if not one version of any model could be served."""
        await self.reload()
        if not any(model.default for model in self._models.values()):
            reasons = "; ".join(f"{v.name} version {v.version}: {v.reason}" for v in self._versions.values())
            raise ValueError(f"no model could be served: {reasons or 'the repository holds none'}")
        if self._default_model and self._default_model not in self._models:
            raise ValueError(f"--default-model {self._default_model!r} is not in the repository "
                             f"(it holds {', '.join(sorted(self._models))})")
        if self._poll_interval:
            self._spawn(self._poll_forever())

    async def load(self, name: str) -> None:
        """Re-reads the model's directory and applies its version policy (Triton's load; see loading.py)."""
        await self._loader.load(name)

    async def unload(self, name: str) -> None:
        """Starts draining every version of the model (Triton's unload; see loading.py)."""
        await self._loader.unload(name)

    async def reload(self) -> None:
        """Applies every model's directory and policy (SIGHUP, --poll-repository; see loading.py)."""
        await self._loader.reload()

    async def drain(self, timeout: float) -> None:
        """Server shutdown: no new work anywhere; waits up to `timeout` for queued requests."""
        self._drain_deadline = asyncio.get_running_loop().time() + timeout
        self._draining.set()
        await asyncio.gather(*(v.engine.drain(timeout) for v in loaded(self._versions)))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(v.engine.stop() for v in loaded(self._versions)))

    # -- internals ----------------------------------------------------------------------------------

    def _unloaded(self, v: Version, engine: Engine) -> None:
        del self._by_engine[engine]
        self._sequences.pop(engine, None)
        self._changed()

    def _model(self, name: str) -> Model:
        if not name:
            if self._default_model:
                name = self._default_model
            elif len(self._models) == 1:
                name = next(iter(self._models))
            else:
                raise InvalidInput(f"this server serves several models ({', '.join(sorted(self._models))}): "
                                   "name one in model_name", "model_name")
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"model {clip(name)} is not served here; ListModels lists the models served")
        return model

    def _version(self, name: str, number: int, asked: int) -> Version:
        v = self._versions.get((name, number))
        if v is None:
            if asked:
                raise ModelNotFound(f"model {name} has no version {asked}; ListModels lists its versions")
            raise ModelUnavailable(f"model {name} has no version ready now", LOADING_RETRY_SECONDS)
        return v

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _spawn(self, coroutine) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.reload()
            except OSError as error:
                log.error("cannot read the model repository: %s", error)

