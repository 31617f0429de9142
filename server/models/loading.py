"""Which versions are loaded: the repository on disk and the operator's load and unload, applied one change at a
time. A version the policy wants is loaded beside the running ones, warmed up and made the default; one that fails
to load stays UNAVAILABLE with the reason and is retried once its file changes; one that leaves the policy drains;
one without an engine whose file left the repository is forgotten."""

import asyncio
import dataclasses
import logging
from collections.abc import Callable

from server.engine import Engine, EngineLimits, ModelNotFound
from server.logsafe import clip
from server.model import ModelRuntime
from server.models.drain import Drains
from server.models.repository import ModelEntry
from server.models.versions import Model, Version, VersionState, check_carry, file_stamp, load_runtime, loaded

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelRuntime, EngineLimits], Engine]


class VersionLoader:
    """Changes the registry's models, versions and engines tables. `scan()` is the repository as it is on disk now
    (blocking: called on a worker thread); `engines(runtime, limits)` makes a version's engine; `changed()` is
    called after every change of a version's state."""

    def __init__(self, models: dict[str, Model], versions: dict[tuple[str, int], Version],
                 by_engine: dict[Engine, Version], drains: Drains, scan: Callable[[], dict[str, ModelEntry]],
                 engines: EngineFactory, limits: EngineLimits, device: str, changed: Callable[[], None]):
        self._models = models
        self._versions = versions
        self._by_engine = by_engine
        self._drains = drains
        self._scan = scan
        self._engines = engines
        self._limits = limits
        self._device = device
        self._changed = changed
        self._changing = asyncio.Lock()  # one load, unload or reload at a time

    async def load(self, name: str) -> None:
        """Re-reads the model's directory and applies its version policy (Triton's load): new versions are loaded,
        warmed up and made the default; versions that left the policy drain."""
        async with self._changing:
            entries = await asyncio.to_thread(self._scan)
            if name not in entries and name not in self._models:
                raise ModelNotFound(f"model {clip(name)} is not in the repository")
            if name in self._models:
                self._models[name].unloaded = False
            await self._apply(entries.get(name) or ModelEntry(name, {}))
        self._changed()

    async def unload(self, name: str) -> None:
        """Starts draining every version of the model (Triton's unload); reload() leaves it so until load()."""
        async with self._changing:
            if name not in self._models:
                raise ModelNotFound(f"model {clip(name)} is not loaded")
            self._models[name].unloaded = True
            for v in self._of(name):
                if v.state is VersionState.READY:
                    self._drains.retire(v, "unloaded by request")
            self._choose_default(self._models[name])
        self._changed()

    async def reload(self) -> None:
        """Applies every model's directory and policy (SIGHUP, --poll-repository); a model gone from disk
        drains."""
        async with self._changing:
            entries = await asyncio.to_thread(self._scan)
            for name in sorted(set(entries) | set(self._models)):
                if not (name in self._models and self._models[name].unloaded):
                    await self._apply(entries.get(name) or ModelEntry(name, {}))
        self._changed()

    async def load_for_takeover(self, name: str, version: int, identity: str) -> Engine | None:
        """A version the repository holds but does not serve (outside its policy), loaded to carry on sessions
        taken over from another replica: it drains from the start, unloaded once they end."""
        async with self._changing:
            entry = (await asyncio.to_thread(self._scan)).get(name)
            if entry is None or entry.problem or version not in entry.versions:
                return None
            v = self._versions.get((name, version))
            if v is None or v.needs_loading():
                await self._load_version(entry, version)
                v = self._versions[(name, version)]
                if v.state is VersionState.READY and version not in entry.selected:
                    self._drains.retire(v, "outside the version policy: serves sessions taken over",
                                        idle_unload=False)
        self._changed()
        return v.engine if v.engine is not None and v.engine.model_identity == identity else None

    async def _apply(self, entry: ModelEntry) -> None:
        model = self._models.setdefault(entry.name, Model(entry))
        if entry.problem:
            return  # logged by the repository; the model keeps serving what it serves
        model.entry = entry
        wanted = entry.selected
        for version in sorted(wanted):
            v = self._versions.get((entry.name, version))
            if v is not None and self._drains.revive(v):
                continue
            if v is None or v.needs_loading():
                await self._load_version(entry, version)
        ready = [v for v in self._of(entry.name) if v.state is VersionState.READY and v.version in wanted]
        # a version leaves only once a wanted one serves: a broken new version never takes the old one down
        if ready or not wanted:
            for v in self._of(entry.name):
                if v.state is VersionState.READY and v.version not in wanted:
                    self._drains.retire(v, "left the version policy")
        self._forget_deleted(entry)
        self._choose_default(model)
        if not self._of(entry.name):
            del self._models[entry.name]  # a directory without versions, never served: not a model

    def _forget_deleted(self, entry: ModelEntry) -> None:
        """Versions without an engine (failed or unloaded) whose file left the repository: nothing of them is left
        to serve or retry, and kept they would be listed (and alerted on, when failed) for ever. A version that
        still holds an engine drains as any version leaving the policy, and is forgotten at a read after that."""
        for v in self._of(entry.name):
            if v.state is VersionState.UNAVAILABLE and v.version not in entry.versions:
                del self._versions[(v.name, v.version)]
                log.info("model %s version %d is forgotten: its file left the repository", v.name, v.version)

    async def _load_version(self, entry: ModelEntry, version: int) -> None:
        path = entry.versions[version]
        v = self._versions[(entry.name, version)] = Version(entry.name, version, path, file_stamp(path))
        self._changed()
        engine = None
        try:
            runtime = await asyncio.to_thread(load_runtime, path, self._device, self._limits.torch_threads)
            if entry.renamed:  # the repository names versions: sessions' records carry that identity
                runtime.metadata = dataclasses.replace(runtime.metadata, name=entry.name, version=str(version))
            v.metadata = runtime.metadata
            if entry.config.state_migration == "carry":
                check_carry(loaded(self._versions, entry.name), runtime.metadata)
            engine = self._engines(runtime, dataclasses.replace(self._limits, **entry.config.limits))
            await engine.start()
        except Exception as error:  # noqa: BLE001 - whatever is wrong with a version, it must not stop the rest
            v.state, v.reason, v.failed = VersionState.UNAVAILABLE, f"failed to load: {error}", True
            log.error("model %s version %d is unavailable: %s", entry.name, version, error,
                      exc_info=not isinstance(error, ValueError | RuntimeError))
            if engine is not None:
                await engine.stop()
            return
        v.engine, v.state = engine, VersionState.READY
        self._by_engine[engine] = v
        engine.on_session_closed(lambda session_id, owner: self._drains.after_close(v, session_id, owner))
        log.info("model %s version %d is ready", entry.name, version)

    def _choose_default(self, model: Model) -> None:
        name = model.entry.name
        ready = {v.version for v in self._of(name) if v.state is VersionState.READY}
        preferred = model.entry.config.default_version
        model.default = preferred if preferred in ready else max(ready, default=0)

    def _of(self, name: str) -> list[Version]:
        return [v for (n, _), v in self._versions.items() if n == name]
